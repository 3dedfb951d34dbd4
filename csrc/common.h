// Host-side helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of the resfuse ops:
// the [outer, C, inner] channel view, argument validation, dtype dispatch and output allocation.
//
// Every kernel works on its activation made contiguous in x.suggest_memory_format(). Both 4-D layouts are then
// the same 3-D view [outer, C, inner], element (o, c, i) at offset (o*C + c)*inner + i:
//   NCHW (contiguous):    outer = N,     inner = H*W
//   NHWC (channels_last): outer = N*H*W, inner = 1
// so one code path per kernel serves both layouts.
//
// Includes are kept light on purpose: this header is also compiled by nvcc.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

// The four activation dtypes of the contract.
#define RESFUSE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace resfuse {

struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;

  int64_t numel() const { return outer * channels * inner; }
  // Elements per channel: the BatchNorm reduction size n = N*H*W.
  int64_t per_channel() const { return outer * inner; }
};

// `x` must be a 4-D tensor contiguous in `format`.
inline ChannelView channel_view(const at::Tensor& x, at::MemoryFormat format) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  if (format == at::MemoryFormat::ChannelsLast) {
    return {n * hw, c, 1};
  }
  return {n, c, hw};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulation dtype of the contract: fp32, or fp64 for float64 activations.
inline at::ScalarType accumulate_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// dtype of grad_weight / grad_bias: the weight's, float32 when there is no weight.
inline at::ScalarType param_dtype(const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A fresh activation-shaped tensor laid out in `format`.
inline at::Tensor empty_activation(at::IntArrayRef sizes, const at::Tensor& like, at::MemoryFormat format) {
  return at::empty(sizes, like.options().memory_format(format));
}

// What an output that output_mask did not ask for is returned as.
inline at::Tensor not_requested(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

// ---------------------------------------------------------------------------------------------------------------
// Argument validation shared by the CPU and CUDA kernels (messages name the op and the argument).

inline void check_activation(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(x.dim() == 4, op, ": expected ", name, " to be a 4-D (N, C, H, W) tensor, but got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, but got ", t);
}

// `t` must match `ref` in shape, dtype and device (residuals, gradients and saved outputs of activations).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the same shape as ", ref_name, " ", ref.sizes(),
              ", but got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the same dtype as ", ref_name, " (",
              ref.scalar_type(), "), but got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), but got ", t.device());
}

// A per-channel vector of shape [C] (weight, bias, running stats, saved statistics).
inline void check_per_channel(const at::Tensor& t, int64_t channels, const at::Tensor& x, const char* op,
                              const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": expected ", name, " of shape [", channels,
              "] (one value per channel), but got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating point tensor, but got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the same device as the input (", x.device(),
              "), but got ", t.device());
}

inline void check_optional_per_channel(const std::optional<at::Tensor>& t, int64_t channels, const at::Tensor& x,
                                       const char* op, const char* name) {
  if (present(t)) {
    check_per_channel(*t, channels, x, op, name);
  }
}

inline void check_bn_act_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var) {
  constexpr const char* op = "resfuse::bn_act";
  check_activation(input, op, "input");
  const int64_t c = input.size(1);
  check_optional_per_channel(weight, c, input, op, "weight");
  check_optional_per_channel(bias, c, input, op, "bias");
  check_optional_per_channel(running_mean, c, input, op, "running_mean");
  check_optional_per_channel(running_var, c, input, op, "running_var");
  if (present(residual)) {
    check_like(*residual, input, op, "residual", "input");
  }
  if (present(running_var) && input.numel() > 0) {
    const int64_t n = input.size(0) * input.size(2) * input.size(3);
    TORCH_CHECK(n > 1, op, ": expected more than 1 value per channel when training with running statistics (the "
                "unbiased variance needs n > 1), but got input of shape ", input.sizes(), " (n = N*H*W = ", n, ")");
  }
}

inline void check_bn_act_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& out,
                                       const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  constexpr const char* op = "resfuse::_bn_act_backward";
  check_activation(input, op, "input");
  check_like(grad_out, input, op, "grad_out", "input");
  check_like(out, input, op, "out", "input");
  const int64_t c = input.size(1);
  check_optional_per_channel(weight, c, input, op, "weight");
  check_per_channel(save_mean, c, input, op, "save_mean");
  check_per_channel(save_invstd, c, input, op, "save_invstd");
}

