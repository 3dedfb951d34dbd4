// CUDA building blocks shared by the resfuse CUDA kernels, all on the [outer, C, inner] view of csrc/common.h.
//
// * ChannelCursor: walks a grid-stride loop over flat indices and keeps track of the channel of the current
//   element without a 64-bit division per element.
// * Per-channel reductions, deterministic and without host synchronisation, in two levels of one launch:
//     level 1: every block reduces a tile of the reduction space of its channels into one partial accumulator per
//              channel (partial[block_row][C]);
//     level 2: the block of each column (blockIdx.x) that finishes last, found with an arrival counter, merges
//              the column's partials in a fixed order and hands each channel's result to a finaliser functor,
//              which writes the per-channel outputs. One launch instead of two saves a launch's host time and
//              the second kernel's ramp; the merge order does not depend on which block is last.
//   Layout-specific level-1 kernels keep global loads coalesced:
//     NHWC (inner == 1): threadIdx.x runs over 32 consecutive channels, threadIdx.y over rows;
//     NCHW (inner > 1):  one channel per blockIdx.x, the threads run over its (o, i) positions, i fastest.
//   The reduction order depends only on the shape and the device's SM count, so results are bit-reproducible.
// Accumulators are fp32 (fp64 for float64 inputs): acc_t = at::opmath_type<scalar_t>.
//
// Vector paths. The scalar kernels move 2-byte elements one at a time with int64 bookkeeping per element, and the
// NHWC reduction lets a warp read only 32 channels of a row (64 bytes for bf16); on an H100 (bf16, channels_last,
// 128x64x56x56 = 51.4 MB per tensor, ~3.0 TB/s copy bandwidth) that measured 2.5-10x off the memory floor. So,
// whenever the view allows it, each thread moves 16-byte vectors of VEC = 16 / sizeof(scalar_t) elements that
// share one channel (NCHW, inner % VEC == 0) or are VEC consecutive channels of one row (NHWC, C % VEC == 0),
// does the channel bookkeeping once per vector in 32-bit, and keeps kUnroll independent vectors in flight.
// Bytes per call at that shape and the floor they imply at 3.0 TB/s, against what the scalar kernels measured:
//   affine_act             x + residual + out        154 MB (103 MB without residual)   ~51 us   (scalar: 205 us)
//   backward_elementwise   grad_out, out, x + 2 out  257 MB                              ~86 us   (scalar: 250 us)
//   NHWC Welford reduce    x                          51 MB, partials < 1 MB             ~17 us   (scalar: 174 us)
//   NHWC BackwardSums      grad_out, out, x          154 MB                              ~51 us   (scalar: 144 us)
// The reductions read 32- or 64-channel row segments per group of threads (vec_tile_channels; bf16 at 64: 8
// threads per 128-byte segment, 4 rows per warp) and Welford computes one reciprocal per row, not one division
// per element.
// Views the vector paths cannot take (misaligned pointers, odd C in NHWC, H*W % VEC != 0 in NCHW, more than
// 2^31 vectors) run the scalar kernels, which stay the general fallback; NCHW reductions are always scalar.
#pragma once

#include "../common.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>
#include <limits>
#include <type_traits>

namespace resfuse::cuda {

constexpr int kThreads = 256;      // elementwise kernels and NCHW reductions
constexpr int kClChannels = 32;    // NHWC reduction block: channels (x) ...
constexpr int kClRows = 8;         // ... by rows (y)
constexpr int64_t kMaxParts = 1024;  // upper bound on level-1 partials per channel
constexpr int kMergeUnroll = 8;      // level 2: partials loaded at once per thread
// NHWC vector reduction: channels per block. The merge in a column's last block is serial per thread: a
// 256-channel tile left one thread per channel to merge 396 partials (10x the reduction itself at C=256), a
// 64-channel one four threads and 99 partials each at C=64 (+18 us per call against a separate merge
// kernel). 64-channel tiles above C=64 and 32-channel ones up to it give every channel >= 4 threads and at most
// ~25 partials each; a 32-channel row segment is still 64 contiguous bytes (bf16), whole DRAM bursts.
inline int vec_tile_channels(int64_t channels) { return channels > 64 ? 64 : 32; }
// Vector paths: >= 3 resident blocks of kThreads per SM (__launch_bounds__ caps registers at 80; at 64 the bf16
// backward kernels spill) with kUnroll vectors per input stream in flight per thread: 768 threads x 2-3 streams
// x 2 x 16 B = 48-72 KB per SM, above the ~25 KB that latency x bandwidth per SM asks for. The one-input Welford
// reduction unrolls 4.
constexpr int kUnroll = 2;
constexpr int kMinBlocksPerSm = 3;
constexpr int kBlocksPerSm = 3;    // level-1 vector reductions: one wave of blocks
constexpr int kElementwiseBlocksPerSm = 8;

// ---------------------------------------------------------------------------------------------------------------
// Accumulators: default-constructed empty, merge() is associative (results depend on the merge order only
// through rounding, and that order is fixed).

// Welford/Chan accumulator of (count, mean, M2 = sum of squared deviations).
template <typename T>
struct Welford {
  using value_type = T;
  T count = T(0);
  T mean = T(0);
  T m2 = T(0);

