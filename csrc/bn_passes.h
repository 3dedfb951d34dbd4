// Argument checks of the pass ops of synchronised BatchNorm (_bn_stats, _bn_act_apply, _bn_act_backward_reduce,
// _bn_act_backward_elemt; schemas in csrc/resfuse.cpp), shared by their CPU and CUDA kernels.
#pragma once

#include "common.h"

namespace resfuse {

// The statistics a pass op is given: [C] vectors in the accumulation dtype, on the input's device.
inline void check_pass_stats(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                             const char* op) {
  check_activation(input, op, "input");
  check_per_channel(mean, input.size(1), input, op, "mean");
  check_per_channel(invstd, input.size(1), input, op, "invstd");
}

inline void check_bn_act_apply_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "resfuse::_bn_act_apply";
  check_pass_stats(input, mean, invstd, op);
  check_optional_per_channel(weight, input.size(1), input, op, "weight");
  check_optional_per_channel(bias, input.size(1), input, op, "bias");
  if (present(residual)) {
    check_like(*residual, input, op, "residual", "input");
  }
}

inline void check_bn_act_backward_pass_args(const at::Tensor& grad_out, const at::Tensor& input,
                                            const at::Tensor& out, const at::Tensor& mean,
                                            const at::Tensor& invstd, const char* op) {
  check_pass_stats(input, mean, invstd, op);
  check_like(grad_out, input, op, "grad_out", "input");
  check_like(out, input, op, "out", "input");
}

// grad_means: the global [sum g | sum g*xhat] over the global count, 2C values.
inline void check_grad_means(const at::Tensor& grad_means, const at::Tensor& input, const char* op) {
  const int64_t c = input.size(1);
  TORCH_CHECK(grad_means.dim() == 1 && grad_means.size(0) == 2 * c, op, ": expected grad_means of shape [", 2 * c,
              "] (2 x channels), but got shape ", grad_means.sizes());
  TORCH_CHECK(at::isFloatingType(grad_means.scalar_type()), op, ": grad_means must be a floating point tensor, but "
              "got ", grad_means.scalar_type());
  TORCH_CHECK(grad_means.device() == input.device(), op, ": grad_means must be on the same device as the input (",
              input.device(), "), but got ", grad_means.device());
}

}  // namespace resfuse
