// CUDA kernels of resfuse::bn_eval_act and resfuse::_bn_eval_act_backward (math: csrc/bn_eval_act.h).
//
// Forward, two launches: one thread per channel turns the running statistics and the affine parameters (read in
// place, any float dtype: channel_param.cuh) into [center | scale | shift] in acc_t, then channel_view.cuh's
// affine_act pass (vectorised where the view allows) writes out = act((x - center)*scale + shift + residual).
// Backward: the same per-channel launch gives [mean | a = w*invstd | invstd]; grad_weight / grad_bias come from
// one two-level reduction (reduce_per_channel) of sum g and sum g*(x - mean), and grad_input = g*a and
// grad_residual = g from one elementwise pass that reads neither x nor the sums (an Inf in x leaves grad_input
// finite, as in eager). g follows torch's threshold_backward: zero where out <= 0, so a NaN output passes
// grad_out on; bn_act's reduction and elementwise kernels zero it there instead, which is why the passes over g
// are this file's own (scalar: eval-mode backward is off the GPU hot path, where blocks fold BN into the conv).
// Accumulation in fp32 (fp64 for float64 inputs).
#include "../bn_eval_act.h"
#include "channel_param.cuh"
#include "channel_view.cuh"

#include <torch/library.h>

namespace resfuse::cuda {
namespace {

// Per channel c: center = running_mean, scale = w / sqrt(running_var + eps), shift = b, invstd; each output
// pointer may be null (not written).
template <typename acc_t>
__global__ void eval_coefficients_kernel(int64_t channels, ChannelParam running_mean, ChannelParam running_var,
                                         ChannelParam weight, ChannelParam bias, acc_t eps, acc_t* center,
                                         acc_t* scale, acc_t* shift, acc_t* invstd_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const acc_t invstd = acc_t(1) / sqrt(load_channel<acc_t>(running_var, c, acc_t(1)) + eps);
  if (center != nullptr) center[c] = load_channel<acc_t>(running_mean, c, acc_t(0));
  if (scale != nullptr) scale[c] = load_channel<acc_t>(weight, c, acc_t(1)) * invstd;
  if (shift != nullptr) shift[c] = load_channel<acc_t>(bias, c, acc_t(0));
  if (invstd_out != nullptr) invstd_out[c] = invstd;
}

template <typename acc_t>
void launch_eval_coefficients(int64_t channels, const at::Tensor& running_mean, const at::Tensor& running_var,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              double eps, acc_t* center, acc_t* scale, acc_t* shift, acc_t* invstd) {
  eval_coefficients_kernel<acc_t>
      <<<static_cast<unsigned>(ceil_div(channels, kThreads)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          channels, channel_param(running_mean), channel_param(running_var), channel_param(weight),
          channel_param(bias), static_cast<acc_t>(eps), center, scale, shift, invstd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// g through ReLU as torch's threshold_backward gives it; `out` null: no ReLU.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t relu_grad(const scalar_t* grad_out, const scalar_t* out, int64_t idx) {
  const acc_t g = static_cast<acc_t>(grad_out[idx]);
  return (out != nullptr && static_cast<acc_t>(out[idx]) <= acc_t(0)) ? acc_t(0) : g;
}

// reduce_per_channel's op: a += g, b += g*(x - mean) (x null: grad_weight not asked, b stays 0).
template <typename scalar_t, typename acc_t>
struct EvalGradSums {
  const scalar_t* grad_out;
  const scalar_t* out;  // nullable: no ReLU
  const scalar_t* x;    // nullable
  const acc_t* mean;

  __device__ __forceinline__ void operator()(Sum2<acc_t>& acc, int64_t idx, int64_t c) const {
    const acc_t g = relu_grad<scalar_t, acc_t>(grad_out, out, idx);
    acc.a += g;
    if (x != nullptr) acc.b += g * (static_cast<acc_t>(x[idx]) - mean[c]);
  }
};

// Per channel: grad_weight = invstd * sum g*(x - mean), grad_bias = sum g, in their own dtype.
template <typename acc_t>
struct EvalGradFinalize {
  const acc_t* invstd;
  ChannelOut grad_weight;
  ChannelOut grad_bias;

  __device__ void operator()(int64_t c, const Sum2<acc_t>& s) const {
    store_channel(grad_weight, c, s.b * invstd[c]);
    store_channel(grad_bias, c, s.a);
  }
};

// grad_residual = g and grad_input = g*a[c] (each skipped when null).
template <typename scalar_t, typename acc_t>
__global__ void eval_backward_elementwise_kernel(int64_t numel, int64_t channels, int64_t inner,
                                                 const scalar_t* __restrict__ grad_out,
                                                 const scalar_t* __restrict__ out, const acc_t* __restrict__ a,
                                                 scalar_t* __restrict__ grad_input,
                                                 scalar_t* __restrict__ grad_residual) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= numel) return;
  ChannelCursor cur(idx, step, inner, channels);
  for (; idx < numel; idx += step, cur.advance()) {
    const acc_t g = relu_grad<scalar_t, acc_t>(grad_out, out, idx);
    if (grad_residual != nullptr) grad_residual[idx] = static_cast<scalar_t>(g);
    if (grad_input != nullptr) grad_input[idx] = static_cast<scalar_t>(g * a[cur.c]);
  }
}

at::Tensor bn_eval_act_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool relu) {
  check_bn_eval_act_args(input, weight, bias, residual, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return out;
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const at::Tensor coef = at::empty({3 * C}, input.options().dtype(accumulate_dtype(input)));

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_eval_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* center = coef.data_ptr<acc_t>();
    acc_t* shift = present(bias) ? center + 2 * C : nullptr;
    launch_eval_coefficients<acc_t>(C, running_mean, running_var, weight, bias, eps, center, center + C, shift,
                                    nullptr);
    launch_affine_act<scalar_t, acc_t>(v, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), center, center + C,
                                       shift, res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_eval_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& out, const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool relu,
    std::array<bool, 4> output_mask) {
  check_bn_eval_act_backward_args(grad_out, input, weight, out, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(go, format);
  const int64_t C = v.channels;

  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;  // assigned inside the dispatch lambda below
  std::tie(grad_input, grad_weight, grad_bias, grad_residual) =
      bn_backward_outputs(input, param_dtype(weight), format, output_mask);
  if (go.numel() == 0) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  const at::Tensor x = output_mask[1] ? input.contiguous(format) : at::Tensor();  // read only for grad_weight
  const at::Tensor coef = at::empty({3 * C}, input.options().dtype(accumulate_dtype(input)));

  RESFUSE_DISPATCH_FLOATING(go.scalar_type(), "resfuse_bn_eval_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean = coef.data_ptr<acc_t>();
    acc_t* a = mean + C;
    acc_t* invstd = mean + 2 * C;
    launch_eval_coefficients<acc_t>(C, running_mean, running_var, weight, std::nullopt, eps, mean, a, nullptr,
                                    invstd);
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = relu ? o.data_ptr<scalar_t>() : nullptr;
    if (output_mask[1] || output_mask[2]) {
      const EvalGradSums<scalar_t, acc_t> sums{gp, op, x.defined() ? x.data_ptr<scalar_t>() : nullptr, mean};
      const EvalGradFinalize<acc_t> fin{invstd, channel_out(grad_weight, output_mask[1]),
                                        channel_out(grad_bias, output_mask[2])};
      reduce_per_channel<Sum2<acc_t>>(v, go, sums, fin);
    }
    if (output_mask[0] || output_mask[3]) {
      const int64_t numel = v.numel();
      eval_backward_elementwise_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              numel, C, v.inner, gp, op, a, output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
              output_mask[3] ? grad_residual.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace
}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_eval_act", &resfuse::cuda::bn_eval_act_cuda);
  m.impl("_bn_eval_act_backward", &resfuse::cuda::bn_eval_act_backward_cuda);
}
