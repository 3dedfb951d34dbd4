// CPU kernel of resfuse::_fold_bn (math and layouts: csrc/fold_bn.h).
//
// Per output channel o: scale and b'[o] in acc_t (fp32, fp64 for fp64 conv weights), then every element of
// W'[o] = conv_weight[o] * scale, read through conv_weight's strides and written through W''s, so any input
// layout folds into any output layout in one pass. Output channels run in parallel.
#include "../fold_bn.h"
#include "channel_view.h"

#include <torch/library.h>

#include <cmath>

namespace resfuse::cpu {
namespace {

template <typename acc_t>
struct FoldCoefficients {
  std::vector<acc_t> scale;
  std::vector<acc_t> shift;
};

template <typename acc_t>
FoldCoefficients<acc_t> fold_coefficients(int64_t C, const std::optional<at::Tensor>& conv_bias,
                                          const std::optional<at::Tensor>& bn_weight,
                                          const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                                          const at::Tensor& running_var, double eps) {
  // Every float dtype is exact in double, so reading through doubles then rounding to acc_t is reading in acc_t.
  const std::vector<double> cb = to_doubles_or(conv_bias, C, 0.0);
  const std::vector<double> bw = to_doubles_or(bn_weight, C, 1.0);
  const std::vector<double> bb = to_doubles_or(bn_bias, C, 0.0);
  const std::vector<double> rm = to_doubles(running_mean);
  const std::vector<double> rv = to_doubles(running_var);
  FoldCoefficients<acc_t> f{std::vector<acc_t>(C), std::vector<acc_t>(C)};
  const acc_t e = static_cast<acc_t>(eps);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t s = static_cast<acc_t>(bw[c]) * (acc_t(1) / std::sqrt(static_cast<acc_t>(rv[c]) + e));
    f.scale[c] = s;
    f.shift[c] = static_cast<acc_t>(bb[c]) + (static_cast<acc_t>(cb[c]) - static_cast<acc_t>(rm[c])) * s;
  }
  return f;
}

template <typename in_t, typename out_t, typename acc_t>
void fold_weight(const at::Tensor& conv_weight, at::Tensor& folded, const std::vector<acc_t>& scale) {
  const int64_t C = conv_weight.size(0), cg = conv_weight.size(1), kh = conv_weight.size(2), kw = conv_weight.size(3);
  const auto is = conv_weight.strides();
  const auto os = folded.strides();
  const std::array<int64_t, 4> in_stride{is[0], is[1], is[2], is[3]};
  const std::array<int64_t, 4> out_stride{os[0], os[1], os[2], os[3]};
  const in_t* src = conv_weight.data_ptr<in_t>();
  out_t* dst = folded.data_ptr<out_t>();
  const acc_t* sp = scale.data();
  const int64_t per_channel = cg * kh * kw;
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_channel)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const acc_t s = sp[o];
      for (int64_t i = 0; i < cg; ++i) {
        for (int64_t y = 0; y < kh; ++y) {
          for (int64_t x = 0; x < kw; ++x) {
            const acc_t wv = static_cast<acc_t>(
                src[o * in_stride[0] + i * in_stride[1] + y * in_stride[2] + x * in_stride[3]]);
            dst[o * out_stride[0] + i * out_stride[1] + y * out_stride[2] + x * out_stride[3]] =
                static_cast<out_t>(wv * s);
          }
        }
      }
    }
  });
}

template <typename acc_t>
void fold_with(const at::Tensor& conv_weight, at::Tensor& folded, at::Tensor& bias,
               const FoldCoefficients<acc_t>& f) {
  RESFUSE_DISPATCH_FLOATING(folded.scalar_type(), "resfuse_fold_bn_bias_cpu", [&] {
    scalar_t* b = bias.data_ptr<scalar_t>();
    for (size_t c = 0; c < f.shift.size(); ++c) {
      b[c] = static_cast<scalar_t>(f.shift[c]);
    }
  });
  if (folded.numel() == 0) {
    return;
  }
  RESFUSE_DISPATCH_FLOATING(conv_weight.scalar_type(), "resfuse_fold_bn_cpu", [&] {
    using in_t = scalar_t;
    RESFUSE_DISPATCH_FLOATING(folded.scalar_type(), "resfuse_fold_bn_cpu_out",
                              [&] { fold_weight<in_t, scalar_t, acc_t>(conv_weight, folded, f.scale); });
  });
}

std::tuple<at::Tensor, at::Tensor> fold_bn_cpu(const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                                               const std::optional<at::Tensor>& bn_weight,
                                               const std::optional<at::Tensor>& bn_bias,
                                               const at::Tensor& running_mean, const at::Tensor& running_var,
                                               double eps, at::ScalarType dtype, c10::string_view layout) {
  check_fold_bn_args(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, dtype);
  auto [folded, bias] = empty_fold_outputs(conv_weight, dtype, fold_order(layout));
  const int64_t C = conv_weight.size(0);
  if (conv_weight.scalar_type() == at::kDouble) {
    fold_with(conv_weight, folded, bias,
              fold_coefficients<double>(C, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps));
  } else {
    fold_with(conv_weight, folded, bias,
              fold_coefficients<float>(C, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps));
  }
  return {folded, bias};
}

}  // namespace
}  // namespace resfuse::cpu

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("_fold_bn", &resfuse::cpu::fold_bn_cpu);
}
