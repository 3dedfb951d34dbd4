// Autograd of resfuse::bn_act, both flavours (the C++ kernels' and the Triton kernels'), registered in C++.
//
// A training step of a ResNet block at N=128 on an H100 is bound by host time, not by the GPU
// (benchmarks/NOTES.md): an autograd kernel written in Python, with its torch.autograd.Function, costs tens of
// microseconds of interpreter time per call, forward and backward, where this one costs a C++ node. The Triton
// flavour's kernels are Python (registered by resfuse/ops/bn_act.py), but its autograd needs none: this kernel
// redispatches to them below autograd like to the C++ ones. Without this extension the Triton flavour uses the
// same formula written in Python (resfuse/ops/_autograd.py). Each flavour's backward is its own backward op,
// so torch.compile traces the backward as that op.
//
// With create_graph=True the backward op is called through its own Autograd kernel, which computes it with
// differentiable torch math (resfuse/ops/_autograd.py); every other backward calls it below autograd.
//
// Like the Python kernel, this one bumps the version counters of the running statistics it updates in place:
// the dispatcher does not for ops defined outside torch.library's custom_op, and the cached eval-mode BN fold
// (resfuse/nn/fold.py) relies on them.
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

using BnActSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    double, double, bool);
using BnActBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    bool, std::array<bool, 4>);

template <class Flavour>
const auto& bn_act_ops() {
  return flavour_ops<Flavour, BnActSignature, BnActBackwardSignature>();
}

template <class Flavour>
class BnActFunction : public torch::autograd::Function<BnActFunction<Flavour>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, double momentum, double eps, bool relu) {
    at::AutoDispatchBelowAutograd below_autograd;  // the device kernel, not this one again
    auto [out, save_mean, save_invstd] =
        bn_act_ops<Flavour>().forward.call(input, weight, bias, residual, running_mean, running_var, momentum,
                                           eps, relu);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), out, save_mean, save_invstd});
    // needs_input_grad counts only the tensors given: the edge of each differentiable input, or -1.
    int64_t edge = 1;  // input is edge 0
    for (const auto& [name, t] : {std::pair{"weight", &weight}, {"bias", &bias}, {"residual", &residual}}) {
      ctx->saved_data[name] = present(*t) ? edge++ : int64_t(-1);
    }
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {out, save_mean, save_invstd};
  }

  // One gradient per forward argument (9); undefined ones are None.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& out = saved[2];
    auto needs = [&](const char* name) {
      const int64_t edge = ctx->saved_data[name].toInt();
      return edge >= 0 && ctx->needs_input_grad(edge);
    };
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), needs("weight"), needs("bias"), needs("residual")};
    variable_list result(9);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) {
      return result;
    }
    const auto call_backward = [&] {
      return bn_act_ops<Flavour>().backward.call(grads[0].contiguous(out.suggest_memory_format()), input,
                                                 weight.defined() ? OptTensor(weight) : std::nullopt, out,
                                                 saved[3], saved[4], ctx->saved_data["relu"].toBool(), mask);
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
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_autograd(const at::Tensor& input, const OptTensor& weight,
                                                               const OptTensor& bias, const OptTensor& residual,
                                                               const OptTensor& running_mean,
                                                               const OptTensor& running_var, double momentum,
                                                               double eps, bool relu) {
  auto outputs = BnActFunction<Flavour>::apply(input, weight, bias, residual, running_mean, running_var, momentum,
                                               eps, relu);
  for (const OptTensor* stat : {&running_mean, &running_var}) {
    if (present(*stat)) torch::autograd::impl::bump_version(**stat);
  }
  return {outputs[0], outputs[1], outputs[2]};
}

struct CppKernels {
  static constexpr const char* kForward = "resfuse::bn_act";
  static constexpr const char* kBackward = "resfuse::_bn_act_backward";
};
// Defined by resfuse/ops/bn_act.py: the dispatcher holds this kernel until the schema comes.
struct TritonKernels {
  static constexpr const char* kForward = "resfuse::bn_act_triton";
  static constexpr const char* kBackward = "resfuse::_bn_act_backward_triton";
};

}  // namespace
}  // namespace resfuse

TORCH_LIBRARY_IMPL(resfuse, Autograd, m) {
  m.impl("bn_act", &resfuse::bn_act_autograd<resfuse::CppKernels>);
  m.impl("bn_act_triton", &resfuse::bn_act_autograd<resfuse::TritonKernels>);
}
