// Host-side rules of resfuse::bn_eval_act and resfuse::_bn_eval_act_backward shared by their CPU
// (csrc/cpu/bn_eval_act.cpp) and CUDA (csrc/cuda/bn_eval_act.cu) kernels: the argument checks.
//
// The op is eval-mode BatchNorm from the running statistics, + residual, + ReLU:
//   out = act((x - running_mean) * rsqrt(running_var + eps) * weight + bias [+ residual])
// Its backward is the same math's gradients with the statistics constant (they are buffers):
//   g = relu ? (out <= 0 ? 0 : grad_out) : grad_out      (torch's threshold_backward: NaN outputs pass g)
//   grad_input = g * weight * invstd;  grad_weight = sum g * (x - mean) * invstd;  grad_bias = sum g;
//   grad_residual = g
#pragma once

#include "common.h"

namespace resfuse {

inline void check_bn_eval_act_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   const at::Tensor& running_mean, const at::Tensor& running_var) {
  constexpr const char* op = "resfuse::bn_eval_act";
  check_activation(input, op, "input");
  const int64_t c = input.size(1);
  check_optional_per_channel(weight, c, input, op, "weight");
  check_optional_per_channel(bias, c, input, op, "bias");
  TORCH_CHECK(running_mean.defined() && running_var.defined(), op,
              ": running_mean and running_var are required (eval-mode BatchNorm normalises with them)");
  check_per_channel(running_mean, c, input, op, "running_mean");
  check_per_channel(running_var, c, input, op, "running_var");
  if (present(residual)) {
    check_like(*residual, input, op, "residual", "input");
  }
}

inline void check_bn_eval_act_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& out,
                                            const at::Tensor& running_mean, const at::Tensor& running_var) {
  constexpr const char* op = "resfuse::_bn_eval_act_backward";
  check_activation(input, op, "input");
  check_like(grad_out, input, op, "grad_out", "input");
  check_like(out, input, op, "out", "input");
  const int64_t c = input.size(1);
  check_optional_per_channel(weight, c, input, op, "weight");
  check_per_channel(running_mean, c, input, op, "running_mean");
  check_per_channel(running_var, c, input, op, "running_var");
}

}  // namespace resfuse
