// CPU kernels of resfuse::bn_squeeze and resfuse::_bn_squeeze_backward (contract: csrc/resfuse.cpp; the math in
// resfuse/ops/bn_squeeze.py). Both are one pass over the activation.
//
// Forward, with P = H*W positions and M = N*P values per channel:
//   per (n, c): mean_nc and M2_nc over the P positions (sums shifted by the plane's first element)
//   per c:      mean = sum_n mean_nc / N;  M2 = sum_n M2_nc + P * sum_n (mean_nc - mean)^2  (Chan, equal counts)
//               invstd = 1/sqrt(M2/M + eps);  running stats as bn_act
//   squeeze[n, c] = (mean_nc - mean) * invstd
// Backward, given q = grad_squeeze [N, C], gm = grad_mean [C], gi = grad_invstd [C] (absent ones are zero):
//   Q1 = sum_n q,  Q2 = sum_n q*squeeze
//   grad_input = q*invstd/P + (gm - invstd*Q1)/M - (x - mean) * invstd^2 * (invstd*gi + Q2)/M
//
// Layouts: NCHW and NHWC both run on the [N, C, P] sample view (csrc/sample_view.h). Sums accumulate in double;
// the elementwise pass runs in float (double for float64 inputs).
#include "channel_view.h"
#include "sample_loops.h"

#include <torch/library.h>

#include <cmath>

namespace resfuse::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_squeeze_cpu(const at::Tensor& input,
                                                              const std::optional<at::Tensor>& running_mean,
                                                              const std::optional<at::Tensor>& running_var,
                                                              double momentum, double eps) {
  check_bn_squeeze_args(input, running_mean, running_var);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels, P = v.positions;
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const auto acc_opts = input.options().dtype(acc_dtype);
  if (x.numel() == 0) {
    // No statistics: zeros stand in for them and the running stats are left untouched (as bn_act).
    return {at::zeros({N, C}, acc_opts), at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
  }

  // Per (n, c): shifted sums of d = x - pivot, pivot = the plane's first element, then its mean and M2.
  std::vector<double> pivot(static_cast<size_t>(N * C));
  std::vector<double> sums;
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_squeeze_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t first = v.channels_last ? n * P * C + c : (n * C + c) * P;
        pivot[n * C + c] = static_cast<double>(xp[first]);
      }
    }
    const double* k = pivot.data();
    sums = reduce_per_sample<2>(v, [=](int64_t n, int64_t c, int64_t idx, double* acc) {
      const double d = static_cast<double>(xp[idx]) - k[n * C + c];
      acc[0] += d;
      acc[1] += d * d;
    });
  });

  const double p = static_cast<double>(P);
  const double m = static_cast<double>(v.per_channel());
  std::vector<double> plane_mean(static_cast<size_t>(N * C)), plane_m2(static_cast<size_t>(N * C));
  for (int64_t j = 0; j < N * C; ++j) {
    const double s1 = sums[2 * j], s2 = sums[2 * j + 1];
    plane_mean[j] = pivot[j] + s1 / p;
    const double m2 = s2 - s1 * (s1 / p);
    plane_m2[j] = m2 < 0.0 ? 0.0 : m2;  // rounding can leave a tiny negative; NaN stays NaN
  }
  std::vector<double> mean(C), var(C), invstd(C), squeeze(static_cast<size_t>(N * C));
  for (int64_t c = 0; c < C; ++c) {
    double total = 0.0;
    for (int64_t n = 0; n < N; ++n) total += plane_mean[n * C + c];
    const double mu = total / static_cast<double>(N);
    double m2 = 0.0, between = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const double d = plane_mean[n * C + c] - mu;
      m2 += plane_m2[n * C + c];
      between += d * d;
    }
    const double var_c = (m2 + p * between) / m;
    mean[c] = mu;
    var[c] = var_c < 0.0 ? 0.0 : var_c;
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    for (int64_t n = 0; n < N; ++n) squeeze[n * C + c] = (plane_mean[n * C + c] - mu) * invstd[c];
  }

  if (present(running_mean)) {
    at::Tensor rm = *running_mean;
    update_running(rm, mean, momentum);
  }
  if (present(running_var)) {
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) unbiased[c] = var[c] * m / (m - 1.0);
    at::Tensor rv = *running_var;
    update_running(rv, unbiased, momentum);
  }
  return {from_doubles(squeeze, 0, N * C, acc_dtype).view({N, C}), from_doubles(mean, 0, C, acc_dtype),
          from_doubles(invstd, 0, C, acc_dtype)};
}

at::Tensor bn_squeeze_backward_cpu(const std::optional<at::Tensor>& grad_squeeze,
                                   const std::optional<at::Tensor>& grad_mean,
                                   const std::optional<at::Tensor>& grad_invstd, const at::Tensor& input,
                                   const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& squeeze) {
  check_bn_squeeze_backward_args(grad_squeeze, grad_mean, grad_invstd, input, mean, invstd, squeeze);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels;
  at::Tensor grad_input = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return grad_input;
  }

  const std::vector<double> q = to_doubles_or(grad_squeeze, N * C, 0.0);
  const std::vector<double> gm = to_doubles_or(grad_mean, C, 0.0);
  const std::vector<double> gi = to_doubles_or(grad_invstd, C, 0.0);
  const std::vector<double> mu = to_doubles(mean);
  const std::vector<double> inv = to_doubles(invstd);
  const std::vector<double> s0 = to_doubles(squeeze);
  const double p = static_cast<double>(v.positions);
  const double m = static_cast<double>(v.per_channel());

  // grad_input = a[n, c] - (x - mean[c]) * b[c]
  std::vector<double> a(static_cast<size_t>(N * C)), b(C);
  for (int64_t c = 0; c < C; ++c) {
    double q1 = 0.0, q2 = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      q1 += q[n * C + c];
      q2 += q[n * C + c] * s0[n * C + c];
    }
    const double base = (gm[c] - inv[c] * q1) / m;
    b[c] = inv[c] * inv[c] * (inv[c] * gi[c] + q2) / m;
    for (int64_t n = 0; n < N; ++n) a[n * C + c] = q[n * C + c] * inv[c] / p + base;
  }

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_squeeze_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const std::vector<opmath_t> ca = cast_vector<opmath_t>(a), cb = cast_vector<opmath_t>(b),
                                cm = cast_vector<opmath_t>(mu);
    const opmath_t* ap = ca.data();
    const opmath_t* bp = cb.data();
    const opmath_t* mp = cm.data();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = grad_input.data_ptr<scalar_t>();
    parallel_for_each_sample(v, [=](int64_t n, int64_t c, int64_t idx) {
      gp[idx] = static_cast<scalar_t>(ap[n * C + c] - (static_cast<opmath_t>(xp[idx]) - mp[c]) * bp[c]);
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace resfuse::cpu

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_squeeze", &resfuse::cpu::bn_squeeze_cpu);
  m.impl("_bn_squeeze_backward", &resfuse::cpu::bn_squeeze_backward_cpu);
}
