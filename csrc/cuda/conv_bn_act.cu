// CUDA kernels of resfuse::conv_bn_act and resfuse::_conv_bn_act_backward (eval-mode conv + folded BN).
//
// Forward:  out = act(conv2d(x, w) + bias[c] + residual), by the kernel csrc/cuda/conv_kernels.h's rule picks:
//           on Hopper, when it takes the call, CUTLASS's convolution with the epilogue inside (one launch);
//           otherwise ATen's convolution (cuDNN, no bias) and our epilogue bias + residual + ReLU, one in-place
//           elementwise pass over the fresh convolution output.
// Backward: g = relu ? (out <= 0 ? 0 : grad_out) : grad_out and grad_bias[c] = sum g in ONE fused pass (two-level
//           per-channel reduction whose level-1 kernel also writes g); grad_residual = g;
//           grad_input, grad_weight = at::convolution_backward(g, ...), laid out like input and weight.
//
// Layouts: the output is produced in the input's suggested memory format and processed through the
// [outer, C, inner] view (csrc/common.h, csrc/cuda/channel_view.cuh), so NCHW and NHWC share the code.
#include "channel_view.cuh"
#include "conv_kernels.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/library.h>

#include <string>

namespace resfuse::cuda {
namespace {

// Folds g into the per-channel sum and, when `g` is given, stores it.
template <typename scalar_t, typename acc_t>
struct MaskAndSum {
  const scalar_t* grad_out;
  const scalar_t* out;  // nullable: no ReLU
  scalar_t* g;          // nullable: g is grad_out itself

  __device__ __forceinline__ void operator()(Sum2<acc_t>& acc, int64_t idx, int64_t) const {
    const acc_t gv = masked_grad<scalar_t, acc_t>(grad_out, out, idx);
    if (g != nullptr) g[idx] = static_cast<scalar_t>(gv);
    acc.a += gv;
  }
};

template <typename acc_t>
struct StoreSum {
  acc_t* dst;
  __device__ void operator()(int64_t c, const Sum2<acc_t>& s) const { dst[c] = s.a; }
};

at::Tensor conv_bn_act_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  constexpr const char* op = "resfuse::conv_bn_act";
  check_conv_args(input, weight, stride, padding, dilation, groups, op);
  check_optional_per_channel(bias, weight.size(0), input, op, "bias");
  const c10::cuda::CUDAGuard guard(input.device());
  switch (const ConvKernel kernel = cuda_conv_setting()) {
    case ConvKernel::kSm90:
    case ConvKernel::kIgemm: {
      const std::string asked_by = std::string("RESFUSE_CUDA_CONV=") + conv_kernel_name(kernel);
      return conv_bn_act_one_launch(kernel, asked_by.c_str(), input, weight, bias, residual, stride, padding,
                                    dilation, groups, relu);
    }
    case ConvKernel::kAuto:
      if (auto out = conv_bn_act_sm90_if_it_takes(input, weight, bias, residual, stride, padding, dilation, groups,
                                                  relu)) {
        return *out;
      }
      break;
    case ConvKernel::kAten:
      break;
  }
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
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const at::Tensor b = present(bias) ? as_channel_vector(*bias, acc_dtype) : at::Tensor();
  const ChannelView v = channel_view(out, format);

  RESFUSE_DISPATCH_FLOATING(out.scalar_type(), "resfuse_conv_bn_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p = out.data_ptr<scalar_t>();
    launch_affine_act<scalar_t, acc_t>(v, p, p, /*center=*/nullptr, /*scale=*/nullptr,
                                       b.defined() ? b.data_ptr<acc_t>() : nullptr,
                                       res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    std::array<bool, 4> output_mask) {
  check_conv_bn_act_backward_args(grad_out, input, weight, out, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor go = grad_out.contiguous(format);
  const ChannelView v = channel_view(go, format);
  const at::ScalarType acc_dtype = accumulate_dtype(input);

  at::Tensor g = go;
  at::Tensor sum_g;  // accumulation dtype
  if (go.numel() > 0 && (relu || output_mask[2])) {
    if (relu) {
      g = empty_activation(go.sizes(), go, format);
    }
    const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
    RESFUSE_DISPATCH_FLOATING(go.scalar_type(), "resfuse_conv_bn_act_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* op = relu ? o.data_ptr<scalar_t>() : nullptr;
      scalar_t* masked = relu ? g.data_ptr<scalar_t>() : nullptr;
      if (output_mask[2]) {
        sum_g = at::empty({v.channels}, go.options().dtype(acc_dtype));
        reduce_per_channel<Sum2<acc_t>>(v, go, MaskAndSum<scalar_t, acc_t>{gp, op, masked},
                                        StoreSum<acc_t>{sum_g.data_ptr<acc_t>()});
      } else {
        launch_backward_elementwise<scalar_t, acc_t>(v, gp, op, /*x=*/nullptr, /*coef=*/nullptr,
                                                     /*grad_input=*/nullptr, /*grad_residual=*/masked);
      }
    });
  }

  const auto [grad_input, grad_weight] = conv_input_weight_grads(g, input, weight, stride, padding, dilation, groups,
                                                                 output_mask[0], output_mask[1], format);

  at::Tensor grad_bias = not_requested(input, weight.scalar_type());
  if (output_mask[2]) {
    grad_bias = sum_g.defined() ? sum_g.to(weight.scalar_type())
                                : at::zeros({v.channels}, weight.options().dtype(weight.scalar_type()));
  }

  at::Tensor grad_residual = conv_residual_grad(g, grad_out, output_mask[3], format);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace
}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("conv_bn_act", &resfuse::cuda::conv_bn_act_cuda);
  m.impl("_conv_bn_act_backward", &resfuse::cuda::conv_bn_act_backward_cuda);
}