inline void check_conv_args(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const char* op) {
  check_activation(input, op, "input");
  TORCH_CHECK(weight.defined() && weight.dim() == 4, op, ": expected weight to be a 4-D (C_out, C_in/groups, kH, kW) "
              "tensor, but got shape ", weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight must have the same dtype as the input (",
              input.scalar_type(), "), but got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight must be on the same device as the input (",
              input.device(), "), but got ", weight.device());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(groups > 0, op, ": groups must be positive, but got ", groups);
}

// The residual of conv_bn_act is added to the convolution output, so it must match that.
inline void check_conv_residual(const std::optional<at::Tensor>& residual, const at::Tensor& conv_out,
                                const char* op) {
  if (present(residual)) {
    check_like(*residual, conv_out, op, "residual", "the convolution output");
  }
}

inline void check_conv_bn_act_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                            const at::Tensor& weight, const at::Tensor& out, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "resfuse::_conv_bn_act_backward";
  check_conv_args(input, weight, stride, padding, dilation, groups, op);
  check_activation(out, op, "out");
  check_like(grad_out, out, op, "grad_out", "out");
  TORCH_CHECK(out.size(1) == weight.size(0), op, ": out must have weight.size(0) = ", weight.size(0),
              " channels, but got ", out.size(1));
}

// ---------------------------------------------------------------------------------------------------------------
// Outputs of the backward ops, shared by the CPU and CUDA kernels.

// _bn_act_backward's (grad_input, grad_weight, grad_bias, grad_residual): activations allocated in `format`
// where output_mask asks for them, empty tensors where it does not. grad_weight/grad_bias start as zeros so an
// empty input (where no kernel runs) returns zeros; otherwise the caller replaces them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_outputs(
    const at::Tensor& input, at::ScalarType pdtype, at::MemoryFormat format, std::array<bool, 4> output_mask) {
  auto activation = [&](bool wanted) {
    return wanted ? empty_activation(input.sizes(), input, format) : not_requested(input, input.scalar_type());
  };
  // Zeros only for an empty batch (nothing is summed); otherwise the kernels write every channel, and a fill
  // would be one more launch per output.
  auto param = [&](bool wanted) {
    if (!wanted) return not_requested(input, pdtype);
    const auto opts = input.options().dtype(pdtype);
    return input.numel() == 0 ? at::zeros({input.size(1)}, opts) : at::empty({input.size(1)}, opts);
  };
  return {activation(output_mask[0]), param(output_mask[1]), param(output_mask[2]), activation(output_mask[3])};
}

// grad_input and grad_weight of a convolution, given the gradient g of its output, through ATen. The backend
// picks the layouts of its results; they are pinned to the input's and the weight's so they do not depend on it.
inline std::pair<at::Tensor, at::Tensor> conv_input_weight_grads(
    const at::Tensor& g, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool need_input, bool need_weight,
    at::MemoryFormat format) {
  const auto weight_format = weight.suggest_memory_format();
  at::Tensor grad_input = not_requested(input, input.scalar_type());
  at::Tensor grad_weight = not_requested(input, weight.scalar_type());
  if (g.numel() == 0) {  // nothing flows back
    if (need_input) grad_input = at::zeros(input.sizes(), input.options().memory_format(format));
    if (need_weight) grad_weight = at::zeros(weight.sizes(), weight.options().memory_format(weight_format));
    return {grad_input, grad_weight};
  }
  if (need_input || need_weight) {
    auto grads = at::convolution_backward(g, input, weight, /*bias_sizes=*/std::nullopt, stride, padding, dilation,
                                          /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                          {need_input, need_weight, false});
    if (need_input) grad_input = std::get<0>(grads).contiguous(format);
    if (need_weight) grad_weight = std::get<1>(grads).contiguous(weight_format);
  }
  return {grad_input, grad_weight};
}

// grad_residual of conv_bn_act is g. Without ReLU g is grad_out itself (or a view of it): an op output must not
// alias an input, so it is copied then.
inline at::Tensor conv_residual_grad(const at::Tensor& g, const at::Tensor& grad_out, bool wanted,
                                     at::MemoryFormat format) {
  if (!wanted) {
    return not_requested(grad_out, grad_out.scalar_type());
  }
  return g.is_alias_of(grad_out) ? g.clone(format) : g;
}

}  // namespace resfuse