  __device__ __forceinline__ void push(T x) {
    count += T(1);
    const T delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.count == T(0)) return;
    if (count == T(0)) {
      *this = o;
      return;
    }
    const T total = count + o.count;
    const T delta = o.mean - mean;
    const T frac = o.count / total;
    mean += delta * frac;
    m2 += o.m2 + delta * delta * count * frac;
    count = total;
  }
};

// Two plain per-channel sums.
template <typename T>
struct Sum2 {
  using value_type = T;
  T a = T(0);
  T b = T(0);

  __device__ __forceinline__ void merge(const Sum2& o) {
    a += o.a;
    b += o.b;
  }
};

// 16 bytes of consecutive elements; alignas makes loads and stores single 128-bit instructions.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kSize];
};

__device__ __forceinline__ float reciprocal(float v) { return __frcp_rn(v); }
__device__ __forceinline__ double reciprocal(double v) { return __drcp_rn(v); }

// Welford over V channels that always see the same number of values: the lanes share the count, so one
// correctly rounded reciprocal per row replaces a division per element, and the update is otherwise the
// scalar one (no cancellation when |mean| >> std).
template <typename T, int V>
struct WelfordVec {
  T count = T(0);
  T mean[V] = {};
  T m2[V] = {};

  template <typename scalar_t>
  __device__ __forceinline__ void push(const Vec16<scalar_t>& x) {
    count += T(1);
    const T inv = reciprocal(count);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T xv = static_cast<T>(x.v[k]);
      const T delta = xv - mean[k];
      mean[k] += delta * inv;
      m2[k] += delta * (xv - mean[k]);
    }
  }

  __device__ __forceinline__ void merge(const WelfordVec& o) {
    if (o.count == T(0)) return;
    if (count == T(0)) {
      *this = o;
      return;
    }
    const T total = count + o.count;
    const T frac = o.count / total;
    const T w = count * frac;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T delta = o.mean[k] - mean[k];
      mean[k] += delta * frac;
      m2[k] += o.m2[k] + delta * delta * w;
    }
    count = total;
  }

  __device__ __forceinline__ Welford<T> lane(int k) const { return Welford<T>{count, mean[k], m2[k]}; }
};

template <typename T, int V>
struct Sum2Vec {
  T a[V] = {};
  T b[V] = {};

  __device__ __forceinline__ void merge(const Sum2Vec& o) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a[k] += o.a[k];
      b[k] += o.b[k];
    }
  }
};

// Merges the accumulators of `width` (a power of two) threads into the one of k == 0, in a fixed tree order.
// Thread k of the group owns buf[k * stride]; every thread of the block must call this (it synchronises).
template <class Acc>
__device__ Acc tree_merge(Acc* buf, Acc acc, int k, int width, int stride) {
  buf[k * stride] = acc;
  __syncthreads();
  for (int s = width / 2; s > 0; s >>= 1) {
    if (k < s) {
      acc.merge(buf[(k + s) * stride]);
      buf[k * stride] = acc;
    }
    __syncthreads();
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------------------------
// Channel of a flat index idx = (o*C + c)*inner + i, advanced by a fixed step with additions only.
// The vector kernels run it in int32 over vector indices.
template <typename index_t>
struct ChannelCursorT {
  index_t i, c;                 // position in the plane, channel
  index_t step_i, step_c;       // step % inner, (step / inner) % C
  index_t inner, channels;

  __device__ __forceinline__ ChannelCursorT(index_t idx, index_t step, index_t inner_, index_t channels_)
      : inner(inner_), channels(channels_) {
    const index_t q = idx / inner;
    i = idx - q * inner;
    c = q % channels;
    const index_t sq = step / inner;
    step_i = step - sq * inner;
    step_c = sq % channels;
  }

  __device__ __forceinline__ void advance() {
    i += step_i;
    index_t carry = 0;
    if (i >= inner) {
      i -= inner;
      carry = 1;
    }
    c += step_c + carry;  // < 2*C, so one wrap suffices
    if (c >= channels) c -= channels;
  }
};
using ChannelCursor = ChannelCursorT<int64_t>;

// Grid of a grid-stride elementwise loop over `numel` elements.
inline int64_t elementwise_blocks(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(ceil_div(numel, kThreads), sms * 16));
}

// ---------------------------------------------------------------------------------------------------------------
// Level 2, at the end of every level-1 block (all threads call it). Blocks (x, 0..gridDim.y-1) each wrote
// their partials for channels [c_begin, c_begin + c_count); the one that arrives last merges them, `lanes`
// threads per channel over a fixed stride of partials then a fixed tree, calls fin(c, acc), and resets the
// column's counter to zero for the next launch on the stream (column_counters below).

// A partial written by another block of this launch: loaded from L2, never from this SM's L1.
template <class Lane>
__device__ __forceinline__ Lane load_partial(const Lane* p) {
  using T = typename Lane::value_type;
  static_assert(sizeof(Lane) % sizeof(T) == 0, "a partial is an array of its value_type");
  Lane out;
  const T* src = reinterpret_cast<const T*>(p);
  T* dst = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Lane) / sizeof(T)); ++i) dst[i] = __ldcg(src + i);
  return out;
}

