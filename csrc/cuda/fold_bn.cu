// CUDA kernel of resfuse::_fold_bn (math and layouts: csrc/fold_bn.h): ONE launch writes both W' and b'.
//
// The GPU eval path of a block folds BN into the conv weight on every call (a cached fold can go stale:
// resfuse/nn/fold.py), so the fold must cost one launch, not the half-dozen of the same math in torch ops.
// A grid-stride loop walks W''s storage in order (coalesced stores), decodes each flat index into
// (o, i, kh, kw) and reads conv_weight through its strides, whatever its layout; the BN parameters and
// running statistics are read in place in their own dtypes (channel_param.cuh). The threads whose index is below
// C_out also write b'. Math in acc_t: fp32, fp64 for fp64 conv weights.
#include "../fold_bn.h"
#include "channel_param.cuh"
#include "channel_view.cuh"

#include <torch/library.h>

namespace resfuse::cuda {
namespace {

// W''s storage order: sizes and conv_weight's strides of the dims from outermost to innermost, and which of
// them is the output channel (0: outermost, 3: innermost; csrc/fold_bn.h's orders have no other).
struct FoldGeometry {
  int64_t size[4];
  int64_t src_stride[4];
  int out_channel_pos;
};

struct FoldParams {
  ChannelParam conv_bias, bn_weight, bn_bias, running_mean, running_var;
};

template <typename acc_t>
__device__ __forceinline__ acc_t fold_scale(const FoldParams& p, int64_t c, acc_t eps) {
  return load_channel<acc_t>(p.bn_weight, c, acc_t(1)) *
         (acc_t(1) / sqrt(load_channel<acc_t>(p.running_var, c, acc_t(1)) + eps));
}

template <typename in_t, typename out_t, typename acc_t>
__global__ void fold_bn_kernel(int64_t numel, int64_t channels, FoldGeometry geo, const in_t* __restrict__ weight,
                               out_t* __restrict__ folded, out_t* __restrict__ bias, FoldParams p, acc_t eps) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t total = numel > channels ? numel : channels;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    if (idx < numel) {
      int64_t rest = idx;
      int64_t src = 0;
      int64_t o = 0;
      for (int k = 3; k >= 0; --k) {
        const int64_t coord = rest % geo.size[k];
        rest /= geo.size[k];
        src += coord * geo.src_stride[k];
        if (k == geo.out_channel_pos) o = coord;
      }
      folded[idx] = static_cast<out_t>(static_cast<acc_t>(weight[src]) * fold_scale<acc_t>(p, o, eps));
    }
    if (idx < channels) {
      const acc_t shift = load_channel<acc_t>(p.conv_bias, idx, acc_t(0)) - load_channel<acc_t>(p.running_mean, idx, acc_t(0));
      bias[idx] = static_cast<out_t>(load_channel<acc_t>(p.bn_bias, idx, acc_t(0)) + shift * fold_scale<acc_t>(p, idx, eps));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> fold_bn_cuda(const at::Tensor& conv_weight,
                                                const std::optional<at::Tensor>& conv_bias,
                                                const std::optional<at::Tensor>& bn_weight,
                                                const std::optional<at::Tensor>& bn_bias,
                                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                                double eps, at::ScalarType dtype, c10::string_view layout) {
  check_fold_bn_args(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, dtype);
  const c10::cuda::CUDAGuard guard(conv_weight.device());
  const FoldOrder order = fold_order(layout);
  auto [folded, bias] = empty_fold_outputs(conv_weight, dtype, order);
  const int64_t numel = conv_weight.numel();
  const int64_t channels = conv_weight.size(0);
  if (std::max(numel, channels) == 0) {
    return {folded, bias};
  }
  FoldGeometry geo{};
  for (int k = 0; k < 4; ++k) {
    geo.size[k] = std::max<int64_t>(conv_weight.size(order[k]), 1);  // a 0 only where no index is decoded
    geo.src_stride[k] = conv_weight.stride(order[k]);
    if (order[k] == 0) geo.out_channel_pos = k;
  }
  const FoldParams params{channel_param(conv_bias), channel_param(bn_weight), channel_param(bn_bias),
                          channel_param(running_mean), channel_param(running_var)};
  const unsigned blocks = static_cast<unsigned>(elementwise_blocks(std::max(numel, channels)));
  RESFUSE_DISPATCH_FLOATING(conv_weight.scalar_type(), "resfuse_fold_bn_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    RESFUSE_DISPATCH_FLOATING(dtype, "resfuse_fold_bn_cuda_out", [&] {
      fold_bn_kernel<in_t, scalar_t, acc_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          numel, channels, geo, conv_weight.data_ptr<in_t>(), folded.data_ptr<scalar_t>(),
          bias.data_ptr<scalar_t>(), params, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {folded, bias};
}

}  // namespace
}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("_fold_bn", &resfuse::cuda::fold_bn_cuda);
}
