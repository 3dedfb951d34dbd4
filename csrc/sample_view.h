// The [N, C, P] sample view (P = H*W) of the ops whose parameters vary per (sample, channel): bn_squeeze (its
// squeeze is a mean per (n, c)) and bn_scale_act (its scale is a factor per (n, c)). Shared by the CPU and CUDA
// kernels, with their argument checks.
//
// An activation made contiguous in x.suggest_memory_format() holds element (n, c, p) at
//   NCHW (contiguous):    (n*C + c)*P + p     one contiguous plane of P positions per (n, c)
//   NHWC (channels_last): (n*P + p)*C + c     one contiguous [P, C] block per sample
// The channel view of csrc/common.h ([outer, C, inner]) folds N into `outer` for NHWC, so it cannot say which
// sample an element belongs to; this view keeps N.
//
// Includes are kept light on purpose: this header is also compiled by nvcc.
#pragma once

#include "common.h"

namespace resfuse {

struct SampleView {
  int64_t samples;    // N
  int64_t channels;   // C
  int64_t positions;  // P = H*W
  bool channels_last;

  int64_t numel() const { return samples * channels * positions; }
  // Elements per channel: BatchNorm's reduction size M = N*P.
  int64_t per_channel() const { return samples * positions; }
};

// `x` must be a 4-D tensor contiguous in `format`.
inline SampleView sample_view(const at::Tensor& x, at::MemoryFormat format) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), format == at::MemoryFormat::ChannelsLast};
}

// A [N, C] matrix of per-(sample, channel) values (a scale, a squeeze, their gradients).
inline void check_per_sample(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": expected ", name,
              " of shape [", x.size(0), ", ", x.size(1), "] (one value per sample and channel), but got shape ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating point tensor, but got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the same device as the input (", x.device(),
              "), but got ", t.device());
}

inline void check_bn_squeeze_args(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var) {
  constexpr const char* op = "resfuse::bn_squeeze";
  check_activation(input, op, "input");
  const int64_t c = input.size(1);
  check_optional_per_channel(running_mean, c, input, op, "running_mean");
  check_optional_per_channel(running_var, c, input, op, "running_var");
  if (present(running_var) && input.numel() > 0) {
    const int64_t n = input.size(0) * input.size(2) * input.size(3);
    TORCH_CHECK(n > 1, op, ": expected more than 1 value per channel when training with running statistics (the "
                "unbiased variance needs n > 1), but got input of shape ", input.sizes(), " (n = N*H*W = ", n, ")");
  }
}

inline void check_bn_squeeze_backward_args(const std::optional<at::Tensor>& grad_squeeze,
                                           const std::optional<at::Tensor>& grad_mean,
                                           const std::optional<at::Tensor>& grad_invstd, const at::Tensor& input,
                                           const at::Tensor& mean, const at::Tensor& invstd,
                                           const at::Tensor& squeeze) {
  constexpr const char* op = "resfuse::_bn_squeeze_backward";
  check_activation(input, op, "input");
  const int64_t c = input.size(1);
  check_per_channel(mean, c, input, op, "mean");
  check_per_channel(invstd, c, input, op, "invstd");
  check_per_sample(squeeze, input, op, "squeeze");
  if (present(grad_squeeze)) check_per_sample(*grad_squeeze, input, op, "grad_squeeze");
  check_optional_per_channel(grad_mean, c, input, op, "grad_mean");
  check_optional_per_channel(grad_invstd, c, input, op, "grad_invstd");
}

inline void check_bn_scale_act_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                                    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& scale,
                                    const char* op) {
  check_activation(input, op, "input");
  const int64_t c = input.size(1);
  check_optional_per_channel(weight, c, input, op, "weight");
  check_optional_per_channel(bias, c, input, op, "bias");
  check_optional_per_channel(mean, c, input, op, "mean");
  check_optional_per_channel(invstd, c, input, op, "invstd");
  if (present(scale)) check_per_sample(*scale, input, op, "scale");
}

// Which of bn_scale_act's (input, weight, bias, mean, invstd, scale, residual) a backward call asks gradients for.
struct ScaleActGrad {
  enum : int { kInput = 0, kWeight, kBias, kMean, kInvstd, kScale, kResidual };
};

inline void check_bn_scale_act_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& mean,
                                             const std::optional<at::Tensor>& invstd,
                                             const std::optional<at::Tensor>& scale, const at::Tensor& out,
                                             std::array<bool, 7> output_mask) {
  constexpr const char* op = "resfuse::_bn_scale_act_backward";
  check_bn_scale_act_args(input, weight, bias, mean, invstd, scale, op);
  check_like(grad_out, input, op, "grad_out", "input");
  check_like(out, input, op, "out", "input");
  const std::pair<int, const std::optional<at::Tensor>*> given[] = {
      {ScaleActGrad::kWeight, &weight}, {ScaleActGrad::kBias, &bias},   {ScaleActGrad::kMean, &mean},
      {ScaleActGrad::kInvstd, &invstd}, {ScaleActGrad::kScale, &scale}};
  for (const auto& [k, t] : given) {
    TORCH_CHECK(!output_mask[k] || present(*t), op, ": output_mask asks for the gradient of argument ", k,
                ", which was not given");
  }
}

}  // namespace resfuse