template <class Lane, class Fin>
__device__ void merge_column_if_last(const Lane* __restrict__ partial, int64_t channels, int64_t c_begin,
                                     int c_count, unsigned* counter, const Fin& fin, Lane* buf) {
  __shared__ bool is_last;
  const int tid = static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x);
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  __threadfence();  // this block's partials are visible device-wide before its arrival is counted
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(counter, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  int lanes = 1;  // threads per channel: a power of two, c_count * lanes <= nthreads
  while (2 * lanes * c_count <= nthreads) lanes *= 2;
  const int ch = tid / lanes;
  const int lane = tid - ch * lanes;
  const int64_t parts = gridDim.y;
  Lane acc;
  if (ch < c_count) {
    // kMergeUnroll loads in flight per thread: the merge is one block's serial tail after the reduction, and
    // one L2 round trip per partial made it ~10x the reduction itself at C=256 (396 partials, one lane each).
    const Lane* src = partial + c_begin + ch;
    int64_t p = lane;
    for (; p + (kMergeUnroll - 1) * lanes < parts; p += kMergeUnroll * lanes) {
      Lane v[kMergeUnroll];
#pragma unroll
      for (int u = 0; u < kMergeUnroll; ++u) v[u] = load_partial(src + (p + u * lanes) * channels);
#pragma unroll
      for (int u = 0; u < kMergeUnroll; ++u) acc.merge(v[u]);
    }
    for (; p < parts; p += lanes) acc.merge(load_partial(src + p * channels));
  }
  acc = tree_merge(buf + (tid - lane), acc, lane, lanes, 1);
  if (lane == 0 && ch < c_count) fin(c_begin + ch, acc);
  if (tid == 0) *counter = 0u;
}

// ---------------------------------------------------------------------------------------------------------------
// Level 1. `op(acc, idx, c)` folds element idx (of channel c) into acc; it may also write element idx.

template <class Acc, class Op, class Fin>
__global__ void partial_reduce_cl_kernel(int64_t rows, int64_t channels, int64_t rows_per_block, Op op,
                                         Acc* __restrict__ partial, unsigned* counters, Fin fin) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* buf = reinterpret_cast<Acc*>(smem_raw);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kClChannels + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  Acc acc;
  if (c < channels) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kClRows) {
      op(acc, r * channels + c, c);
    }
  }
  acc = tree_merge(buf + threadIdx.x, acc, threadIdx.y, kClRows, kClChannels);
  if (threadIdx.y == 0 && c < channels) {
    partial[static_cast<int64_t>(blockIdx.y) * channels + c] = acc;
  }
  const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * kClChannels;
  merge_column_if_last(partial, channels, c_begin, static_cast<int>(std::min<int64_t>(kClChannels, channels - c_begin)),
                       counters + blockIdx.x, fin, buf);
}

template <class Acc, class Op, class Fin>
__global__ void partial_reduce_planar_kernel(ChannelView v, int64_t tile, Op op, Acc* __restrict__ partial,
                                             unsigned* counters, Fin fin) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* buf = reinterpret_cast<Acc*>(smem_raw);
  const int64_t c = blockIdx.x;
  const int64_t n = v.outer * v.inner;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * tile;
  const int64_t k1 = k0 + tile < n ? k0 + tile : n;
  Acc acc;
  int64_t k = k0 + threadIdx.x;  // flattened (o, i) position within channel c
  if (k < k1) {
    int64_t o = k / v.inner;
    int64_t i = k - o * v.inner;
    const int64_t step_o = kThreads / v.inner;
    const int64_t step_i = kThreads - step_o * v.inner;
    for (; k < k1; k += kThreads) {
      op(acc, (o * v.channels + c) * v.inner + i, c);
      i += step_i;
      o += step_o;
      if (i >= v.inner) {
        i -= v.inner;
        ++o;
      }
    }
  }
  acc = tree_merge(buf, acc, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) {
    partial[static_cast<int64_t>(blockIdx.y) * v.channels + c] = acc;
  }
  merge_column_if_last(partial, v.channels, c, 1, counters + blockIdx.x, fin, buf);
}

