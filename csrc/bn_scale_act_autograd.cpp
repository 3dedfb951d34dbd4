// Autograd of resfuse::bn_scale_act, both flavours (the C++ kernels' and the Triton kernels'), registered in
// C++ for the host time of a training step, like csrc/bn_act_autograd.cpp (whose notes apply here too). Every
// tensor argument is differentiable: the statistics (they come from bn_squeeze, which hands their gradients on
// to its input) and the per-(sample, channel) scale (an SE/ECA gate's output) included. With create_graph=True
// the backward op is called through its own Autograd kernel (differentiable torch math,
// resfuse/ops/bn_scale_act.py); every other backward calls it below autograd.
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

using BnScaleActSignature = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, const OptTensor&, bool);
using BnScaleActBackwardSignature =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const OptTensor&, const OptTensor&, const at::Tensor&, bool, std::array<bool, 7>);

template <class Flavour>
const auto& bn_scale_act_ops() {
  return flavour_ops<Flavour, BnScaleActSignature, BnScaleActBackwardSignature>();
}

// The optional tensor arguments after the input, in schema order.
constexpr const char* kOptional[] = {"weight", "bias", "mean", "invstd", "scale", "residual"};

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <class Flavour>
class BnScaleActFunction : public torch::autograd::Function<BnScaleActFunction<Flavour>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& mean, const OptTensor& invstd,
                               const OptTensor& scale, const OptTensor& residual, bool relu) {
    at::AutoDispatchBelowAutograd below_autograd;  // the device kernel, not this one again
    at::Tensor out =
        bn_scale_act_ops<Flavour>().forward.call(input, weight, bias, mean, invstd, scale, residual, relu);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            mean.value_or(at::Tensor()), invstd.value_or(at::Tensor()),
                            scale.value_or(at::Tensor()), out});
    // needs_input_grad counts only the tensors given: the edge of each optional input, or -1.
    const OptTensor* given[] = {&weight, &bias, &mean, &invstd, &scale, &residual};
    int64_t edge = 1;  // input is edge 0
    for (size_t k = 0; k < 6; ++k) {
      ctx->saved_data[kOptional[k]] = present(*given[k]) ? edge++ : int64_t(-1);
    }
    ctx->saved_data["relu"] = relu;
    return {out};
  }

  // One gradient per forward argument (8); undefined ones are None.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    std::array<bool, 7> mask{};
    mask[0] = ctx->needs_input_grad(0);
    bool any = mask[0];
    for (size_t k = 0; k < 6; ++k) {
      const int64_t edge = ctx->saved_data[kOptional[k]].toInt();
      mask[k + 1] = edge >= 0 && ctx->needs_input_grad(edge);
      any = any || mask[k + 1];
    }
    variable_list result(8);
    if (!grads[0].defined() || !any) {
      return result;
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[6];
    const auto call_backward = [&] {
      return bn_scale_act_ops<Flavour>().backward.call(
          grads[0].contiguous(out.suggest_memory_format()), saved[0], defined_or_none(saved[1]),
          defined_or_none(saved[2]), defined_or_none(saved[3]), defined_or_none(saved[4]),
          defined_or_none(saved[5]), out, ctx->saved_data["relu"].toBool(), mask);
    };
    auto grads_out = call_below_autograd_unless_recording(call_backward);
    const at::Tensor all[] = {std::get<0>(grads_out), std::get<1>(grads_out), std::get<2>(grads_out),
                              std::get<3>(grads_out), std::get<4>(grads_out), std::get<5>(grads_out),
                              std::get<6>(grads_out)};
    for (size_t k = 0; k < 7; ++k) {
      if (mask[k]) result[k] = all[k];
    }
    return result;
  }
};

template <class Flavour>
at::Tensor bn_scale_act_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& mean, const OptTensor& invstd, const OptTensor& scale,
                                 const OptTensor& residual, bool relu) {
  return BnScaleActFunction<Flavour>::apply(input, weight, bias, mean, invstd, scale, residual, relu)[0];
}

struct CppKernels {
  static constexpr const char* kForward = "resfuse::bn_scale_act";
  static constexpr const char* kBackward = "resfuse::_bn_scale_act_backward";
};
// Defined by resfuse/ops/bn_scale_act.py: the dispatcher holds this kernel until the schema comes.
struct TritonKernels {
  static constexpr const char* kForward = "resfuse::bn_scale_act_triton";
  static constexpr const char* kBackward = "resfuse::_bn_scale_act_backward_triton";
};

}  // namespace
}  // namespace resfuse

TORCH_LIBRARY_IMPL(resfuse, Autograd, m) {
  m.impl("bn_scale_act", &resfuse::bn_scale_act_autograd<resfuse::CppKernels>);
  m.impl("bn_scale_act_triton", &resfuse::bn_scale_act_autograd<resfuse::TritonKernels>);
}
