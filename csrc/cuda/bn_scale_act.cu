// CUDA kernels of resfuse::bn_scale_act and resfuse::_bn_scale_act_backward (contract: csrc/resfuse.cpp; the
// math in resfuse/ops/bn_scale_act.py and csrc/cpu/bn_scale_act.cpp). Compiled, never run here: no GPU has run
// them yet.
//
// Forward, one elementwise pass: out = act(((x - mean)*invstd*w + b)*f[n, c] + residual).
// Backward: one per-(n, c) reduction that also writes grad_x = g*f*w*invstd and grad_residual = g (one read of
// grad_out, out and x), then, when a parameter's gradient is asked for, one thread per channel turns the [N, C]
// sums S1 = sum g, S2 = sum g*(x - mean) into grad_scale, grad_weight, grad_bias, grad_mean and grad_invstd.
// The per-channel and per-sample arguments are read as accumulation-dtype copies (a few small conversions).
#include "sample_reduce.cuh"

#include <torch/library.h>

namespace resfuse::cuda {
namespace {

// The per-channel and per-sample arguments in the accumulation dtype; null pointers stand for the identity.
template <typename acc_t>
struct ScaleActArgs {
  const acc_t* mean;    // [C], nullable: 0
  const acc_t* invstd;  // [C], nullable: 1
  const acc_t* weight;  // [C], nullable: 1
  const acc_t* bias;    // [C], nullable: 0
  const acc_t* scale;   // [N, C], nullable: 1
  int64_t channels;

  __device__ __forceinline__ acc_t center(int64_t c) const { return mean != nullptr ? mean[c] : acc_t(0); }
  __device__ __forceinline__ acc_t factor(int64_t c) const {
    return (invstd != nullptr ? invstd[c] : acc_t(1)) * (weight != nullptr ? weight[c] : acc_t(1));
  }
  __device__ __forceinline__ acc_t shift(int64_t c) const { return bias != nullptr ? bias[c] : acc_t(0); }
  __device__ __forceinline__ acc_t sample(int64_t n, int64_t c) const {
    return scale != nullptr ? scale[n * channels + c] : acc_t(1);
  }
};

template <typename scalar_t, typename acc_t>
struct ScaleActForward {
  ScaleActArgs<acc_t> args;
  const scalar_t* x;
  const scalar_t* residual;  // nullable
  scalar_t* out;
  bool relu;

  __device__ __forceinline__ void operator()(int64_t idx, int64_t n, int64_t c) const {
    const acc_t f = args.sample(n, c);
    acc_t y = ((static_cast<acc_t>(x[idx]) - args.center(c)) * args.factor(c) + args.shift(c)) * f;
    if (residual != nullptr) y += static_cast<acc_t>(residual[idx]);
    if (relu && y < acc_t(0)) y = acc_t(0);  // `y < 0` keeps NaN as NaN, like torch.relu
    out[idx] = static_cast<scalar_t>(y);
  }
};

struct Tensors {
  at::Tensor mean, invstd, weight, bias, scale;
};

template <typename acc_t>
ScaleActArgs<acc_t> args_of(const Tensors& t, int64_t channels) {
  return {data_or_null<acc_t>(t.mean), data_or_null<acc_t>(t.invstd), data_or_null<acc_t>(t.weight),
          data_or_null<acc_t>(t.bias), data_or_null<acc_t>(t.scale), channels};
}

Tensors as_acc(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
               const std::optional<at::Tensor>& scale, at::ScalarType acc_dtype) {
  return {as_acc_or_undefined(mean, acc_dtype), as_acc_or_undefined(invstd, acc_dtype),
          as_acc_or_undefined(weight, acc_dtype), as_acc_or_undefined(bias, acc_dtype),
          as_acc_or_undefined(scale, acc_dtype)};
}

at::Tensor bn_scale_act_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "resfuse::bn_scale_act";
  check_bn_scale_act_args(input, weight, bias, mean, invstd, scale, op);
  if (present(residual)) check_like(*residual, input, op, "residual", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const SampleView v = sample_view(x, format);
  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return out;
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const Tensors params = as_acc(weight, bias, mean, invstd, scale, accumulate_dtype(input));
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_scale_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_sample_element(v, ScaleActForward<scalar_t, acc_t>{args_of<acc_t>(params, v.channels),
                                                                x.data_ptr<scalar_t>(),
                                                                data_or_null<scalar_t>(res),
                                                                out.data_ptr<scalar_t>(), relu});
  });
  return out;
}

template <typename scalar_t, typename acc_t>
struct ScaleActBackwardSums {
  ScaleActArgs<acc_t> args;
  const scalar_t* grad_out;
  const scalar_t* out;  // nullable: no ReLU
  const scalar_t* x;
  scalar_t* grad_input;     // nullable
  scalar_t* grad_residual;  // nullable

  __device__ __forceinline__ void operator()(Sum2<acc_t>& acc, int64_t idx, int64_t n, int64_t c) const {
    const acc_t g = masked_grad<scalar_t, acc_t>(grad_out, out, idx);
    if (grad_residual != nullptr) grad_residual[idx] = static_cast<scalar_t>(g);
    if (grad_input != nullptr) grad_input[idx] = static_cast<scalar_t>(g * args.sample(n, c) * args.factor(c));
    acc.a += g;
    acc.b += g * (static_cast<acc_t>(x[idx]) - args.center(c));
  }
};