// NHWC level 1 on 16-byte vectors: thread (tx, ty) of a block owns channels [c0, c0 + VEC) with
// c0 = (blockIdx.x*tx_width + tx)*VEC and reads every (kThreads / tx_width)-th row of the block's row span, so
// the tx_width threads of a row read consecutive vectors (C=256 bf16: 8 threads per 128-byte segment, 4 rows per
// warp). The threads holding the same channels are then merged in a fixed tree order into partial[blockIdx.y][C].
// Op supplies (see bn_act.cu): kV, kUnroll (rows folded per iteration), Acc (a vector accumulator with merge()),
// Lane (the per-channel accumulator of the partials), Lanes / lanes(c0) (per-thread channel data kept in
// registers), fold<U>(acc, lanes, off, step) (folds the U vectors at off, off + step, ...), finish(acc, k, c)
// (lane k of acc as channel c's partial).
template <class Op, class Fin>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    partial_reduce_cl_vec_kernel(int64_t rows, int64_t channels, int64_t rows_per_block, int tx_log2, Op op,
                                 typename Op::Lane* __restrict__ partial, unsigned* counters, Fin fin) {
  using Acc = typename Op::Acc;
  constexpr int kV = Op::kV;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* buf = reinterpret_cast<Acc*>(smem_raw);
  const int tx_width = 1 << tx_log2;
  const int rows_y = kThreads >> tx_log2;
  const int tx = static_cast<int>(threadIdx.x) & (tx_width - 1);
  const int ty = static_cast<int>(threadIdx.x) >> tx_log2;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx_width + tx) * kV;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  Acc acc;
  if (c0 < channels) {
    const typename Op::Lanes lanes = op.lanes(c0);
    const int64_t step = static_cast<int64_t>(rows_y) * channels;
    int64_t r = r0 + ty;
    int64_t off = r * channels + c0;
    for (; r + (Op::kUnroll - 1) * rows_y < r1; r += Op::kUnroll * rows_y, off += Op::kUnroll * step) {
      op.template fold<Op::kUnroll>(acc, lanes, off, step);
    }
    for (; r < r1; r += rows_y, off += step) {
      op.template fold<1>(acc, lanes, off, step);
    }
  }
  acc = tree_merge(buf + tx, acc, ty, rows_y, tx_width);
  if (ty == 0 && c0 < channels) {
    typename Op::Lane* dst = partial + static_cast<int64_t>(blockIdx.y) * channels + c0;
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      dst[k] = op.finish(acc, k, c0 + k);
    }
  }
  // The tile's Acc buffer is reused as Lane storage: sizeof(Lane) <= sizeof(Acc).
  static_assert(sizeof(typename Op::Lane) <= sizeof(Acc), "level-2 buffer does not fit");
  const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * tx_width * kV;
  merge_column_if_last(partial, channels, c_begin,
                       static_cast<int>(std::min<int64_t>(static_cast<int64_t>(tx_width) * kV, channels - c_begin)),
                       counters + blockIdx.x, fin, reinterpret_cast<typename Op::Lane*>(smem_raw));
}

// Arrival counters for `columns` level-1 columns, zero on entry to a launch on the current stream: each column's
// last block resets its own, so one zeroed buffer per (device, stream) serves every later launch on that stream
// (kernels of one stream run in order; other streams get their own). While the stream is being captured into a
// CUDA graph the buffer is a fresh zeroed one instead, whose zeroing is captured with the kernel, so every
// replay starts from zero whatever ran on the stream in between.
inline at::Tensor column_counters(int64_t columns, const at::Tensor& like) {
  const auto opts = like.options().dtype(at::kInt);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return at::zeros({columns}, opts);
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from a static destructor can run after the driver has shut down.
  static auto* per_stream = new std::map<std::pair<int, int64_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counters = (*per_stream)[{static_cast<int>(stream.device_index()), static_cast<int64_t>(stream.id())}];
  if (!counters.defined() || counters.numel() < columns) {
    counters = at::zeros({std::max<int64_t>(columns, 256)}, opts);
  }
  return counters;
}

inline unsigned* counter_ptr(const at::Tensor& counters) {
  return reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>());
}

