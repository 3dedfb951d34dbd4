// The Autograd kernel of resfuse::_fold_bn, both flavours (the C++ kernels' and the Triton kernel's): the fold is
// made for no-grad calls only, so a call autograd would have to record is an error, never a result without a
// gradient. Every other call goes below autograd to the device kernel, from C++: the eval path of a GPU block
// folds on every call, and a kernel written in Python would cost interpreter time there. Without this extension
// the same check runs in Python (resfuse/ops/fold_bn.py).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace resfuse {
namespace {

using OptTensor = std::optional<at::Tensor>;
using FoldBnSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                           const OptTensor&, const at::Tensor&, const at::Tensor&,
                                                           double, at::ScalarType, c10::string_view);

void check_no_grad(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!t.requires_grad(), op, " folds BatchNorm into the conv weight without autograd, but ", name,
              " requires grad and grad mode is on: call it under torch.no_grad() or torch.inference_mode(), "
              "or fold with torch ops (resfuse.nn.fold.fold_bn_differentiable) to differentiate the fold");
}

template <class Flavour>
std::tuple<at::Tensor, at::Tensor> fold_bn_autograd(const at::Tensor& conv_weight, const OptTensor& conv_bias,
                                                    const OptTensor& bn_weight, const OptTensor& bn_bias,
                                                    const at::Tensor& running_mean, const at::Tensor& running_var,
                                                    double eps, at::ScalarType dtype, c10::string_view layout) {
  if (at::GradMode::is_enabled()) {
    check_no_grad(conv_weight, Flavour::kName, "conv_weight");
    for (const auto& [name, t] : {std::pair{"conv_bias", &conv_bias}, {"bn_weight", &bn_weight},
                                  {"bn_bias", &bn_bias}}) {
      if (present(*t)) check_no_grad(**t, Flavour::kName, name);
    }
    check_no_grad(running_mean, Flavour::kName, "running_mean");
    check_no_grad(running_var, Flavour::kName, "running_var");
  }
  // Looked up on the first call, when the Triton flavour's schema (defined from Python) exists.
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(Flavour::kName, "").template typed<FoldBnSignature>();
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype, layout);
}

struct CppKernels {
  static constexpr const char* kName = "resfuse::_fold_bn";
};
struct TritonKernel {
  static constexpr const char* kName = "resfuse::_fold_bn_triton";
};

}  // namespace
}  // namespace resfuse

TORCH_LIBRARY_IMPL(resfuse, Autograd, m) {
  m.impl("_fold_bn", &resfuse::fold_bn_autograd<resfuse::CppKernels>);
  m.impl("_fold_bn_triton", &resfuse::fold_bn_autograd<resfuse::TritonKernel>);
}
