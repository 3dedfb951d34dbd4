// Autograd of resfuse::bn_eval_act, both flavours (the C++ kernels' and the Triton kernels'), registered in C++.
//
// The eval path of a CPU block runs this op once per conv, no_grad included: an autograd kernel written in
// Python costs interpreter time on every one of those calls, where this one costs a C++ call (the same reason
// as csrc/bn_act_autograd.cpp). Without this extension the same formula runs in Python
// (resfuse/ops/_autograd.py register_bn_eval_act). The running statistics are buffers: they get no gradient.
// With create_graph=True the backward op is called through its own Autograd kernel, which computes it with
// differentiable torch math (resfuse/ops/bn_eval_act.py); every other backward calls it below autograd.
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

using BnEvalActSignature = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                      const at::Tensor&, const at::Tensor&, double, bool);
using BnEvalActBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, bool, std::array<bool, 4>);

template <class Flavour>
const auto& bn_eval_act_ops() {
  return flavour_ops<Flavour, BnEvalActSignature, BnEvalActBackwardSignature>();
}

template <class Flavour>
class BnEvalActFunction : public torch::autograd::Function<BnEvalActFunction<Flavour>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const at::Tensor& running_mean,
                               const at::Tensor& running_var, double eps, bool relu) {
    at::AutoDispatchBelowAutograd below_autograd;  // the device kernel, not this one again
    at::Tensor out = bn_eval_act_ops<Flavour>().forward.call(input, weight, bias, residual, running_mean,
                                                             running_var, eps, relu);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), out, running_mean, running_var});
    // needs_input_grad counts only the tensors given: the edge of each optional input, or -1.
    int64_t edge = 1;  // input is edge 0
    for (const auto& [name, t] : {std::pair{"weight", &weight}, {"bias", &bias}, {"residual", &residual}}) {
      ctx->saved_data[name] = present(*t) ? edge++ : int64_t(-1);
    }
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    return {out};
  }

  // One gradient per forward argument (8); undefined ones are None.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    const at::Tensor& out = saved[2];
    auto needs = [&](const char* name) {
      const int64_t edge = ctx->saved_data[name].toInt();
      return edge >= 0 && ctx->needs_input_grad(edge);
    };
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), needs("weight"), needs("bias"), needs("residual")};
    variable_list result(8);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) {
      return result;
    }
    const auto call_backward = [&] {
      return bn_eval_act_ops<Flavour>().backward.call(
          grads[0].contiguous(out.suggest_memory_format()), saved[0],
          weight.defined() ? OptTensor(weight) : std::nullopt, out, saved[3], saved[4],
          ctx->saved_data["eps"].toDouble(), ctx->saved_data["relu"].toBool(), mask);
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
at::Tensor bn_eval_act_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& residual, const at::Tensor& running_mean,
                                const at::Tensor& running_var, double eps, bool relu) {
  for (const auto& [name, stat] : {std::pair{"running_mean", &running_mean}, {"running_var", &running_var}}) {
    TORCH_CHECK(!(stat->requires_grad() && at::GradMode::is_enabled()), "resfuse::bn_eval_act is not "
                "differentiable with respect to ", name, " (a BatchNorm buffer): it cannot require grad");
  }
  return BnEvalActFunction<Flavour>::apply(input, weight, bias, residual, running_mean, running_var, eps, relu)[0];
}

struct CppKernels {
  static constexpr const char* kForward = "resfuse::bn_eval_act";
  static constexpr const char* kBackward = "resfuse::_bn_eval_act_backward";
};
// Defined by resfuse/ops/bn_eval_act.py: the dispatcher holds this kernel until the schema comes.
struct TritonKernels {
  static constexpr const char* kForward = "resfuse::bn_eval_act_triton";
  static constexpr const char* kBackward = "resfuse::_bn_eval_act_backward_triton";
};

}  // namespace
}  // namespace resfuse

TORCH_LIBRARY_IMPL(resfuse, Autograd, m) {
  m.impl("bn_eval_act", &resfuse::bn_eval_act_autograd<resfuse::CppKernels>);
  m.impl("bn_eval_act_triton", &resfuse::bn_eval_act_autograd<resfuse::TritonKernels>);
}