// Runs both levels on the current stream. `like` gives the device for the scratch buffer. numel() must be > 0.
template <class Acc, class Op, class Fin>
void reduce_per_channel(const ChannelView& v, const at::Tensor& like, const Op& op, const Fin& fin) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = 4 * sms;  // enough blocks in flight to saturate memory bandwidth
  const int64_t C = v.channels;
  auto stream = at::cuda::getCurrentCUDAStream();

  int64_t parts;
  dim3 grid, block;
  int64_t span;  // NHWC: rows per block; NCHW: elements of one channel per block
  size_t smem;
  if (v.inner == 1) {
    const int64_t groups = ceil_div(C, kClChannels);
    parts = std::clamp<int64_t>(ceil_div(target_blocks, groups), 1, kMaxParts);
    parts = std::min(parts, std::max<int64_t>(1, ceil_div(v.outer, kClRows * 4)));  // >= 4 rows per thread
    span = ceil_div(v.outer, parts);
    parts = ceil_div(v.outer, span);
    grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(parts));
    block = dim3(kClChannels, kClRows);
    smem = sizeof(Acc) * kClChannels * kClRows;
  } else {
    const int64_t n = v.per_channel();
    TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "resfuse: too many channels (", C, ")");
    parts = std::clamp<int64_t>(ceil_div(target_blocks, C), 1, kMaxParts);
    parts = std::min(parts, std::max<int64_t>(1, ceil_div(n, kThreads * 4)));  // >= 4 elements per thread
    span = ceil_div(n, parts);
    parts = ceil_div(n, span);
    grid = dim3(static_cast<unsigned>(C), static_cast<unsigned>(parts));
    block = dim3(kThreads);
    smem = sizeof(Acc) * kThreads;
  }

  at::Tensor scratch = at::empty({static_cast<int64_t>(parts * C * sizeof(Acc))}, like.options().dtype(at::kByte));
  Acc* partial = reinterpret_cast<Acc*>(scratch.data_ptr<uint8_t>());
  const at::Tensor counters = column_counters(grid.x, like);
  if (v.inner == 1) {
    partial_reduce_cl_kernel<Acc, Op, Fin>
        <<<grid, block, smem, stream>>>(v.outer, C, span, op, partial, counter_ptr(counters), fin);
  } else {
    partial_reduce_planar_kernel<Acc, Op, Fin>
        <<<grid, block, smem, stream>>>(v, span, op, partial, counter_ptr(counters), fin);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// True when every non-null pointer is 16-byte aligned.
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Whether reduce_per_channel_cl_vec can run on `v` with these inputs.
template <typename scalar_t>
bool cl_vec_reduce_ok(const ChannelView& v, std::initializer_list<const void*> inputs) {
  return v.inner == 1 && v.channels % Vec16<scalar_t>::kSize == 0 && aligned16(inputs);
}

// reduce_per_channel for NHWC views with C % VEC == 0 and 16-byte aligned inputs (check cl_vec_reduce_ok).
template <class Op, class Fin>
void reduce_per_channel_cl_vec(const ChannelView& v, const at::Tensor& like, const Op& op, const Fin& fin) {
  using Acc = typename Op::Acc;
  using Lane = typename Op::Lane;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t C = v.channels;
  const int64_t groups = C / Op::kV;
  int tx_log2 = 0;  // threads per row: the smallest power of two covering the row, at most one tile
  const int tile_channels = vec_tile_channels(C);
  while ((int64_t{1} << tx_log2) < groups && (1 << tx_log2) * Op::kV < tile_channels) ++tx_log2;
  const int64_t rows_y = kThreads >> tx_log2;
  const int64_t tiles = ceil_div(groups, int64_t{1} << tx_log2);
  // One wave of kBlocksPerSm blocks per SM; a block's span still gives every thread >= 2 unrolled iterations so
  // the tree merge stays small next to the loads.
  int64_t parts = std::clamp<int64_t>(ceil_div(kBlocksPerSm * sms, tiles), 1, kMaxParts);
  parts = std::min(parts, std::max<int64_t>(1, ceil_div(v.outer, rows_y * Op::kUnroll * 2)));
  const int64_t span = ceil_div(v.outer, parts);
  parts = ceil_div(v.outer, span);
  auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor scratch = at::empty({static_cast<int64_t>(parts * C * sizeof(Lane))}, like.options().dtype(at::kByte));
  Lane* partial = reinterpret_cast<Lane*>(scratch.data_ptr<uint8_t>());
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(parts));
  const at::Tensor counters = column_counters(grid.x, like);
  partial_reduce_cl_vec_kernel<Op, Fin><<<grid, kThreads, sizeof(Acc) * kThreads, stream>>>(
      v.outer, C, span, tx_log2, op, partial, counter_ptr(counters), fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Forward epilogue shared by both ops: out = act((x - center[c])*scale[c] + shift[c] + residual).
// BatchNorm passes (mean, w*invstd, b): the same value as the x*scale + (b - mean*scale) of the contract, without
// its cancellation when |mean| >> std. conv_bn_act passes only shift = bias.
// center / scale / shift / residual may be null; x may alias out (in-place on the conv output).
template <typename scalar_t, typename acc_t>
__global__ void affine_act_kernel(int64_t numel, int64_t channels, int64_t inner, const scalar_t* x, scalar_t* out,
                                  const acc_t* __restrict__ center, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, const scalar_t* __restrict__ residual,
                                  bool relu) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= numel) return;
  ChannelCursor cur(idx, step, inner, channels);
  for (; idx < numel; idx += step, cur.advance()) {
    acc_t y = static_cast<acc_t>(x[idx]);
    if (center != nullptr) y -= center[cur.c];
    if (scale != nullptr) y *= scale[cur.c];
    if (shift != nullptr) y += shift[cur.c];
    if (residual != nullptr) y += static_cast<acc_t>(residual[idx]);
    if (relu && y < acc_t(0)) y = acc_t(0);  // `y < 0` keeps NaN as NaN, like torch.relu
    out[idx] = static_cast<scalar_t>(y);
  }
}

