// Which kernel computes resfuse::conv_bn_act's convolution on a GPU: the one rule, for every caller.
//
//   RESFUSE_CUDA_CONV unset or "auto": the cuda backend's best kernel that takes the call: CUTLASS's Hopper
//       convolution (csrc/cuda/conv_sm90.cu) when the build, the GPU, the tensors and CUTLASS itself accept it,
//       else ATen's convolution + our epilogue pass. Nothing it cannot run is ever tried.
//   "aten": ATen's convolution + our epilogue pass, always.
//   "sm90" / "igemm": that one-launch kernel and no other; a call it cannot take is an error that says why,
//       never a silent switch to another implementation. The ops resfuse::conv_bn_act_sm90 and
//       resfuse::conv_bn_act_igemm are the same kernels, named directly.
// The variable is read on each call here (resfuse._C.cuda_conv_setting() reports it to Python).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace resfuse::cuda {

enum class ConvKernel { kAuto, kAten, kIgemm, kSm90 };

// RESFUSE_CUDA_CONV, checked (an unknown name is an error).
ConvKernel cuda_conv_setting();
const char* conv_kernel_name(ConvKernel kernel);

// The one-launch kernel `kernel` (kIgemm or kSm90), or an error naming `asked_by` and why it cannot run.
at::Tensor conv_bn_act_one_launch(ConvKernel kernel, const char* asked_by, const at::Tensor& input,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu);

// The Hopper kernel's output when it takes the call, nullopt (and nothing launched) when it does not.
std::optional<at::Tensor> conv_bn_act_sm90_if_it_takes(const at::Tensor& input, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const std::optional<at::Tensor>& residual,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups, bool relu);

}  // namespace resfuse::cuda
