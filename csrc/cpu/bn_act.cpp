// CPU kernels of resfuse::bn_act and resfuse::_bn_act_backward (contract: the op schemas in csrc/resfuse.cpp).
//
// Forward (training-mode BatchNorm with batch statistics, fused with residual add and ReLU):
//   mean[c], var[c] (biased) over the n = N*H*W elements of channel c;  invstd = 1/sqrt(var + eps)
//   scale = w*invstd, shift = b - mean*scale;  out = act(x*scale + shift + residual)
//   (evaluated as (x - mean)*scale + b: equal, and free of cancellation when |mean| >> std)
//   running_mean/var (optional) updated in place; running_var uses the unbiased var*n/(n-1).
// Backward:
//   g = relu ? (out <= 0 ? 0 : grad_out) : grad_out;  xhat = (x - mean)*invstd
//   sum_g[c] = sum g, sum_gx[c] = sum g*xhat   (one pass)
//   grad_input = (g - sum_g/n - xhat*sum_gx/n)*invstd*w;  grad_weight = sum_gx;  grad_bias = sum_g;  grad_residual = g
//
// Layouts: NCHW and NHWC both run on the [outer, C, inner] view (csrc/common.h). Statistics and sums accumulate in
// double; elementwise math runs in float (double for float64 inputs).
#include "../bn_passes.h"
#include "channel_view.h"

#include <torch/library.h>

#include <cmath>

namespace resfuse::cpu {
namespace {

// Biased per-channel mean and variance in double. The sums are shifted by one sample of each channel, which keeps
// the one-pass formula var = E[d^2] - E[d]^2 free of catastrophic cancellation when |mean| >> std.
template <typename scalar_t>
void batch_stats(const ChannelView& v, const scalar_t* x, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t C = v.channels;
  std::vector<double> pivot(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    pivot[c] = static_cast<double>(x[c * v.inner]);  // element (o = 0, c, i = 0)
  }
  const double* k = pivot.data();
  const std::vector<double> sums = reduce_per_channel<2>(v, [=](int64_t c, int64_t idx, double* acc) {
    const double d = static_cast<double>(x[idx]) - k[c];
    acc[c] += d;
    acc[C + c] += d * d;
  });
  const double n = static_cast<double>(v.per_channel());
  mean.resize(C);
  var.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const double d_mean = sums[c] / n;
    mean[c] = pivot[c] + d_mean;
    const double v = sums[C + c] / n - d_mean * d_mean;
    var[c] = v < 0.0 ? 0.0 : v;  // rounding can leave a tiny negative; NaN (an Inf or NaN input) stays NaN
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps, bool relu) {
  check_bn_act_args(input, weight, bias, residual, running_mean, running_var);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  const at::ScalarType acc_dtype = accumulate_dtype(input);

  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    // No statistics to compute: zeros stand in for them and the running stats are left untouched.
    const auto opts = input.options().dtype(acc_dtype);
    return {out, at::zeros({C}, opts), at::zeros({C}, opts)};
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();

  std::vector<double> mean, var;
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_stats_cpu",
                            [&] { batch_stats<scalar_t>(v, x.data_ptr<scalar_t>(), mean, var); });

  const double n = static_cast<double>(v.per_channel());
  std::vector<double> invstd(C), scale(C);
  const std::vector<double> w = to_doubles_or(weight, C, 1.0);
  const std::vector<double> b = to_doubles_or(bias, C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    scale[c] = w[c] * invstd[c];
  }

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_apply_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    affine_act<scalar_t>(v, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), cast_vector<opmath_t>(mean),
                         cast_vector<opmath_t>(scale), cast_vector<opmath_t>(b),
                         res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu);
  });

  if (present(running_mean)) {
    at::Tensor rm = *running_mean;
    update_running(rm, mean, momentum);
  }
  if (present(running_var)) {
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) {
      unbiased[c] = var[c] * n / (n - 1.0);
    }
    at::Tensor rv = *running_var;
    update_running(rv, unbiased, momentum);
  }
  return {out, from_doubles(mean, 0, C, acc_dtype), from_doubles(invstd, 0, C, acc_dtype)};
}

