// CUDA building blocks shared by the resfuse CUDA kernels, all on the [outer, C, inner] view of csrc/common.h.
//
// * ChannelCursor: walks a grid-stride loop over flat indices and keeps track of the channel of the current
//   element without a 64-bit division per element.
// * Per-channel reductions, deterministic and without host synchronisation, in two levels:
//     level 1: every block reduces a tile of the reduction space of its channels into one partial accumulator per
//              channel (partial[block_row][C]);
//     level 2: one warp per channel merges that channel's partials in a fixed order and hands the result to a
//              finaliser functor, which writes the per-channel outputs.
//   Layout-specific level-1 kernels keep global loads coalesced:
//     NHWC (inner == 1): threadIdx.x runs over 32 consecutive channels, threadIdx.y over rows;
//     NCHW (inner > 1):  one channel per blockIdx.x, the threads run over its (o, i) positions, i fastest.
//   The reduction order depends only on the shape and the device's SM count, so results are bit-reproducible.
// Accumulators are fp32 (fp64 for float64 inputs): acc_t = at::opmath_type<scalar_t>.
#pragma once

#include "../common.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

namespace resfuse::cuda {

constexpr int kThreads = 256;      // elementwise kernels and NCHW reductions
constexpr int kWarp = 32;
constexpr int kClChannels = 32;    // NHWC reduction block: channels (x) ...
constexpr int kClRows = 8;         // ... by rows (y)
constexpr int kFinWarps = 8;       // level-2 reduction: channels per block, one warp each
constexpr int64_t kMaxParts = 1024;  // upper bound on level-1 partials per channel

// ---------------------------------------------------------------------------------------------------------------
// Accumulators: default-constructed empty, merge() is associative (results depend on the merge order only
// through rounding, and that order is fixed).

// Welford/Chan accumulator of (count, mean, M2 = sum of squared deviations).
template <typename T>
struct Welford {
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
  T a = T(0);
  T b = T(0);

  __device__ __forceinline__ void merge(const Sum2& o) {
    a += o.a;
    b += o.b;
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
struct ChannelCursor {
  int64_t i, c;                 // position in the plane, channel
  int64_t step_i, step_c;       // step % inner, (step / inner) % C
  int64_t inner, channels;

  __device__ __forceinline__ ChannelCursor(int64_t idx, int64_t step, int64_t inner_, int64_t channels_)
      : inner(inner_), channels(channels_) {
    const int64_t q = idx / inner;
    i = idx - q * inner;
    c = q % channels;
    const int64_t sq = step / inner;
    step_i = step - sq * inner;
    step_c = sq % channels;
  }

  __device__ __forceinline__ void advance() {
    i += step_i;
    int64_t carry = 0;
    if (i >= inner) {
      i -= inner;
      carry = 1;
    }
    c += step_c + carry;  // < 2*C, so one wrap suffices
    if (c >= channels) c -= channels;
  }
};

// Grid of a grid-stride elementwise loop over `numel` elements.
inline int64_t elementwise_blocks(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(ceil_div(numel, kThreads), sms * 16));
}

// ---------------------------------------------------------------------------------------------------------------
// Level 1. `op(acc, idx, c)` folds element idx (of channel c) into acc; it may also write element idx.

template <class Acc, class Op>
__global__ void partial_reduce_cl_kernel(int64_t rows, int64_t channels, int64_t rows_per_block, Op op,
                                         Acc* __restrict__ partial) {
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
}

template <class Acc, class Op>
__global__ void partial_reduce_planar_kernel(ChannelView v, int64_t tile, Op op, Acc* __restrict__ partial) {
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
}

// Level 2: warp threadIdx.y merges the partials of channel c; `fin(c, acc)` writes the per-channel results.
template <class Acc, class Fin>
__global__ void finalize_reduce_kernel(int64_t channels, int64_t parts, const Acc* __restrict__ partial, Fin fin) {
  // Raw storage: __shared__ variables cannot have constructors.
  __shared__ __align__(16) unsigned char fin_raw[sizeof(Acc) * kFinWarps * kWarp];
  Acc* buf = reinterpret_cast<Acc*>(fin_raw);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinWarps + threadIdx.y;
  Acc acc;
  if (c < channels) {
    for (int64_t p = threadIdx.x; p < parts; p += kWarp) {
      acc.merge(partial[p * channels + c]);
    }
  }
  acc = tree_merge(buf + threadIdx.y * kWarp, acc, threadIdx.x, kWarp, 1);
  if (threadIdx.x == 0 && c < channels) {
    fin(c, acc);
  }
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
  if (v.inner == 1) {
    partial_reduce_cl_kernel<Acc, Op><<<grid, block, smem, stream>>>(v.outer, C, span, op, partial);
  } else {
    partial_reduce_planar_kernel<Acc, Op><<<grid, block, smem, stream>>>(v, span, op, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 fin_grid(static_cast<unsigned>(ceil_div(C, kFinWarps)));
  finalize_reduce_kernel<Acc, Fin><<<fin_grid, dim3(kWarp, kFinWarps), 0, stream>>>(C, parts, partial, fin);
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

template <typename scalar_t, typename acc_t>
void launch_affine_act(const ChannelView& v, const scalar_t* x, scalar_t* out, const acc_t* center,
                       const acc_t* scale, const acc_t* shift, const scalar_t* residual, bool relu) {
  const int64_t numel = v.numel();
  if (numel == 0) return;
  affine_act_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          numel, v.channels, v.inner, x, out, center, scale, shift, residual, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// g = grad_out * (out > 0) when `out` is given (ReLU), else grad_out.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad(const scalar_t* grad_out, const scalar_t* out, int64_t idx) {
  const acc_t g = static_cast<acc_t>(grad_out[idx]);
  return (out != nullptr && !(static_cast<acc_t>(out[idx]) > acc_t(0))) ? acc_t(0) : g;
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

template <typename scalar_t, typename acc_t>
void launch_backward_elementwise(const ChannelView& v, const scalar_t* grad_out, const scalar_t* out,
                                 const scalar_t* x, const acc_t* coef, scalar_t* grad_input, scalar_t* grad_residual) {
  const int64_t numel = v.numel();
  if (numel == 0) return;
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