template <typename acc_t>
struct StoreSums {
  acc_t* s1;  // [N, C]
  acc_t* s2;  // [N, C]
  int64_t channels;
  __device__ void operator()(int64_t n, int64_t c, const Sum2<acc_t>& s) const {
    s1[n * channels + c] = s.a;
    s2[n * channels + c] = s.b;
  }
};

// grad_scale [N, C] and the four per-channel gradients [4, C] (weight, bias, mean, invstd), accumulation dtype.
template <typename acc_t>
struct ScaleActParamGrads {
  ScaleActArgs<acc_t> args;
  const acc_t* s1;
  const acc_t* s2;
  acc_t* grad_scale;  // nullable
  acc_t* grad_params;
  int64_t samples;

  __device__ void operator()(int64_t c) const {
    const int64_t C = args.channels;
    const acc_t i = args.invstd != nullptr ? args.invstd[c] : acc_t(1);
    const acc_t w = args.weight != nullptr ? args.weight[c] : acc_t(1);
    const acc_t b = args.shift(c);
    acc_t fs1 = 0, fs2 = 0;
    for (int64_t n = 0; n < samples; ++n) {
      const acc_t a1 = s1[n * C + c], a2 = s2[n * C + c];
      if (grad_scale != nullptr) grad_scale[n * C + c] = w * i * a2 + b * a1;
      const acc_t f = args.sample(n, c);
      fs1 += f * a1;
      fs2 += f * a2;
    }
    grad_params[c] = i * fs2;               // weight
    grad_params[C + c] = fs1;               // bias
    grad_params[2 * C + c] = -w * i * fs1;  // mean
    grad_params[3 * C + c] = w * fs2;       // invstd
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_scale_act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                           const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& scale,
                           const at::Tensor& out, bool relu, std::array<bool, 7> output_mask) {
  using G = ScaleActGrad;
  check_bn_scale_act_backward_args(grad_out, input, weight, bias, mean, invstd, scale, out, output_mask);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels;
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const auto acc_opts = input.options().dtype(acc_dtype);
  const auto activation = [&](bool wanted) {
    return wanted ? empty_activation(input.sizes(), input, format) : not_requested(input, input.scalar_type());
  };
  at::Tensor grad_input = activation(output_mask[G::kInput]);
  at::Tensor grad_residual = activation(output_mask[G::kResidual]);
  const bool need_params = output_mask[G::kWeight] || output_mask[G::kBias] || output_mask[G::kMean] ||
                           output_mask[G::kInvstd] || output_mask[G::kScale];
  const Tensors params = as_acc(weight, bias, mean, invstd, scale, acc_dtype);
  // Zeros: an empty input sums nothing, and its parameter gradients are zero.
  at::Tensor sums = at::zeros({2, N, C}, acc_opts);
  at::Tensor grad_scale_acc = output_mask[G::kScale] ? at::empty({N, C}, acc_opts) : at::Tensor();
  at::Tensor grad_params = at::zeros({4, C}, acc_opts);

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_scale_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ScaleActArgs<acc_t> args = args_of<acc_t>(params, C);
    acc_t* s1 = sums.data_ptr<acc_t>();
    acc_t* s2 = s1 + N * C;
    reduce_per_sample<Sum2<acc_t>>(
        v,
        ScaleActBackwardSums<scalar_t, acc_t>{args, go.data_ptr<scalar_t>(), data_or_null<scalar_t>(o),
                                              x.data_ptr<scalar_t>(),
                                              output_mask[G::kInput] ? grad_input.data_ptr<scalar_t>() : nullptr,
                                              output_mask[G::kResidual] ? grad_residual.data_ptr<scalar_t>()
                                                                        : nullptr},
        StoreSums<acc_t>{s1, s2, C});
    if (need_params) {
      acc_t* grad_scale_ptr = grad_scale_acc.defined() ? grad_scale_acc.data_ptr<acc_t>() : nullptr;
      for_each_channel(C, ScaleActParamGrads<acc_t>{args, s1, s2, grad_scale_ptr, grad_params.data_ptr<acc_t>(), N});
    }
  });

  const auto param_grad = [&](int k, int row, const std::optional<at::Tensor>& like) {
    if (!output_mask[k]) return not_requested(input, present(like) ? like->scalar_type() : at::kFloat);
    // A copy even in the accumulation dtype: the outputs must not be views of one buffer.
    return grad_params[row].to(like->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  };
  at::Tensor grad_scale = not_requested(input, present(scale) ? scale->scalar_type() : at::kFloat);
  if (output_mask[G::kScale]) {
    grad_scale = x.numel() == 0 ? at::zeros({N, C}, scale->options()) : grad_scale_acc.to(scale->scalar_type());
  }
  return {grad_input,
          param_grad(G::kWeight, 0, weight),
          param_grad(G::kBias, 1, bias),
          param_grad(G::kMean, 2, mean),
          param_grad(G::kInvstd, 3, invstd),
          grad_scale,
          grad_residual};
}

}  // namespace
}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_scale_act", &resfuse::cuda::bn_scale_act_cuda);
  m.impl("_bn_scale_act_backward", &resfuse::cuda::bn_scale_act_backward_cuda);
}