template <typename scalar_t>
inline at::opmath_type<scalar_t> masked_grad(const scalar_t* grad_out, const scalar_t* out, int64_t idx) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t g = static_cast<opmath_t>(grad_out[idx]);
  // `out <= 0`, as torch's threshold_backward: where the output is NaN the gradient passes.
  return (out != nullptr && static_cast<opmath_t>(out[idx]) <= opmath_t(0)) ? opmath_t(0) : g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& out, const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu,
    std::array<bool, 4> output_mask) {
  check_bn_act_backward_args(grad_out, input, weight, out, save_mean, save_invstd);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  const at::ScalarType pdtype = param_dtype(weight);

  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;  // assigned inside the dispatch lambda below
  std::tie(grad_input, grad_weight, grad_bias, grad_residual) = bn_backward_outputs(input, pdtype, format, output_mask);
  if (x.numel() == 0) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  const std::vector<double> mean = to_doubles(save_mean);
  const std::vector<double> invstd = to_doubles(save_invstd);
  const double n = static_cast<double>(v.per_channel());

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = relu ? o.data_ptr<scalar_t>() : nullptr;

    // Per-channel coefficients of grad_input = (g - k1 - (x - mean)*m2) * a.
    std::vector<opmath_t> c_mean(C), c_a(C), c_k1(C), c_m2(C);
    if (output_mask[0] || output_mask[1] || output_mask[2]) {
      const double* mp = mean.data();
      const double* ip = invstd.data();
      const std::vector<double> sums = reduce_per_channel<2>(v, [=](int64_t c, int64_t idx, double* acc) {
        const double g = static_cast<double>(masked_grad(gp, op, idx));
        acc[c] += g;
        acc[C + c] += g * (static_cast<double>(xp[idx]) - mp[c]) * ip[c];
      });
      if (output_mask[1]) grad_weight = from_doubles(sums, C, C, pdtype);
      if (output_mask[2]) grad_bias = from_doubles(sums, 0, C, pdtype);
      const std::vector<double> w = to_doubles_or(weight, C, 1.0);
      for (int64_t c = 0; c < C; ++c) {
        c_mean[c] = static_cast<opmath_t>(mean[c]);
        c_a[c] = static_cast<opmath_t>(invstd[c] * w[c]);
        c_k1[c] = static_cast<opmath_t>(sums[c] / n);
        c_m2[c] = static_cast<opmath_t>(invstd[c] * sums[C + c] / n);
      }
    }

    if (output_mask[0] || output_mask[3]) {
      scalar_t* gi = output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
      scalar_t* gr = output_mask[3] ? grad_residual.data_ptr<scalar_t>() : nullptr;
      const opmath_t* cm = c_mean.data();
      const opmath_t* ca = c_a.data();
      const opmath_t* ck1 = c_k1.data();
      const opmath_t* cm2 = c_m2.data();
      parallel_for_each(v, [=](int64_t c, int64_t idx) {
        const opmath_t g = masked_grad(gp, op, idx);
        if (gr != nullptr) {
          gr[idx] = static_cast<scalar_t>(g);
        }
        if (gi != nullptr) {
          const opmath_t xc = static_cast<opmath_t>(xp[idx]) - cm[c];
          gi[idx] = static_cast<scalar_t>((g - ck1[c] - xc * cm2[c]) * ca[c]);
        }
      });
    }
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// ---------------------------------------------------------------------------------------------------------------
// The passes above one at a time, for BatchNorm synchronised over a process group (resfuse/ops/sync_bn_act.py).

at::Tensor bn_stats_cpu(const at::Tensor& input) {
  check_activation(input, "resfuse::_bn_stats", "input");
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  // [mean | M2 | count]: an empty batch contributes zeros, which weigh nothing in the merge.
  std::vector<double> packed(static_cast<size_t>(2 * C + 1), 0.0);
  if (x.numel() > 0) {
    std::vector<double> mean, var;
    RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_stats_cpu",
                              [&] { batch_stats<scalar_t>(v, x.data_ptr<scalar_t>(), mean, var); });
    const double n = static_cast<double>(v.per_channel());
    for (int64_t c = 0; c < C; ++c) {
      packed[c] = mean[c];
      packed[C + c] = var[c] * n;
    }
    packed[2 * C] = n;
  }
  return from_doubles(packed, 0, 2 * C + 1, at::kDouble);
}

at::Tensor bn_act_apply_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, bool relu) {
  check_bn_act_apply_args(input, mean, invstd, weight, bias, residual);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return out;
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const std::vector<double> m = to_doubles(mean);
  const std::vector<double> is = to_doubles(invstd);
  const std::vector<double> w = to_doubles_or(weight, C, 1.0);
  const std::vector<double> b = to_doubles_or(bias, C, 0.0);
  std::vector<double> scale(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = w[c] * is[c];
  }
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_apply_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    affine_act<scalar_t>(v, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), cast_vector<opmath_t>(m),
                         cast_vector<opmath_t>(scale), cast_vector<opmath_t>(b),
                         res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu);
  });
  return out;
}

