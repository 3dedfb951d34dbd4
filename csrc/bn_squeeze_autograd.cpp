// Autograd of resfuse::bn_squeeze, both flavours (the C++ kernels' and the Triton kernels'), registered in C++
// for the host time of a training step, like csrc/bn_act_autograd.cpp (whose notes apply here too). All three
// outputs (squeeze, mean, invstd) are differentiable: an SE/ECA gate reads the squeeze and bn_scale_act reads
// the statistics, and the backward op turns their three gradients into the input's in one pass. With
// create_graph=True the backward op is called through its own Autograd kernel (differentiable torch math,
// resfuse/ops/bn_squeeze.py); every other backward calls it below autograd. The running statistics' version
// counters are bumped as bn_act's are.
#include "common.h"
#include "flavour_ops.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace resfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using BnSqueezeSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&,
                                                                           const OptTensor&, double, double);
using BnSqueezeBackwardSignature = at::Tensor(const OptTensor&, const OptTensor&, const OptTensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&);

template <class Flavour>
const auto& bn_squeeze_ops() {
  return flavour_ops<Flavour, BnSqueezeSignature, BnSqueezeBackwardSignature>();
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <class Flavour>
class BnSqueezeFunction : public torch::autograd::Function<BnSqueezeFunction<Flavour>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& running_mean,
                               const OptTensor& running_var, double momentum, double eps) {
    at::AutoDispatchBelowAutograd below_autograd;  // the device kernel, not this one again
    auto [squeeze, mean, invstd] =
        bn_squeeze_ops<Flavour>().forward.call(input, running_mean, running_var, momentum, eps);
    ctx->save_for_backward({input, mean, invstd, squeeze});
    return {squeeze, mean, invstd};
  }

  // One gradient per forward argument (5); only the input's is defined.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(5);
    const bool any_grad = grads[0].defined() || grads[1].defined() || grads[2].defined();
    if (!any_grad || !ctx->needs_input_grad(0)) {
      return result;
    }
    const auto saved = ctx->get_saved_variables();
    const auto call_backward = [&] {
      return bn_squeeze_ops<Flavour>().backward.call(defined_or_none(grads[0]), defined_or_none(grads[1]),
                                                     defined_or_none(grads[2]), saved[0], saved[1], saved[2],
                                                     saved[3]);
    };
    result[0] = call_below_autograd_unless_recording(call_backward);
    return result;
  }
};

template <class Flavour>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_squeeze_autograd(const at::Tensor& input,
                                                                   const OptTensor& running_mean,
                                                                   const OptTensor& running_var, double momentum,
                                                                   double eps) {
  auto outputs = BnSqueezeFunction<Flavour>::apply(input, running_mean, running_var, momentum, eps);
  for (const OptTensor* stat : {&running_mean, &running_var}) {
    if (present(*stat)) torch::autograd::impl::bump_version(**stat);
  }
  return {outputs[0], outputs[1], outputs[2]};
}

struct CppKernels {
  static constexpr const char* kForward = "resfuse::bn_squeeze";
  static constexpr const char* kBackward = "resfuse::_bn_squeeze_backward";
};
// Defined by resfuse/ops/bn_squeeze.py: the dispatcher holds this kernel until the schema comes.
struct TritonKernels {
  static constexpr const char* kForward = "resfuse::bn_squeeze_triton";
  static constexpr const char* kBackward = "resfuse::_bn_squeeze_backward_triton";
};

}  // namespace
}  // namespace resfuse

TORCH_LIBRARY_IMPL(resfuse, Autograd, m) {
  m.impl("bn_squeeze", &resfuse::bn_squeeze_autograd<resfuse::CppKernels>);
  m.impl("bn_squeeze_triton", &resfuse::bn_squeeze_autograd<resfuse::TritonKernels>);
}
