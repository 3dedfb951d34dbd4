// CUDA kernels of resfuse::bn_squeeze and resfuse::_bn_squeeze_backward (contract: csrc/resfuse.cpp; the math
// in resfuse/ops/bn_squeeze.py and csrc/cpu/bn_squeeze.cpp). Compiled, never run here: no GPU has run them yet.
//
// Forward, two launches: a per-(n, c) Welford reduction over the P positions (one read of x), then one thread
// per channel merges its N (mean, M2) pairs (Chan, equal counts), writes mean, invstd, the squeeze
// (mean_nc - mean)*invstd and the running statistics.
// Backward, two launches: one thread per channel computes a[n, c] and b[c] of grad_x = a - (x - mean)*b, then
// one elementwise pass.
#include "sample_reduce.cuh"

#include <torch/library.h>

namespace resfuse::cuda {
namespace {

template <typename scalar_t, typename acc_t>
struct PushSample {
  const scalar_t* x;
  __device__ __forceinline__ void operator()(Welford<acc_t>& acc, int64_t idx, int64_t, int64_t) const {
    acc.push(static_cast<acc_t>(x[idx]));
  }
};

template <typename acc_t>
struct StorePlane {
  acc_t* plane_mean;  // [N, C]
  acc_t* plane_m2;    // [N, C]
  int64_t channels;
  __device__ void operator()(int64_t n, int64_t c, const Welford<acc_t>& s) const {
    plane_mean[n * channels + c] = s.mean;
    plane_m2[n * channels + c] = s.m2 < acc_t(0) ? acc_t(0) : s.m2;  // NaN (an Inf or NaN input) stays NaN
  }
};

template <typename acc_t>
struct SqueezeFinalize {
  const acc_t* plane_mean;
  const acc_t* plane_m2;
  acc_t* mean;
  acc_t* invstd;
  acc_t* squeeze;
  acc_t* running_mean;  // nullable
  acc_t* running_var;   // nullable
  int64_t samples, channels;
  acc_t positions, eps, momentum;

