// Host-side rules of resfuse::_fold_bn shared by its CPU (csrc/cpu/fold_bn.cpp) and CUDA (csrc/cuda/fold_bn.cu)
// kernels: the argument checks, the layouts W' is written in and the allocation of both outputs.
//
// The eval-mode BatchNorm folded into the convolution before it, so that bn(conv(x)) == conv(x, W') + b':
//   scale = bn_weight * rsqrt(running_var + eps)                 (bn_weight absent: 1)
//   W'[o] = conv_weight[o] * scale[o]      b' = bn_bias + (conv_bias - running_mean) * scale   (absent: 0)
// computed in fp32 (fp64 for fp64 conv weights), written in `dtype`. W' is dense in one of three layouts:
//   "contiguous"     [C_out, Cg, KH, KW] row-major;
//   "channels_last"  torch.channels_last: stored as [C_out, KH, KW, Cg];
//   "gemm"           the Triton conv's implicit-GEMM B matrix: stored as [KH, KW, Cg, C_out] (resfuse/nn/fold.py).
// Each is a [C_out, Cg, KH, KW] tensor whose storage is a contiguous tensor of the stored shape, permuted back:
// the strides resfuse/ops/fold_bn.py's fake kernel gives too.
#pragma once

#include "common.h"

#include <c10/util/string_view.h>

namespace resfuse {

// The dims of [C_out, Cg, KH, KW] in the order W' is stored, outermost first.
using FoldOrder = std::array<int64_t, 4>;

inline FoldOrder fold_order(c10::string_view layout) {
  if (layout == "contiguous") return {0, 1, 2, 3};
  if (layout == "channels_last") return {0, 2, 3, 1};
  if (layout == "gemm") return {2, 3, 1, 0};
  TORCH_CHECK(false, "resfuse::_fold_bn: layout must be 'contiguous', 'channels_last' or 'gemm', but got '",
              std::string(layout.data(), layout.size()), "'");
}

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_fold_bn_args(const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var, at::ScalarType dtype) {
  constexpr const char* op = "resfuse::_fold_bn";
  TORCH_CHECK(conv_weight.defined() && conv_weight.dim() == 4, op,
              ": expected conv_weight to be a 4-D (C_out, C_in/groups, kH, kW) tensor, but got shape ",
              conv_weight.defined() ? conv_weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(is_activation_dtype(conv_weight.scalar_type()), op,
              ": conv_weight must be float16, bfloat16, float32 or float64, but got ", conv_weight.scalar_type());
  TORCH_CHECK(is_activation_dtype(dtype), op, ": dtype must be float16, bfloat16, float32 or float64, but got ",
              dtype);
  const int64_t c = conv_weight.size(0);
  check_optional_per_channel(conv_bias, c, conv_weight, op, "conv_bias");
  check_optional_per_channel(bn_weight, c, conv_weight, op, "bn_weight");
  check_optional_per_channel(bn_bias, c, conv_weight, op, "bn_bias");
  check_per_channel(running_mean, c, conv_weight, op, "running_mean");
  check_per_channel(running_var, c, conv_weight, op, "running_var");
}

// (W', b'): W' shaped like conv_weight and dense in `order`, b' of shape [C_out], both of `dtype`.
inline std::pair<at::Tensor, at::Tensor> empty_fold_outputs(const at::Tensor& conv_weight, at::ScalarType dtype,
                                                            const FoldOrder& order) {
  const auto opts = conv_weight.options().dtype(dtype);
  std::array<int64_t, 4> stored{}, back{};
  for (int64_t k = 0; k < 4; ++k) {
    stored[k] = conv_weight.size(order[k]);
    back[order[k]] = k;  // the inverse permutation
  }
  return {at::empty(stored, opts).permute(back), at::empty({conv_weight.size(0)}, opts)};
}

}  // namespace resfuse
