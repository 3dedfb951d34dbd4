// CPU kernels of resfuse::bn_scale_act and resfuse::_bn_scale_act_backward (contract: csrc/resfuse.cpp; the
// math in resfuse/ops/bn_scale_act.py). Each is one pass over the activation.
//
// Forward: z = (x - mean)*invstd*w + b;  out = act(z * f[n, c] + residual)   (every absent argument is the
//   identity: mean 0, invstd 1, w 1, b 0, f 1, no residual), evaluated as (x - mean)*a[n, c] + k[n, c] + residual
//   with a = invstd*w*f and k = b*f.
// Backward: g = relu ? (out <= 0 ? 0 : grad_out) : grad_out;  per (n, c): S1 = sum_p g, S2 = sum_p g*(x - mean)
//   grad_input = g*f*w*invstd;  grad_residual = g;  grad_scale[n, c] = w*invstd*S2 + b*S1
//   grad_weight = sum_n f*invstd*S2;  grad_bias = sum_n f*S1
//   grad_mean = -sum_n f*w*invstd*S1;  grad_invstd = sum_n f*w*S2
// Gradients of the per-channel and per-sample arguments come in those arguments' dtypes.
//
// Layouts: NCHW and NHWC both run on the [N, C, P] sample view (csrc/sample_view.h). Sums accumulate in double;
// elementwise math runs in float (double for float64 inputs).
#include "channel_view.h"
#include "sample_loops.h"

#include <torch/library.h>

namespace resfuse::cpu {
namespace {

// The per-channel and per-sample arguments as doubles, absent ones as their identity.
struct ScaleActParams {
  std::vector<double> mean, invstd, weight, bias, scale;  // [C] x 4, scale [N*C]

  ScaleActParams(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                 const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& i,
                 const std::optional<at::Tensor>& f, int64_t N, int64_t C)
      : mean(to_doubles_or(m, C, 0.0)),
        invstd(to_doubles_or(i, C, 1.0)),
        weight(to_doubles_or(w, C, 1.0)),
        bias(to_doubles_or(b, C, 0.0)),
        scale(to_doubles_or(f, N * C, 1.0)) {}
};

at::Tensor bn_scale_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                            const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "resfuse::bn_scale_act";
  check_bn_scale_act_args(input, weight, bias, mean, invstd, scale, op);
  if (present(residual)) check_like(*residual, input, op, "residual", "input");
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels;
  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return out;
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const ScaleActParams prm(weight, bias, mean, invstd, scale, N, C);
  std::vector<double> a(static_cast<size_t>(N * C)), k(static_cast<size_t>(N * C));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const double f = prm.scale[n * C + c];
      a[n * C + c] = prm.invstd[c] * prm.weight[c] * f;
      k[n * C + c] = prm.bias[c] * f;
    }
  }

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_scale_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const std::vector<opmath_t> ca = cast_vector<opmath_t>(a), ck = cast_vector<opmath_t>(k),
                                cm = cast_vector<opmath_t>(prm.mean);
    const opmath_t* ap = ca.data();
    const opmath_t* kp = ck.data();
    const opmath_t* mp = cm.data();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_for_each_sample(v, [=](int64_t n, int64_t c, int64_t idx) {
      const int64_t j = n * C + c;
      opmath_t y = (static_cast<opmath_t>(xp[idx]) - mp[c]) * ap[j] + kp[j];
      if (rp != nullptr) y += static_cast<opmath_t>(rp[idx]);
      // `y < 0` rather than `y > 0` keeps NaN as NaN, like torch.relu.
      if (relu && y < opmath_t(0)) y = opmath_t(0);
      dst[idx] = static_cast<scalar_t>(y);
    });
  });
  return out;
}

