// Autograd of every flavour of resfuse::conv_bn_act (ATen's conv + our epilogue, the one-kernel
// conv_bn_act_igemm and conv_bn_act_sm90, and the Triton kernel's conv_bn_act_triton), registered in C++.
//
// An eval-mode block calls these ops once per conv, and at N=128 on an H100 a block is partly bound by host
// time (benchmarks/NOTES.md): an autograd kernel written in Python is entered on every call, no_grad included,
// and costs interpreter time there, where this one costs a C++ call. The Triton flavour's kernels are Python
// (resfuse/ops/conv_bn_act.py); this kernel redispatches to them below autograd like to the C++ ones, and
// without this extension the same formula runs in Python (resfuse/ops/_autograd.py). The C++ flavours share one
// backward op, resfuse::_conv_bn_act_backward, the Triton one has its own; torch.compile traces the backward
// as that op. With create_graph=True the backward op is called through its own Autograd kernel (differentiable
// torch math, resfuse/ops/_autograd.py); every other backward calls it below autograd.
#include "common.h"
#include "flavour_ops.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace resfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using ConvBnActSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                      c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt,
                                      bool);
using ConvBnActBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
    c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt, bool, std::array<bool, 4>);

template <class Flavour>
const auto& conv_bn_act_ops() {
  return flavour_ops<Flavour, ConvBnActSignature, ConvBnActBackwardSignature>();
}

template <class Flavour>
class ConvBnActFunction : public torch::autograd::Function<ConvBnActFunction<Flavour>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& residual,
                               c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
                               c10::SymInt groups, bool relu) {
    at::AutoDispatchBelowAutograd below_autograd;  // the device kernel, not this one again
    at::Tensor out = conv_bn_act_ops<Flavour>().forward.call(input, weight, bias, residual, stride, padding,
                                                             dilation, groups, relu);
    ctx->save_for_backward({input, weight, out});
    // needs_input_grad counts only the tensors given: the edge of each optional input, or -1.
    int64_t edge = 2;  // input and weight are edges 0 and 1
    ctx->saved_data["bias"] = present(bias) ? edge++ : int64_t(-1);
    ctx->saved_data["residual"] = present(residual) ? edge++ : int64_t(-1);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["relu"] = relu;
    return {out};
  }

  // One gradient per forward argument (9); undefined ones are None.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[2];
    auto needs = [&](const char* name) {
      const int64_t edge = ctx->saved_data[name].toInt();
      return edge >= 0 && ctx->needs_input_grad(edge);
    };
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), needs("bias"),
                                      needs("residual")};
    variable_list result(9);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) {
      return result;
    }
    const auto stride = ctx->saved_data["stride"].toSymIntVector();
    const auto padding = ctx->saved_data["padding"].toSymIntVector();
    const auto dilation = ctx->saved_data["dilation"].toSymIntVector();
    const auto call_backward = [&] {
      return conv_bn_act_ops<Flavour>().backward.call(grads[0].contiguous(out.suggest_memory_format()), saved[0],
                                                      saved[1], out, stride, padding, dilation,
                                                      ctx->saved_data["groups"].toSymInt(),
                                                      ctx->saved_data["relu"].toBool(), mask);
    };
    auto [grad_input, grad_weight, grad_bias, grad_residual] = call_below_autograd_unless_recording(call_backward);
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_weight;
    if (mask[2]) result[2] = grad_bias;
    if (mask[3]) result[3] = grad_residual;
    return result;
  }
};

// The Autograd kernel of the flavour whose ops Flavour names.
template <class Flavour>
at::Tensor conv_bn_act_autograd(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                                const OptTensor& residual, c10::SymIntArrayRef stride, c10::SymIntArrayRef padding,
                                c10::SymIntArrayRef dilation, c10::SymInt groups, bool relu) {
  return ConvBnActFunction<Flavour>::apply(input, weight, bias, residual, stride, padding, dilation,
                                           std::move(groups), relu)[0];
}

constexpr const char* kCppBackward = "resfuse::_conv_bn_act_backward";
struct AtenConv {
  static constexpr const char* kForward = "resfuse::conv_bn_act";
  static constexpr const char* kBackward = kCppBackward;
};
struct IgemmConv {
  static constexpr const char* kForward = "resfuse::conv_bn_act_igemm";
  static constexpr const char* kBackward = kCppBackward;
};
struct HopperConv {
  static constexpr const char* kForward = "resfuse::conv_bn_act_sm90";
  static constexpr const char* kBackward = kCppBackward;
};
// Defined by resfuse/ops/conv_bn_act.py: the dispatcher holds this kernel until the schema comes.
struct TritonConv {
  static constexpr const char* kForward = "resfuse::conv_bn_act_triton";
  static constexpr const char* kBackward = "resfuse::_conv_bn_act_backward_triton";
};

}  // namespace
}  // namespace resfuse

TORCH_LIBRARY_IMPL(resfuse, Autograd, m) {
  m.impl("conv_bn_act", &resfuse::conv_bn_act_autograd<resfuse::AtenConv>);
  m.impl("conv_bn_act_igemm", &resfuse::conv_bn_act_autograd<resfuse::IgemmConv>);
  m.impl("conv_bn_act_sm90", &resfuse::conv_bn_act_autograd<resfuse::HopperConv>);
  m.impl("conv_bn_act_triton", &resfuse::conv_bn_act_autograd<resfuse::TritonConv>);
}