  __device__ void operator()(int64_t c) const {
    const int64_t C = channels;
    acc_t total = 0;
    for (int64_t n = 0; n < samples; ++n) total += plane_mean[n * C + c];
    const acc_t count_n = static_cast<acc_t>(samples);
    const acc_t mu = total / count_n;
    acc_t within = 0, between = 0;
    for (int64_t n = 0; n < samples; ++n) {
      const acc_t d = plane_mean[n * C + c] - mu;
      within += plane_m2[n * C + c];
      between += d * d;
    }
    const acc_t count = count_n * positions;
    acc_t var = (within + positions * between) / count;
    var = var < acc_t(0) ? acc_t(0) : var;  // NaN stays NaN
    const acc_t inv = acc_t(1) / sqrt(var + eps);
    mean[c] = mu;
    invstd[c] = inv;
    for (int64_t n = 0; n < samples; ++n) squeeze[n * C + c] = (plane_mean[n * C + c] - mu) * inv;
    if (running_mean != nullptr) running_mean[c] = (acc_t(1) - momentum) * running_mean[c] + momentum * mu;
    if (running_var != nullptr) {
      running_var[c] = (acc_t(1) - momentum) * running_var[c] + momentum * var * count / (count - acc_t(1));
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_squeeze_cuda(const at::Tensor& input,
                                                               const std::optional<at::Tensor>& running_mean,
                                                               const std::optional<at::Tensor>& running_var,
                                                               double momentum, double eps) {
  check_bn_squeeze_args(input, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels;
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const auto acc_opts = input.options().dtype(acc_dtype);
  if (x.numel() == 0) {
    return {at::zeros({N, C}, acc_opts), at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
  }
  at::Tensor squeeze = at::empty({N, C}, acc_opts);
  at::Tensor mean = at::empty({C}, acc_opts);
  at::Tensor invstd = at::empty({C}, acc_opts);
  at::Tensor planes = at::empty({2, N, C}, acc_opts);
  // The finaliser updates accumulation-dtype copies of the running statistics, copied back afterwards.
  at::Tensor rm = as_acc_or_undefined(running_mean, acc_dtype);
  at::Tensor rv = as_acc_or_undefined(running_var, acc_dtype);

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_squeeze_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pm = planes.data_ptr<acc_t>();
    reduce_per_sample<Welford<acc_t>>(v, PushSample<scalar_t, acc_t>{x.data_ptr<scalar_t>()},
                                      StorePlane<acc_t>{pm, pm + N * C, C});
    for_each_channel(C, SqueezeFinalize<acc_t>{pm, pm + N * C, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
                                               squeeze.data_ptr<acc_t>(), rm.defined() ? rm.data_ptr<acc_t>() : nullptr,
                                               rv.defined() ? rv.data_ptr<acc_t>() : nullptr, N, C,
                                               static_cast<acc_t>(static_cast<double>(v.positions)),
                                               static_cast<acc_t>(eps), static_cast<acc_t>(momentum)});
  });
  if (rm.defined() && !rm.is_same(*running_mean)) running_mean->copy_(rm);
  if (rv.defined() && !rv.is_same(*running_var)) running_var->copy_(rv);
  return {squeeze, mean, invstd};
}

template <typename acc_t>
struct SqueezeBackwardCoef {
  const acc_t* grad_squeeze;  // nullable: zero
  const acc_t* grad_mean;     // nullable: zero
  const acc_t* grad_invstd;   // nullable: zero
  const acc_t* squeeze;
  const acc_t* invstd;
  acc_t* a;  // [N, C]
  acc_t* b;  // [C]
  int64_t samples, channels;
  acc_t positions;

  __device__ void operator()(int64_t c) const {
    const int64_t C = channels;
    acc_t q1 = 0, q2 = 0;
    if (grad_squeeze != nullptr) {
      for (int64_t n = 0; n < samples; ++n) {
        q1 += grad_squeeze[n * C + c];
        q2 += grad_squeeze[n * C + c] * squeeze[n * C + c];
      }
    }
    const acc_t inv = invstd[c];
    const acc_t count = static_cast<acc_t>(samples) * positions;
    const acc_t gm = grad_mean != nullptr ? grad_mean[c] : acc_t(0);
    const acc_t gi = grad_invstd != nullptr ? grad_invstd[c] : acc_t(0);
    const acc_t base = (gm - inv * q1) / count;
    b[c] = inv * inv * (inv * gi + q2) / count;
    for (int64_t n = 0; n < samples; ++n) {
      a[n * C + c] = (grad_squeeze != nullptr ? grad_squeeze[n * C + c] * inv / positions : acc_t(0)) + base;
    }
  }
};

template <typename scalar_t, typename acc_t>
struct SqueezeBackwardDx {
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* a;
  const acc_t* b;
  scalar_t* grad_input;
  int64_t channels;
  __device__ __forceinline__ void operator()(int64_t idx, int64_t n, int64_t c) const {
    grad_input[idx] = static_cast<scalar_t>(a[n * channels + c] - (static_cast<acc_t>(x[idx]) - mean[c]) * b[c]);
  }
};

at::Tensor bn_squeeze_backward_cuda(const std::optional<at::Tensor>& grad_squeeze,
                                    const std::optional<at::Tensor>& grad_mean,
                                    const std::optional<at::Tensor>& grad_invstd, const at::Tensor& input,
                                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& squeeze) {
  check_bn_squeeze_backward_args(grad_squeeze, grad_mean, grad_invstd, input, mean, invstd, squeeze);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const SampleView v = sample_view(x, format);
  const int64_t N = v.samples, C = v.channels;
  at::Tensor grad_input = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return grad_input;
  }
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const at::Tensor q = as_acc_or_undefined(grad_squeeze, acc_dtype);
  const at::Tensor gm = as_acc_or_undefined(grad_mean, acc_dtype);
  const at::Tensor gi = as_acc_or_undefined(grad_invstd, acc_dtype);
  const at::Tensor mu = mean.to(acc_dtype).contiguous();
  const at::Tensor inv = invstd.to(acc_dtype).contiguous();
  const at::Tensor s0 = squeeze.to(acc_dtype).contiguous();
  at::Tensor coef = at::empty({(N + 1) * C}, input.options().dtype(acc_dtype));  // a [N, C], then b [C]

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_squeeze_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* a = coef.data_ptr<acc_t>();
    acc_t* b = a + N * C;
    for_each_channel(C, SqueezeBackwardCoef<acc_t>{data_or_null<acc_t>(q), data_or_null<acc_t>(gm),
                                                   data_or_null<acc_t>(gi), s0.data_ptr<acc_t>(),
                                                   inv.data_ptr<acc_t>(), a, b, N, C,
                                                   static_cast<acc_t>(static_cast<double>(v.positions))});
    for_each_sample_element(v, SqueezeBackwardDx<scalar_t, acc_t>{x.data_ptr<scalar_t>(), mu.data_ptr<acc_t>(), a,
                                                                  b, grad_input.data_ptr<scalar_t>(), C});
  });
  return grad_input;
}

}  // namespace
}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_squeeze", &resfuse::cuda::bn_squeeze_cuda);
  m.impl("_bn_squeeze_backward", &resfuse::cuda::bn_squeeze_backward_cuda);
}
