// The resfuse operator library: the op schemas (the contract shared by the CPU, CUDA and Triton
// implementations) and the `resfuse._C` Python module, which only reports how the extension was built.
// Kernels register themselves per device with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#ifndef RESFUSE_CUDA_ARCH_LIST
#define RESFUSE_CUDA_ARCH_LIST ""
#endif

#ifdef RESFUSE_WITH_CUDA
namespace resfuse {
int compiled_cuda_runtime_version();  // csrc/cuda/bn_act.cu: CUDART_VERSION as nvcc saw it
namespace cuda {
const char* conv_sm90_build_reason();  // csrc/cuda/conv_sm90.cu
std::string cuda_conv_setting_name();  // csrc/cuda/conv_igemm.cu: RESFUSE_CUDA_CONV, checked
}
}
#endif

TORCH_LIBRARY(resfuse, m) {
  // Training-mode BatchNorm (batch statistics) + optional residual + optional ReLU.
  m.def(
      "bn_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_bn_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor out, Tensor save_mean, "
      "Tensor save_invstd, bool relu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // bn_act's passes one at a time, for BatchNorm synchronised over a process group (resfuse/ops/sync_bn_act.py:
  // the collectives run between them). Local statistics packed for one all-gather: [mean | M2 | count], 2C + 1
  // values in float64 whatever the input (M2: sum of squared deviations from the local mean; the merge
  // subtracts the ranks' means, whose fp32 rounding would be large next to the std when |mean| >> std).
  m.def("_bn_stats(Tensor input) -> Tensor");
  // The apply pass with given statistics: act((x - mean) * invstd * weight + bias [+ residual]).
  m.def(
      "_bn_act_apply(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "bool relu) -> Tensor");
  // Local gradient sums for one all-reduce: [sum g | sum g * xhat], 2C values, g the ReLU-masked grad_out.
  m.def(
      "_bn_act_backward_reduce(Tensor grad_out, Tensor input, Tensor out, Tensor mean, Tensor invstd, "
      "bool relu) -> Tensor");
  // grad_input = (g - grad_means[:C] - xhat * grad_means[C:]) * invstd * weight and grad_residual = g, where
  // grad_means are the global sums divided by the global count.
  m.def(
      "_bn_act_backward_elemt(Tensor grad_out, Tensor input, Tensor? weight, Tensor out, Tensor mean, "
      "Tensor invstd, Tensor grad_means, bool relu, bool[2] output_mask) -> (Tensor, Tensor)");
  // Eval-mode convolution with BatchNorm folded into weight/bias + optional residual + optional ReLU.
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, SymInt[2] stride, "
      "SymInt[2] padding, SymInt[2] dilation, SymInt groups, bool relu) -> Tensor");
  // The same op as one implicit-GEMM tensor-core kernel of ours (CUDA only: fp16/bf16, channels_last, groups 1,
  // channel counts multiples of 8; csrc/cuda/conv_igemm.cu). Its backward is _conv_bn_act_backward.
  m.def(
      "conv_bn_act_igemm(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, SymInt[2] stride, "
      "SymInt[2] padding, SymInt[2] dilation, SymInt groups, bool relu) -> Tensor");
  // The same op on Hopper GPUs, built from CUTLASS's sm90 implicit-GEMM convolution (TMA, wgmma) with the
  // epilogue fused in (csrc/cuda/conv_sm90.cu; same scope as conv_bn_act_igemm, sm_90a builds only).
  m.def(
      "conv_bn_act_sm90(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, SymInt[2] stride, "
      "SymInt[2] padding, SymInt[2] dilation, SymInt groups, bool relu) -> Tensor");
  m.def(
      "_conv_bn_act_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor out, SymInt[2] stride, "
      "SymInt[2] padding, SymInt[2] dilation, SymInt groups, bool relu, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Eval-mode BatchNorm (running statistics) + optional residual + optional ReLU, one pass; the running
  // statistics are buffers: read, never updated, no gradient.
  m.def(
      "bn_eval_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor running_mean, "
      "Tensor running_var, float eps, bool relu) -> Tensor");
  m.def(
      "_bn_eval_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor out, Tensor running_mean, "
      "Tensor running_var, float eps, bool relu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The eval-mode BN fold into the conv before it, (W', b') in one pass, no autograd (csrc/fold_bn.h).
  m.def(
      "_fold_bn(Tensor conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps, ScalarType dtype, str layout) -> (Tensor, Tensor)");
  // The SE / ECA / drop_path tail of a block (resfuse/ops/bn_squeeze.py, bn_scale_act.py): training-mode batch
  // statistics + the per-sample squeeze of the normalised input; all three outputs are differentiable.
  m.def(
      "bn_squeeze(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_bn_squeeze_backward(Tensor? grad_squeeze, Tensor? grad_mean, Tensor? grad_invstd, Tensor input, "
      "Tensor mean, Tensor invstd, Tensor squeeze) -> Tensor");
  // BatchNorm with given statistics * a per-(sample, channel) factor + optional residual + optional ReLU.
  m.def(
      "bn_scale_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, Tensor? scale, "
      "Tensor? residual, bool relu) -> Tensor");
  m.def(
      "_bn_scale_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor? mean, "
      "Tensor? invstd, Tensor? scale, Tensor out, bool relu, bool[7] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

bool with_cuda() {
#ifdef RESFUSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_cutlass() {
#ifdef RESFUSE_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

pybind11::object sm90_build_reason() {
#ifdef RESFUSE_WITH_CUDA
  const char* reason = resfuse::cuda::conv_sm90_build_reason();
  return reason == nullptr ? pybind11::none() : pybind11::object(pybind11::str(reason));
#else
  return pybind11::str("a build without the CUDA kernels");
#endif
}

pybind11::object cuda_conv_setting() {
#ifdef RESFUSE_WITH_CUDA
  return pybind11::str(resfuse::cuda::cuda_conv_setting_name());
#else
  return pybind11::none();
#endif
}

pybind11::object cuda_version() {
#ifdef RESFUSE_WITH_CUDA
  const int v = resfuse::compiled_cuda_runtime_version();  // e.g. 13000 -> "13.0"
  return pybind11::str(std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10));
#else
  return pybind11::none();
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resfuse C++/CUDA extension. The ops live in torch.ops.resfuse; this module only reports build info.";
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled into the extension.");
  m.def("with_cutlass", &with_cutlass,
        "Whether the Hopper convolution built on CUTLASS's headers (resfuse::conv_bn_act_sm90) was compiled in.");
  m.def("sm90_build_reason", &sm90_build_reason,
        "Why resfuse::conv_bn_act_sm90 cannot run from this build (None: it can, on an sm_90 GPU).");
  m.def("cuda_conv_setting", &cuda_conv_setting,
        "RESFUSE_CUDA_CONV as the CUDA kernels read it: auto, aten, igemm or sm90 (an unknown name raises); None "
        "without the CUDA kernels.");
  m.def("cuda_version", &cuda_version, "CUDA version the kernels were compiled with (e.g. '13.0'), or None.");
  m.def(
      "cuda_arch_list", [] { return std::string(RESFUSE_CUDA_ARCH_LIST); },
      "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for ('' without CUDA).");
}
