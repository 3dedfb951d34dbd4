// CPU kernels of resfuse::conv_bn_act and resfuse::_conv_bn_act_backward (eval-mode conv + folded BN).
//
// Forward:  out = act(conv2d(x, w) + bias[c] + residual). The convolution is ATen's (no bias); our part is the
//           epilogue bias + residual + ReLU, one in-place pass over the fresh convolution output.
// Backward: g = relu ? (out <= 0 ? 0 : grad_out) : grad_out and grad_bias[c] = sum g in ONE fused pass;
//           grad_residual = g; grad_input, grad_weight = at::convolution_backward(g, ...), laid out like
//           input and weight.
//
// Layouts: the output is produced in the input's suggested memory format and processed through the
// [outer, C, inner] view (csrc/common.h), so NCHW and NHWC share the code.
#include "channel_view.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/library.h>

namespace resfuse::cpu {
namespace {

at::Tensor conv_bn_act_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool relu) {
  constexpr const char* op = "resfuse::conv_bn_act";
  check_conv_args(input, weight, stride, padding, dilation, groups, op);
  check_optional_per_channel(bias, weight.size(0), input, op, "bias");
  const auto format = input.suggest_memory_format();
  // at::convolution returns a fresh tensor, so the epilogue can run in place on it.
  at::Tensor out = at::convolution(input, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false,
                                   /*output_padding=*/{0, 0}, groups)
                       .contiguous(format);
  check_conv_residual(residual, out, op);
  if (out.numel() == 0 || (!present(bias) && !present(residual) && !relu)) {
    return out;
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(out, format);
  const std::vector<double> b = to_doubles_or(bias, v.channels, 0.0);

  RESFUSE_DISPATCH_FLOATING(out.scalar_type(), "resfuse_conv_bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* p = out.data_ptr<scalar_t>();
    affine_act<scalar_t>(v, p, p, /*center=*/std::vector<opmath_t>(v.channels, opmath_t(0)),
                         /*scale=*/std::vector<opmath_t>(v.channels, opmath_t(1)), /*shift=*/cast_vector<opmath_t>(b),
                         res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    std::array<bool, 4> output_mask) {
  check_conv_bn_act_backward_args(grad_out, input, weight, out, stride, padding, dilation, groups);
  const auto format = input.suggest_memory_format();
  const at::Tensor go = grad_out.contiguous(format);
  const ChannelView v = channel_view(go, format);

  at::Tensor g = go;
  std::vector<double> sum_g;
  if (go.numel() > 0 && (relu || output_mask[2])) {
    if (relu) {
      g = empty_activation(go.sizes(), go, format);
    }
    const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
    RESFUSE_DISPATCH_FLOATING(go.scalar_type(), "resfuse_conv_bn_act_backward_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* op_ = relu ? o.data_ptr<scalar_t>() : nullptr;
      scalar_t* masked = relu ? g.data_ptr<scalar_t>() : nullptr;
      // g = grad_out masked by the ReLU; `masked` is null when g is grad_out itself.
      auto grad_at = [=](int64_t idx) {
        // `out <= 0`, as torch's threshold_backward: where the output is NaN the gradient passes.
        const scalar_t gv = (op_ != nullptr && static_cast<opmath_t>(op_[idx]) <= opmath_t(0)) ? scalar_t(0)
                                                                                                 : gp[idx];
        if (masked != nullptr) {
          masked[idx] = gv;
        }
        return gv;
      };
      if (output_mask[2]) {
        sum_g = reduce_per_channel<1>(
            v, [=](int64_t c, int64_t idx, double* acc) { acc[c] += static_cast<double>(grad_at(idx)); });
      } else {
        parallel_for_each(v, [=](int64_t, int64_t idx) { grad_at(idx); });
      }
    });
  }

  const auto [grad_input, grad_weight] = conv_input_weight_grads(g, input, weight, stride, padding, dilation, groups,
                                                                 output_mask[0], output_mask[1], format);

  at::Tensor grad_bias = not_requested(input, weight.scalar_type());
  if (output_mask[2]) {
    grad_bias = g.numel() > 0 ? from_doubles(sum_g, 0, v.channels, weight.scalar_type())
                              : at::zeros({v.channels}, weight.options().dtype(weight.scalar_type()));
  }

  at::Tensor grad_residual = conv_residual_grad(g, grad_out, output_mask[3], format);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace
}  // namespace resfuse::cpu

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("conv_bn_act", &resfuse::cpu::conv_bn_act_cpu);
  m.impl("_conv_bn_act_backward", &resfuse::cpu::conv_bn_act_backward_cpu);
}