at::Tensor bn_act_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
                                      const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  check_bn_act_backward_pass_args(grad_out, input, out, mean, invstd, "resfuse::_bn_act_backward_reduce");
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  std::vector<double> sums(static_cast<size_t>(2 * C), 0.0);  // [sum g | sum g*xhat]; zeros for an empty batch
  if (x.numel() > 0) {
    const std::vector<double> m = to_doubles(mean);
    const std::vector<double> is = to_doubles(invstd);
    RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_reduce_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* op = relu ? o.data_ptr<scalar_t>() : nullptr;
      const double* mp = m.data();
      const double* ip = is.data();
      sums = reduce_per_channel<2>(v, [=](int64_t c, int64_t idx, double* acc) {
        const double g = static_cast<double>(masked_grad(gp, op, idx));
        acc[c] += g;
        acc[C + c] += g * (static_cast<double>(xp[idx]) - mp[c]) * ip[c];
      });
    });
  }
  return from_doubles(sums, 0, 2 * C, accumulate_dtype(input));
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& out, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& grad_means, bool relu,
    std::array<bool, 2> output_mask) {
  constexpr const char* op_name = "resfuse::_bn_act_backward_elemt";
  check_bn_act_backward_pass_args(grad_out, input, out, mean, invstd, op_name);
  check_optional_per_channel(weight, input.size(1), input, op_name, "weight");
  check_grad_means(grad_means, input, op_name);
  const auto format = input.suggest_memory_format();
  auto activation = [&](bool wanted) {
    return wanted ? empty_activation(input.sizes(), input, format) : not_requested(input, input.scalar_type());
  };
  at::Tensor grad_input = activation(output_mask[0]);
  at::Tensor grad_residual = activation(output_mask[1]);
  if (input.numel() == 0 || !(output_mask[0] || output_mask[1])) {
    return {grad_input, grad_residual};
  }
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  const std::vector<double> m = to_doubles(mean);
  const std::vector<double> is = to_doubles(invstd);
  const std::vector<double> gm = to_doubles(grad_means);
  const std::vector<double> w = to_doubles_or(weight, C, 1.0);

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_elemt_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // grad_input = (g - k1 - (x - mean)*m2) * a, as in bn_act_backward_cpu, with the global means of the sums.
    std::vector<opmath_t> c_mean(C), c_a(C), c_k1(C), c_m2(C);
    for (int64_t c = 0; c < C; ++c) {
      c_mean[c] = static_cast<opmath_t>(m[c]);
      c_a[c] = static_cast<opmath_t>(is[c] * w[c]);
      c_k1[c] = static_cast<opmath_t>(gm[c]);
      c_m2[c] = static_cast<opmath_t>(is[c] * gm[C + c]);
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = relu ? o.data_ptr<scalar_t>() : nullptr;
    scalar_t* gi = output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
    scalar_t* gr = output_mask[1] ? grad_residual.data_ptr<scalar_t>() : nullptr;
    const opmath_t* cm = c_mean.data();
    const opmath_t* ca = c_a.data();
    const opmath_t* ck1 = c_k1.data();
    const opmath_t* cm2 = c_m2.data();
    parallel_for_each(v, [=](int64_t c, int64_t idx) {
      const opmath_t g = masked_grad(gp, op, idx);
      if (gr != nullptr) {
        gr[idx] = static_cast<scalar_t>(g);
      }
      if (gi != nullptr) {
        const opmath_t xc = static_cast<opmath_t>(xp[idx]) - cm[c];
        gi[idx] = static_cast<scalar_t>((g - ck1[c] - xc * cm2[c]) * ca[c]);
      }
    });
  });
  return {grad_input, grad_residual};
}

}  // namespace
}  // namespace resfuse::cpu

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_act", &resfuse::cpu::bn_act_cpu);
  m.impl("_bn_act_backward", &resfuse::cpu::bn_act_backward_cpu);
  m.impl("_bn_stats", &resfuse::cpu::bn_stats_cpu);
  m.impl("_bn_act_apply", &resfuse::cpu::bn_act_apply_cpu);
  m.impl("_bn_act_backward_reduce", &resfuse::cpu::bn_act_backward_reduce_cpu);
  m.impl("_bn_act_backward_elemt", &resfuse::cpu::bn_act_backward_elemt_cpu);
}