// How the VEC elements of a vector map to channels, for the vector elementwise kernels:
//   kPlane:    one channel (inner % VEC == 0); the cursor runs over vectors with inner / VEC per plane;
//   kRow:      VEC consecutive channels of a row (inner == 1, C % VEC == 0); the cursor runs over channel groups;
//   kRowFixed: kRow where C / VEC divides the grid stride, so a thread keeps one channel group: its per-lane
//              parameters are loaded once, before the loop.
enum class VecMode { kNone, kPlane, kRow, kRowFixed };

struct VecPlan {
  VecMode mode = VecMode::kNone;
  int32_t nvec = 0, inner_v = 0, channels_v = 0;
  unsigned blocks = 0;
};

// The vector plan of `v` for these pointers, or mode kNone (scalar kernel).
template <typename scalar_t>
VecPlan vec_plan(const ChannelView& v, std::initializer_list<const void*> ptrs) {
  constexpr int kV = Vec16<scalar_t>::kSize;
  VecPlan p;
  // The backward kernel indexes coef[3*C + c] in int32.
  if (!aligned16(ptrs) || v.channels > std::numeric_limits<int32_t>::max() / 4) return p;
  int64_t inner_v, channels_v;
  if (v.inner % kV == 0) {
    p.mode = VecMode::kPlane;
    inner_v = v.inner / kV;
    channels_v = v.channels;
  } else if (v.inner == 1 && v.channels % kV == 0) {
    p.mode = kThreads % (v.channels / kV) == 0 ? VecMode::kRowFixed : VecMode::kRow;
    inner_v = 1;
    channels_v = v.channels / kV;
  } else {
    return p;
  }
  const int64_t nvec = v.numel() / kV;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::clamp<int64_t>(ceil_div(nvec, kThreads * kUnroll), 1, kElementwiseBlocksPerSm * sms);
  // int32 indices: j + kUnroll*stride must not overflow.
  if (nvec + (kUnroll + 1) * blocks * kThreads > std::numeric_limits<int32_t>::max()) {
    p.mode = VecMode::kNone;
    return p;
  }
  p.nvec = static_cast<int32_t>(nvec);
  p.inner_v = static_cast<int32_t>(inner_v);
  p.channels_v = static_cast<int32_t>(channels_v);
  p.blocks = static_cast<unsigned>(blocks);
  return p;
}

// Per-lane channel parameters of one vector: kP == 1 for kPlane (one channel), VEC for the row modes.
template <VecMode kMode, int kV>
constexpr int vec_params() {
  return kMode == VecMode::kPlane ? 1 : kV;
}

// Channel of parameter slot p of a vector whose cursor channel is c.
template <VecMode kMode, int kV>
__device__ __forceinline__ int32_t vec_channel(int32_t c, int p) {
  return kMode == VecMode::kPlane ? c : c * kV + p;
}

