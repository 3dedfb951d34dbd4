// CPU kernels of resfuse::bn_eval_act and resfuse::_bn_eval_act_backward (math: csrc/bn_eval_act.h).
//
// The eval path of a CPU block: ATen's convolution on the raw weight, then this one pass of eval BatchNorm +
// residual + ReLU over its output, so no pass over the weights (no BN fold) is made on any call.
// Forward: per channel in double, center = running_mean, scale = weight / sqrt(running_var + eps), shift = bias,
// then affine_act's pass out = act((x - center) * scale + shift + residual) (csrc/cpu/channel_view.h) in float
// (double for float64 inputs).
// Backward: one reduction for grad_weight / grad_bias (sums in double), one elementwise pass for grad_input and
// grad_residual; grad_input = g * (weight * invstd) reads neither x nor the sums, so an Inf in x does not turn it
// into NaN (as in eager's eval-mode backward).
// Layouts: NCHW and NHWC both run on the [outer, C, inner] view (csrc/common.h).
#include "../bn_eval_act.h"
#include "channel_view.h"

#include <torch/library.h>

#include <cmath>

namespace resfuse::cpu {
namespace {

// 1 / sqrt(running_var + eps) per channel, in double.
std::vector<double> eval_invstd(const at::Tensor& running_var, double eps) {
  std::vector<double> invstd = to_doubles(running_var);
  for (double& v : invstd) {
    v = 1.0 / std::sqrt(v + eps);
  }
  return invstd;
}

at::Tensor bn_eval_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool relu) {
  check_bn_eval_act_args(input, weight, bias, residual, running_mean, running_var);
  const int64_t C = input.size(1);
  std::vector<double> scale = eval_invstd(running_var, eps);
  const std::vector<double> w = to_doubles_or(weight, C, 1.0);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] *= w[c];
  }
  return affine_act_pass(input, to_doubles(running_mean), scale, to_doubles_or(bias, C, 0.0), residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_eval_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& out, const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool relu,
    std::array<bool, 4> output_mask) {
  check_bn_eval_act_backward_args(grad_out, input, weight, out, running_mean, running_var);
  const auto format = input.suggest_memory_format();
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(go, format);
  const int64_t C = v.channels;
  const at::ScalarType pdtype = param_dtype(weight);

  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;  // assigned inside the dispatch lambda below
  std::tie(grad_input, grad_weight, grad_bias, grad_residual) = bn_backward_outputs(input, pdtype, format, output_mask);
  if (go.numel() == 0) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  const std::vector<double> invstd = eval_invstd(running_var, eps);
  // x is read only for grad_weight.
  const at::Tensor x = output_mask[1] ? input.contiguous(format) : at::Tensor();

  RESFUSE_DISPATCH_FLOATING(go.scalar_type(), "resfuse_bn_eval_act_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = relu ? o.data_ptr<scalar_t>() : nullptr;

    if (output_mask[1] || output_mask[2]) {
      const std::vector<double> mean = to_doubles(running_mean);
      const double* mp = mean.data();
      const scalar_t* xp = output_mask[1] ? x.data_ptr<scalar_t>() : nullptr;
      // [sum g | sum g*(x - mean)]; invstd is applied once per channel afterwards.
      std::vector<double> sums = reduce_per_channel<2>(v, [=](int64_t c, int64_t idx, double* acc) {
        const double g = static_cast<double>(relu_grad(gp, op, idx));
        acc[c] += g;
        if (xp != nullptr) {
          acc[C + c] += g * (static_cast<double>(xp[idx]) - mp[c]);
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        sums[C + c] *= invstd[c];
      }
      if (output_mask[1]) grad_weight = from_doubles(sums, C, C, pdtype);
      if (output_mask[2]) grad_bias = from_doubles(sums, 0, C, pdtype);
    }

    if (output_mask[0] || output_mask[3]) {
      const std::vector<double> w = to_doubles_or(weight, C, 1.0);
      std::vector<opmath_t> a(C);
      for (int64_t c = 0; c < C; ++c) {
        a[c] = static_cast<opmath_t>(w[c] * invstd[c]);
      }
      const opmath_t* ap = a.data();
      scalar_t* gi = output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
      scalar_t* gr = output_mask[3] ? grad_residual.data_ptr<scalar_t>() : nullptr;
      parallel_for_each(v, [=](int64_t c, int64_t idx) {
        const opmath_t g = relu_grad(gp, op, idx);
        if (gr != nullptr) {
          gr[idx] = static_cast<scalar_t>(g);
        }
        if (gi != nullptr) {
          gi[idx] = static_cast<scalar_t>(g * ap[c]);
        }
      });
    }
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace
}  // namespace resfuse::cpu

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_eval_act", &resfuse::cpu::bn_eval_act_cpu);
  m.impl("_bn_eval_act_backward", &resfuse::cpu::bn_eval_act_backward_cpu);
}
