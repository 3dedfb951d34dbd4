// CPU kernels of resfuse::bn_act and resfuse::_bn_act_backward (contract: the op schemas in csrc/resfuse.cpp).
//
// Forward (training-mode BatchNorm with batch statistics, fused with residual add and ReLU):
//   mean[c], var[c] (biased) over the n = N*H*W elements of channel c;  invstd = 1/sqrt(var + eps)
//   scale = w*invstd, shift = b - mean*scale;  out = act(x*scale + shift + residual)
//   (evaluated as (x - mean)*scale + b: equal, and free of cancellation when |mean| >> std)
//   running_mean/var (optional) updated in place; running_var uses the unbiased var*n/(n-1).
//   Two passes: the statistics (one read of x), then the output (x and residual read, out written).
// Backward:
//   g = relu ? (out <= 0 ? 0 : grad_out) : grad_out;  xhat = (x - mean)*invstd
//   sum_g[c] = sum g, sum_gx[c] = sum g*xhat   (one pass, which also writes grad_residual = g when asked for)
//   grad_input = (g - sum_g/n - xhat*sum_gx/n)*invstd*w;  grad_weight = sum_gx;  grad_bias = sum_g
//   (a second pass, which reads g back from grad_residual when the first wrote it)
//
// Layouts: both run on the [outer, C, inner] view (csrc/common.h). NCHW: one thread takes a channel through both
// passes, in one parallel region, so the second pass finds the channel's planes in that core's cache. NHWC: a
// reduction pass over all rows, then an elementwise pass. Statistics and sums accumulate in double,
// deterministically (the same bits at any thread count); elementwise math runs in float (double for float64
// inputs). The vectorised loops: csrc/cpu/channel_loops.h.
#include "../bn_passes.h"
#include "channel_view.h"

#include <torch/library.h>

#include <cmath>

namespace resfuse::cpu {
namespace {

// Per-channel results of the forward, in double.
struct Stats {
  std::vector<double> mean, var, invstd;
  explicit Stats(int64_t C) : mean(C), var(C), invstd(C) {}

  // Channel c from its sums shifted by `pivot` (one sample of the channel): the one-pass formula
  // var = E[d^2] - E[d]^2 on d = x - pivot is free of catastrophic cancellation when |mean| >> std.
  void finish(int64_t c, double pivot, double sum, double sum_sq, double n, double eps) {
    const double d_mean = sum / n;
    mean[c] = pivot + d_mean;
    const double biased = sum_sq / n - d_mean * d_mean;
    var[c] = biased < 0.0 ? 0.0 : biased;  // rounding can leave a tiny negative; NaN (an Inf or NaN input) stays NaN
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  }
};

// out = (x - center)*scale + shift: the coefficients of one channel.
template <typename opmath_t>
struct Affine {
  opmath_t center, scale, shift;
};

// Channel c's output map (x - mean)*scale + b, scale = w*invstd, for loops that compute in opmath_t: the center
// is the mean rounded to opmath_t, and the shift takes back the rounding, b - (mean - center)*scale in double.
// x - center is exact for x within a factor 2 of the center (all of a channel when |mean| >> std), so the outputs
// do not carry the mean's rounding (up to half an ulp of |mean|, times scale).
template <typename opmath_t>
Affine<opmath_t> output_map(const Stats& st, int64_t c, double w, double b) {
  const double scale = w * st.invstd[c];
  const auto center = static_cast<opmath_t>(st.mean[c]);
  return {center, static_cast<opmath_t>(scale), static_cast<opmath_t>(b - (st.mean[c] - center) * scale)};
}

template <typename scalar_t>
at::opmath_type<scalar_t> pivot_of(const ChannelView& v, const scalar_t* x, int64_t c) {
  return static_cast<at::opmath_type<scalar_t>>(x[c * v.inner]);  // element (0, c, 0)
}

// NCHW: each channel's statistics, then its output, by one thread (its planes stay in that core's cache).
template <typename scalar_t>
void forward_planes(const ChannelView& v, const scalar_t* x, const scalar_t* residual, scalar_t* out,
                    const std::vector<double>& w, const std::vector<double>& b, double eps, bool relu, Stats& st) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = v.channels, inner = v.inner, stride = C * inner;
  const double n = static_cast<double>(v.per_channel());
  parallel_for_each_channel(v, [&](int64_t c, int64_t off) {
    const opmath_t pivot = pivot_of(v, x, c);
    double sum = 0.0, sum_sq = 0.0;
    loops::shifted_sums_planes(x + off, v.outer, stride, inner, pivot, &sum, &sum_sq);
    st.finish(c, static_cast<double>(pivot), sum, sum_sq, n, eps);
    const auto map = output_map<opmath_t>(st, c, w[c], b[c]);
    loops::affine_act_planes(x + off, offset_or_null(residual, off), out + off, v.outer, stride, inner, map.center,
                             map.scale, map.shift, relu);
  });
}

// NHWC: a statistics pass over all rows, then the output pass.
template <typename scalar_t>
void forward_rows(const ChannelView& v, const scalar_t* x, const scalar_t* residual, scalar_t* out,
                  const std::vector<double>& w, const std::vector<double>& b, double eps, bool relu, Stats& st) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = v.channels;
  std::vector<opmath_t> pivot(C);
  for (int64_t c = 0; c < C; ++c) {
    pivot[c] = pivot_of(v, x, c);
  }
  const std::vector<double> sums = shifted_sums(v, x, pivot);
  const double n = static_cast<double>(v.per_channel());
  std::vector<opmath_t> center(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    st.finish(c, static_cast<double>(pivot[c]), sums[c], sums[C + c], n, eps);
    const auto map = output_map<opmath_t>(st, c, w[c], b[c]);
    center[c] = map.center;
    scale[c] = map.scale;
    shift[c] = map.shift;
  }
  affine_act<scalar_t>(v, x, out, center, scale, shift, residual, relu);
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
  const std::vector<double> w = to_doubles_or(weight, C, 1.0);
  const std::vector<double> b = to_doubles_or(bias, C, 0.0);