// affine_act_kernel on vectors (same math and null conventions); loads of kUnroll vectors are all issued before
// the first store because x may alias out.
template <typename scalar_t, typename acc_t, VecMode kMode>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    affine_act_vec_kernel(int32_t nvec, int32_t inner_v, int32_t channels_v, const scalar_t* x, scalar_t* out,
                          const acc_t* __restrict__ center, const acc_t* __restrict__ scale,
                          const acc_t* __restrict__ shift, const scalar_t* __restrict__ residual, bool relu) {
  using V = Vec16<scalar_t>;
  constexpr int kV = V::kSize;
  constexpr int kP = vec_params<kMode, kV>();
  const int32_t stride = static_cast<int32_t>(gridDim.x * blockDim.x);
  int32_t j = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= nvec) return;
  ChannelCursorT<int32_t> cur(j, stride, inner_v, channels_v);
  const V* xv = reinterpret_cast<const V*>(x);
  const V* rv = reinterpret_cast<const V*>(residual);
  V* ov = reinterpret_cast<V*>(out);
  acc_t ce[kP], sc[kP], sh[kP];
  auto load_params = [&](int32_t c) {
#pragma unroll
    for (int p = 0; p < kP; ++p) {
      const int32_t ch = vec_channel<kMode, kV>(c, p);
      ce[p] = center != nullptr ? center[ch] : acc_t(0);
      sc[p] = scale != nullptr ? scale[ch] : acc_t(1);
      sh[p] = shift != nullptr ? shift[ch] : acc_t(0);
    }
  };
  if constexpr (kMode == VecMode::kRowFixed) load_params(cur.c);

  auto run = [&](auto unroll) {
    constexpr int U = decltype(unroll)::value;
    V xin[U], rin[U];
    [[maybe_unused]] int32_t cs[U];  // channels of the U vectors (not needed with kRowFixed)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      xin[u] = xv[j + u * stride];
      if (residual != nullptr) rin[u] = rv[j + u * stride];
      if constexpr (kMode != VecMode::kRowFixed) {
        cs[u] = cur.c;
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if constexpr (kMode != VecMode::kRowFixed) load_params(cs[u]);
      V o;
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        const int p = kP == 1 ? 0 : k;
        acc_t y = (static_cast<acc_t>(xin[u].v[k]) - ce[p]) * sc[p] + sh[p];
        if (residual != nullptr) y += static_cast<acc_t>(rin[u].v[k]);
        if (relu && y < acc_t(0)) y = acc_t(0);  // `y < 0` keeps NaN as NaN, like torch.relu
        o.v[k] = static_cast<scalar_t>(y);
      }
      ov[j + u * stride] = o;
    }
    j += U * stride;
  };
  while (j + (kUnroll - 1) * stride < nvec) run(std::integral_constant<int, kUnroll>{});
  while (j < nvec) run(std::integral_constant<int, 1>{});
}

// Calls f(std::integral_constant<VecMode, mode>) for the plan's (non-kNone) mode.
template <class F>
void dispatch_vec_mode(VecMode mode, const F& f) {
  switch (mode) {
    case VecMode::kPlane:
      f(std::integral_constant<VecMode, VecMode::kPlane>{});
      break;
    case VecMode::kRow:
      f(std::integral_constant<VecMode, VecMode::kRow>{});
      break;
    case VecMode::kRowFixed:
      f(std::integral_constant<VecMode, VecMode::kRowFixed>{});
      break;
    case VecMode::kNone:
      TORCH_CHECK(false, "resfuse: internal error, no vector path for this view");
  }
}

template <typename scalar_t, typename acc_t>
void launch_affine_act(const ChannelView& v, const scalar_t* x, scalar_t* out, const acc_t* center,
                       const acc_t* scale, const acc_t* shift, const scalar_t* residual, bool relu) {
  const int64_t numel = v.numel();
  if (numel == 0) return;
  const VecPlan plan = vec_plan<scalar_t>(v, {x, out, residual});
  if (plan.mode != VecMode::kNone) {
    dispatch_vec_mode(plan.mode, [&](auto mode) {
      affine_act_vec_kernel<scalar_t, acc_t, decltype(mode)::value>
          <<<plan.blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              plan.nvec, plan.inner_v, plan.channels_v, x, out, center, scale, shift, residual, relu);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  affine_act_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          numel, v.channels, v.inner, x, out, center, scale, shift, residual, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// g = grad_out masked by the ReLU when `out` is given, else grad_out: `out <= 0` gives 0, as torch's
// threshold_backward, so the gradient passes where the output is NaN.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad(const scalar_t* grad_out, const scalar_t* out, int64_t idx) {
  const acc_t g = static_cast<acc_t>(grad_out[idx]);
  return (out != nullptr && static_cast<acc_t>(out[idx]) <= acc_t(0)) ? acc_t(0) : g;
}

// Backward elementwise pass shared by both ops, with g = masked_grad(...):
//   grad_residual = g                                   (skipped when null)
//   grad_input = (g - k1 - (x - mean)*m2) * a           (skipped when null; coef = [mean | a | k1 | m2], each [C])
// conv_bn_act's backward uses it with grad_input == null to materialise the masked gradient.
template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(int64_t numel, int64_t channels, int64_t inner,
                                            const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                            const scalar_t* __restrict__ x, const acc_t* __restrict__ coef,
                                            scalar_t* __restrict__ grad_input, scalar_t* __restrict__ grad_residual) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= numel) return;
  ChannelCursor cur(idx, step, inner, channels);
  for (; idx < numel; idx += step, cur.advance()) {
    const acc_t g = masked_grad<scalar_t, acc_t>(grad_out, out, idx);
    if (grad_residual != nullptr) grad_residual[idx] = static_cast<scalar_t>(g);
    if (grad_input != nullptr) {
      const int64_t c = cur.c;
      const acc_t xc = static_cast<acc_t>(x[idx]) - coef[c];
      grad_input[idx] = static_cast<scalar_t>((g - coef[2 * channels + c] - xc * coef[3 * channels + c]) *
                                              coef[channels + c]);
    }
  }
}

