// CUDA building blocks of the ops on the [N, C, P] sample view (csrc/sample_view.h): bn_squeeze and
// bn_scale_act.
//
// * reduce_per_sample: one accumulator per (sample, channel) over its P positions, in one launch, each (n, c)
//   reduced inside one block in a fixed order (deterministic, no atomics, no host synchronisation):
//     NCHW: one warp per (n, c) plane, lanes over positions (coalesced), kPlaneWarps planes per block;
//     NHWC: a block holds kRowChannels consecutive channels of one sample, kRowLanes threads per channel over
//           positions, so a warp reads 32 consecutive channels of a row.
//   The op functor folds element idx of (n, c) into the accumulator (and may write element idx: the backward
//   writes its gradients in the same pass); the finaliser stores each (n, c)'s result.
// * for_each_sample_element: an elementwise grid-stride loop that hands the functor (idx, n, c).
// * for_each_channel: one thread per channel, for the per-channel finalisers that walk the [N, C] results.
// Accumulators (Welford, Sum2 of channel_view.cuh) are fp32, fp64 for float64 inputs. These are the plain,
// general kernels; no vector paths yet (unmeasured on a GPU).
#pragma once

#include "../sample_view.h"
#include "channel_view.cuh"

namespace resfuse::cuda {

constexpr int kPlaneWarps = 8;
constexpr int kRowChannels = 32;
constexpr int kRowLanes = 8;

template <class Acc, class Op, class Fin>
__global__ void plane_reduce_kernel(int64_t planes, int64_t channels, int64_t positions, Op op, Fin fin) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* buf = reinterpret_cast<Acc*>(smem_raw);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kPlaneWarps + warp;  // the plane n*C + c
  const int64_t n = j / channels, c = j - n * channels;
  Acc acc;
  if (j < planes) {
    for (int64_t p = lane; p < positions; p += 32) op(acc, j * positions + p, n, c);
  }
  acc = tree_merge(buf + warp * 32, acc, lane, 32, 1);
  if (lane == 0 && j < planes) fin(n, c, acc);
}

template <class Acc, class Op, class Fin>
__global__ void row_reduce_kernel(int64_t channels, int64_t positions, Op op, Fin fin) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* buf = reinterpret_cast<Acc*>(smem_raw);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowChannels + threadIdx.x;
  const int64_t n = blockIdx.y;
  Acc acc;
  if (c < channels) {
    for (int64_t p = threadIdx.y; p < positions; p += kRowLanes) op(acc, (n * positions + p) * channels + c, n, c);
  }
  acc = tree_merge(buf + threadIdx.x, acc, static_cast<int>(threadIdx.y), kRowLanes, kRowChannels);
  if (threadIdx.y == 0 && c < channels) fin(n, c, acc);
}

template <class Acc, class Op, class Fin>
void reduce_per_sample(const SampleView& v, const Op& op, const Fin& fin) {
  if (v.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (v.channels_last) {
    TORCH_CHECK(v.samples <= 65535, "resfuse: batches of more than 65535 samples are not supported here (got ",
                v.samples, ")");
    const dim3 grid(static_cast<unsigned>(ceil_div(v.channels, kRowChannels)), static_cast<unsigned>(v.samples));
    const dim3 block(kRowChannels, kRowLanes);
    row_reduce_kernel<Acc, Op, Fin>
        <<<grid, block, sizeof(Acc) * kRowChannels * kRowLanes, stream>>>(v.channels, v.positions, op, fin);
  } else {
    const int64_t planes = v.samples * v.channels;
    const int64_t blocks = ceil_div(planes, kPlaneWarps);
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "resfuse: too many (sample, channel) planes (",
                planes, ")");
    plane_reduce_kernel<Acc, Op, Fin><<<static_cast<unsigned>(blocks), kPlaneWarps * 32,
                                        sizeof(Acc) * kPlaneWarps * 32, stream>>>(planes, v.channels, v.positions,
                                                                                  op, fin);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F>
__global__ void sample_elementwise_kernel(int64_t numel, int64_t channels, int64_t positions, bool channels_last,
                                          F fn) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += step) {
    int64_t n, c;
    if (channels_last) {
      const int64_t row = idx / channels;  // n*P + p
      c = idx - row * channels;
      n = row / positions;
    } else {
      const int64_t plane = idx / positions;  // n*C + c
      n = plane / channels;
      c = plane - n * channels;
    }
    fn(idx, n, c);
  }
}

// fn(idx, n, c) once per element; fn must only write element idx.
template <class F>
void for_each_sample_element(const SampleView& v, const F& fn) {
  const int64_t numel = v.numel();
  if (numel == 0) return;
  sample_elementwise_kernel<F>
      <<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          numel, v.channels, v.positions, v.channels_last, fn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F>
__global__ void channel_kernel(int64_t channels, F fn) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < channels) fn(c);
}

// fn(c) once per channel, one thread each (the finalisers: a loop over N per thread, reads coalesced over c).
template <class F>
void for_each_channel(int64_t channels, const F& fn) {
  if (channels == 0) return;
  channel_kernel<F><<<static_cast<unsigned>(ceil_div(channels, kThreads)), kThreads, 0,
                      at::cuda::getCurrentCUDAStream()>>>(channels, fn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A tensor as a contiguous one of `dtype`, or nullptr's stand-in (undefined) when absent.
inline at::Tensor as_acc_or_undefined(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return present(t) ? t->to(dtype).contiguous() : at::Tensor();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace resfuse::cuda