  Stats st(C);
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    if (v.inner > 1) {
      forward_planes(v, xp, rp, op, w, b, eps, relu, st);
    } else {
      forward_rows(v, xp, rp, op, w, b, eps, relu, st);
    }
  });

  if (present(running_mean)) {
    at::Tensor rm = *running_mean;
    update_running(rm, st.mean, momentum);
  }
  if (present(running_var)) {
    const double n = static_cast<double>(v.per_channel());
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) {
      unbiased[c] = st.var[c] * n / (n - 1.0);
    }
    at::Tensor rv = *running_var;
    update_running(rv, unbiased, momentum);
  }
  return {out, from_doubles(st.mean, 0, C, acc_dtype), from_doubles(st.invstd, 0, C, acc_dtype)};
}

// What the backward reads and writes; null pointers are terms switched off (see channel_loops.h).
//
// The pass of the sums, which reads grad_out and out, also writes g = out <= 0 ? 0 : grad_out as grad_residual when
// that is asked for; the gradients' pass then reads g back instead of grad_out and out (one stream less).
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* out;  // null without ReLU
  const scalar_t* x;
  scalar_t* grad_input;     // null when not asked for
  scalar_t* grad_residual;  // null when not asked for
  bool need_sums;           // grad_input, grad_weight or grad_bias asked for

  // The g the gradients' pass reads, as (grad_out, out) of the loops, and whether it writes grad_residual.
  const scalar_t* g_source() const { return need_sums && grad_residual ? grad_residual : grad_out; }
  const scalar_t* g_mask() const { return need_sums && grad_residual ? nullptr : out; }
  scalar_t* residual_in_apply() const { return need_sums ? nullptr : grad_residual; }
  bool need_apply() const { return grad_input != nullptr || residual_in_apply() != nullptr; }
};

// Per-channel sums of the backward (in double) and the coefficients of grad_input = (g - k1 - (x - mean)*m2)*a.
// The saved mean is in opmath_t already (the accumulate dtype), so the loops take it as it is.
struct BackwardSums {
  std::vector<double> sum_g, sum_gxhat;
  explicit BackwardSums(int64_t C) : sum_g(C, 0.0), sum_gxhat(C, 0.0) {}

  // Stores channel c's Σg and Σg*(x - mean)*invstd, and returns its coefficients.
  template <typename opmath_t>
  loops::GradCoefficients<opmath_t> finish(int64_t c, double sum_g_c, double sum_gx_c, opmath_t mean, double invstd,
                                           double w, double n) {
    sum_g[c] = sum_g_c;
    sum_gxhat[c] = sum_gx_c * invstd;
    return {mean, static_cast<opmath_t>(sum_g_c / n), static_cast<opmath_t>(invstd * sum_gxhat[c] / n),
            static_cast<opmath_t>(invstd * w)};
  }
};