// A [n] gradient of `like`'s dtype from doubles, or the empty tensor of an output that was not asked for.
at::Tensor param_grad(bool wanted, const std::vector<double>& values, const std::optional<at::Tensor>& like,
                      const at::Tensor& input) {
  if (!wanted) return not_requested(input, present(like) ? like->scalar_type() : at::kFloat);
  return from_doubles(values, 0, static_cast<int64_t>(values.size()), like->scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_scale_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& scale,
                          const at::Tensor& out, bool relu, std::array<bool, 7> output_mask) {
  using G = ScaleActGrad;
  check_bn_scale_act_backward_args(grad_out, input, weight, bias, mean, invstd, scale, out, output_mask);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels;
  const auto activation = [&](bool wanted) {
    return wanted ? empty_activation(input.sizes(), input, format) : not_requested(input, input.scalar_type());
  };
  at::Tensor grad_input = activation(output_mask[G::kInput]);
  at::Tensor grad_residual = activation(output_mask[G::kResidual]);

  const ScaleActParams prm(weight, bias, mean, invstd, scale, N, C);
  const bool need_sums = output_mask[G::kWeight] || output_mask[G::kBias] || output_mask[G::kMean] ||
                         output_mask[G::kInvstd] || output_mask[G::kScale];
  std::vector<double> sums(static_cast<size_t>(N * C * 2), 0.0);  // [N][C][S1, S2]; zeros for an empty input
  if (x.numel() > 0) {
    std::vector<double> a(static_cast<size_t>(N * C));
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) a[n * C + c] = prm.scale[n * C + c] * prm.weight[c] * prm.invstd[c];
    }
    RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_scale_act_backward_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const std::vector<opmath_t> ca = cast_vector<opmath_t>(a);
      const opmath_t* ap = ca.data();
      const double* mp = prm.mean.data();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* outp = relu ? o.data_ptr<scalar_t>() : nullptr;
      scalar_t* gi = output_mask[G::kInput] ? grad_input.data_ptr<scalar_t>() : nullptr;
      scalar_t* gr = output_mask[G::kResidual] ? grad_residual.data_ptr<scalar_t>() : nullptr;
      auto masked = [=](int64_t idx) {
        const opmath_t g = static_cast<opmath_t>(gp[idx]);
        // `out <= 0`, as torch's threshold_backward: where the output is NaN the gradient passes.
        return (outp != nullptr && static_cast<opmath_t>(outp[idx]) <= opmath_t(0)) ? opmath_t(0) : g;
      };
      auto write = [=](int64_t n, int64_t c, int64_t idx, opmath_t g) {
        if (gr != nullptr) gr[idx] = static_cast<scalar_t>(g);
        if (gi != nullptr) gi[idx] = static_cast<scalar_t>(g * ap[n * C + c]);
      };
      if (need_sums) {
        sums = reduce_per_sample<2>(v, [=](int64_t n, int64_t c, int64_t idx, double* acc) {
          const opmath_t g = masked(idx);
          write(n, c, idx, g);
          const double gd = static_cast<double>(g);
          acc[0] += gd;
          acc[1] += gd * (static_cast<double>(xp[idx]) - mp[c]);
        });
      } else if (gi != nullptr || gr != nullptr) {
        parallel_for_each_sample(v, [=](int64_t n, int64_t c, int64_t idx) { write(n, c, idx, masked(idx)); });
      }
    });
  }

  std::vector<double> gw(C, 0.0), gb(C, 0.0), gm(C, 0.0), ginv(C, 0.0), gf(static_cast<size_t>(N * C));
  for (int64_t c = 0; c < C; ++c) {
    const double w = prm.weight[c], i = prm.invstd[c], b = prm.bias[c];
    for (int64_t n = 0; n < N; ++n) {
      const int64_t j = n * C + c;
      const double s1 = sums[2 * j], s2 = sums[2 * j + 1], f = prm.scale[j];
      gf[j] = w * i * s2 + b * s1;
      gw[c] += f * i * s2;
      gb[c] += f * s1;
      gm[c] -= f * w * i * s1;
      ginv[c] += f * w * s2;
    }
  }
  at::Tensor grad_scale = param_grad(output_mask[G::kScale], gf, scale, input);
  if (output_mask[G::kScale]) grad_scale = grad_scale.view({N, C});
  return {grad_input,
          param_grad(output_mask[G::kWeight], gw, weight, input),
          param_grad(output_mask[G::kBias], gb, bias, input),
          param_grad(output_mask[G::kMean], gm, mean, input),
          param_grad(output_mask[G::kInvstd], ginv, invstd, input),
          grad_scale,
          grad_residual};
}

}  // namespace
}  // namespace resfuse::cpu

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_scale_act", &resfuse::cpu::bn_scale_act_cpu);
  m.impl("_bn_scale_act_backward", &resfuse::cpu::bn_scale_act_backward_cpu);
}