// backward_elementwise_kernel on vectors (same math and null conventions).
template <typename scalar_t, typename acc_t, VecMode kMode>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) backward_elementwise_vec_kernel(
    int32_t nvec, int32_t inner_v, int32_t channels_v, int32_t channels, const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const acc_t* __restrict__ coef,
    scalar_t* __restrict__ grad_input, scalar_t* __restrict__ grad_residual) {
  using V = Vec16<scalar_t>;
  constexpr int kV = V::kSize;
  constexpr int kP = vec_params<kMode, kV>();
  const int32_t stride = static_cast<int32_t>(gridDim.x * blockDim.x);
  int32_t j = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= nvec) return;
  ChannelCursorT<int32_t> cur(j, stride, inner_v, channels_v);
  const V* gv = reinterpret_cast<const V*>(grad_out);
  const V* outv = reinterpret_cast<const V*>(out);
  const V* xv = reinterpret_cast<const V*>(x);
  V* giv = reinterpret_cast<V*>(grad_input);
  V* grv = reinterpret_cast<V*>(grad_residual);
  acc_t mean[kP], a[kP], k1[kP], m2[kP];
  auto load_params = [&](int32_t c) {
    if (grad_input == nullptr) return;
#pragma unroll
    for (int p = 0; p < kP; ++p) {
      const int32_t ch = vec_channel<kMode, kV>(c, p);
      mean[p] = coef[ch];
      a[p] = coef[channels + ch];
      k1[p] = coef[2 * channels + ch];
      m2[p] = coef[3 * channels + ch];
    }
  };
  if constexpr (kMode == VecMode::kRowFixed) load_params(cur.c);

  auto run = [&](auto unroll) {
    constexpr int U = decltype(unroll)::value;
    V gin[U], oin[U], xin[U];
    [[maybe_unused]] int32_t cs[U];  // channels of the U vectors (not needed with kRowFixed)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      gin[u] = gv[j + u * stride];
      if (out != nullptr) oin[u] = outv[j + u * stride];
      if (grad_input != nullptr) xin[u] = xv[j + u * stride];
      if constexpr (kMode != VecMode::kRowFixed) {
        cs[u] = cur.c;
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if constexpr (kMode != VecMode::kRowFixed) load_params(cs[u]);
      V gr, gi;
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        const acc_t g0 = static_cast<acc_t>(gin[u].v[k]);
        const acc_t g = (out != nullptr && static_cast<acc_t>(oin[u].v[k]) <= acc_t(0)) ? acc_t(0) : g0;
        gr.v[k] = static_cast<scalar_t>(g);
        if (grad_input != nullptr) {
          const int p = kP == 1 ? 0 : k;
          const acc_t xc = static_cast<acc_t>(xin[u].v[k]) - mean[p];
          gi.v[k] = static_cast<scalar_t>((g - k1[p] - xc * m2[p]) * a[p]);
        }
      }
      if (grad_residual != nullptr) grv[j + u * stride] = gr;
      if (grad_input != nullptr) giv[j + u * stride] = gi;
    }
    j += U * stride;
  };
  // Eight lanes of four coefficients each leave no registers for a second set of three vectors (spills at 80).
  constexpr int kU = kP > 4 ? 1 : kUnroll;
  while (j + (kU - 1) * stride < nvec) run(std::integral_constant<int, kU>{});
  while (j < nvec) run(std::integral_constant<int, 1>{});
}

template <typename scalar_t, typename acc_t>
void launch_backward_elementwise(const ChannelView& v, const scalar_t* grad_out, const scalar_t* out,
                                 const scalar_t* x, const acc_t* coef, scalar_t* grad_input, scalar_t* grad_residual) {
  const int64_t numel = v.numel();
  if (numel == 0) return;
  const VecPlan plan = vec_plan<scalar_t>(v, {grad_out, out, grad_input != nullptr ? x : nullptr, grad_input,
                                              grad_residual});
  if (plan.mode != VecMode::kNone) {
    dispatch_vec_mode(plan.mode, [&](auto mode) {
      backward_elementwise_vec_kernel<scalar_t, acc_t, decltype(mode)::value>
          <<<plan.blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              plan.nvec, plan.inner_v, plan.channels_v, static_cast<int32_t>(v.channels), grad_out, out, x, coef,
              grad_input, grad_residual);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  backward_elementwise_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          numel, v.channels, v.inner, grad_out, out, x, coef, grad_input, grad_residual);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A [C] tensor as `dtype`, contiguous (no copy when it already is).
inline at::Tensor as_channel_vector(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

}  // namespace resfuse::cuda