// NCHW: each channel's sums, then its gradients, by one thread (its planes stay in that core's cache).
template <typename scalar_t>
void backward_planes(const ChannelView& v, const BackwardArgs<scalar_t>& a,
                     const std::vector<at::opmath_type<scalar_t>>& mean,
                     const std::vector<double>& invstd, const std::vector<double>& w, BackwardSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = v.channels, inner = v.inner, stride = C * inner;
  const double n = static_cast<double>(v.per_channel());
  parallel_for_each_channel(v, [&](int64_t c, int64_t off) {
    double sum_g = 0.0, sum_gx = 0.0;
    if (a.need_sums) {
      loops::grad_sums_planes(a.grad_out + off, offset_or_null(a.out, off), a.x + off, v.outer, stride, inner,
                              mean[c], &sum_g, &sum_gx, offset_or_null(a.grad_residual, off));
    }
    const auto coef = sums.finish<opmath_t>(c, sum_g, sum_gx, mean[c], invstd[c], w[c], n);
    if (a.need_apply()) {
      loops::grad_apply_planes(a.g_source() + off, offset_or_null(a.g_mask(), off), a.x + off, v.outer, stride,
                               inner, coef, offset_or_null(a.grad_input, off),
                               offset_or_null(a.residual_in_apply(), off));
    }
  });
}

// NHWC: a pass for the sums over all rows, then the gradients' pass.
template <typename scalar_t>
void backward_rows(const ChannelView& v, const BackwardArgs<scalar_t>& a,
                   const std::vector<at::opmath_type<scalar_t>>& mean,
                   const std::vector<double>& invstd, const std::vector<double>& w, BackwardSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = v.channels;
  const double n = static_cast<double>(v.per_channel());
  const std::vector<double> totals = a.need_sums ? grad_sums(v, a.grad_out, a.out, a.x, mean, a.grad_residual)
                                                 : std::vector<double>(2 * C, 0.0);
  std::vector<opmath_t> center(C), k1(C), m2(C), scale(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto coef = sums.finish<opmath_t>(c, totals[c], totals[C + c], mean[c], invstd[c], w[c], n);
    center[c] = coef.center;
    k1[c] = coef.k1;
    m2[c] = coef.m2;
    scale[c] = coef.a;
  }
  if (a.need_apply()) {
    grad_apply<scalar_t>(v, a.g_source(), a.g_mask(), a.x, {center.data(), k1.data(), m2.data(), scale.data()},
                         a.grad_input, a.residual_in_apply());
  }
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

  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;  // assigned below
  std::tie(grad_input, grad_weight, grad_bias, grad_residual) = bn_backward_outputs(input, pdtype, format, output_mask);
  if (x.numel() == 0) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  const std::vector<double> invstd = to_doubles(save_invstd);
  const std::vector<double> w = to_doubles_or(weight, C, 1.0);
  BackwardSums sums(C);
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_cpu", [&] {
    const auto mean = cast_vector<at::opmath_type<scalar_t>>(to_doubles(save_mean));
    const BackwardArgs<scalar_t> a{go.data_ptr<scalar_t>(),
                                   relu ? o.data_ptr<scalar_t>() : nullptr,
                                   x.data_ptr<scalar_t>(),
                                   output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
                                   output_mask[3] ? grad_residual.data_ptr<scalar_t>() : nullptr,
                                   output_mask[0] || output_mask[1] || output_mask[2]};
    if (v.inner > 1) {
      backward_planes(v, a, mean, invstd, w, sums);
    } else {
      backward_rows(v, a, mean, invstd, w, sums);
    }
  });
  if (output_mask[1]) grad_weight = from_doubles(sums.sum_gxhat, 0, C, pdtype);
  if (output_mask[2]) grad_bias = from_doubles(sums.sum_g, 0, C, pdtype);
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
    const double n = static_cast<double>(v.per_channel());
    Stats st(C);
    RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_stats_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      std::vector<opmath_t> pivot(C);
      for (int64_t c = 0; c < C; ++c) {
        pivot[c] = pivot_of(v, xp, c);
      }
      const std::vector<double> sums = shifted_sums(v, xp, pivot);
      for (int64_t c = 0; c < C; ++c) {
        st.finish(c, static_cast<double>(pivot[c]), sums[c], sums[C + c], n, /*eps=*/1.0);  // invstd unused
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      packed[c] = st.mean[c];
      packed[C + c] = st.var[c] * n;
    }
    packed[2 * C] = n;
  }
  return from_doubles(packed, 0, 2 * C + 1, at::kDouble);
}

at::Tensor bn_act_apply_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, bool relu) {
  check_bn_act_apply_args(input, mean, invstd, weight, bias, residual);
  const int64_t C = input.size(1);
  const std::vector<double> is = to_doubles(invstd);
  std::vector<double> scale = to_doubles_or(weight, C, 1.0);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] *= is[c];
  }
  return affine_act_pass(input, to_doubles(mean), scale, to_doubles_or(bias, C, 0.0), residual, relu);
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
        const double g = static_cast<double>(relu_grad(gp, op, idx));
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
      const opmath_t g = relu_grad(gp, op, idx);
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
