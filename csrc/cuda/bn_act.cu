// CUDA kernels of resfuse::bn_act and resfuse::_bn_act_backward (contract: the op schemas in csrc/resfuse.cpp).
//
// Forward (training-mode BatchNorm with batch statistics, fused with residual add and ReLU):
//   mean[c], var[c] (biased) over the n = N*H*W elements of channel c;  invstd = 1/sqrt(var + eps)
//   scale = w*invstd, shift = b - mean*scale;  out = act(x*scale + shift + residual)
//   (evaluated as (x - mean)*scale + b: equal, and free of cancellation when |mean| >> std)
//   running_mean/var (optional) updated in place; running_var uses the unbiased var*n/(n-1).
//   Kernels (two launches): per-block Welford partials, merged per channel (Chan) by each column's last block,
//   which also writes save_mean/save_invstd, scale and the running stats -> one elementwise pass writing `out`.
//   No host synchronisation.
// Backward:
//   g = relu ? (out <= 0 ? 0 : grad_out) : grad_out;  xhat = (x - mean)*invstd
//   sum_g[c] = sum g, sum_gx[c] = sum g*xhat (two-level reduction in one launch, one read of the inputs)
//   grad_input = (g - sum_g/n - xhat*sum_gx/n)*invstd*w;  grad_weight = sum_gx;  grad_bias = sum_g;  grad_residual = g
//
// Layouts: NCHW and NHWC both run on the [outer, C, inner] view (csrc/common.h, csrc/cuda/channel_view.cuh).
// Accumulation in fp32 (fp64 for float64 inputs); per-channel parameters are handled in that dtype.
#include "../bn_passes.h"
#include "channel_view.cuh"

#include <ATen/ops/cat.h>
#include <torch/library.h>

namespace resfuse {
// Reported by resfuse._C.cuda_version().
int compiled_cuda_runtime_version() { return CUDART_VERSION; }
}  // namespace resfuse

namespace resfuse::cuda {
namespace {

template <typename scalar_t, typename acc_t>
struct PushInput {
  const scalar_t* x;
  __device__ __forceinline__ void operator()(Welford<acc_t>& acc, int64_t idx, int64_t) const {
    acc.push(static_cast<acc_t>(x[idx]));
  }
};

// PushInput on 16-byte vectors of VEC channels of one NHWC row (partial_reduce_cl_vec_kernel).
template <typename scalar_t, typename acc_t>
struct PushInputVec {
  using Vec = Vec16<scalar_t>;
  static constexpr int kV = Vec::kSize;
  static constexpr int kUnroll = 4;  // one input stream: 4 x 16 B in flight per thread
  using Acc = WelfordVec<acc_t, kV>;
  using Lane = Welford<acc_t>;
  struct Lanes {};
  const scalar_t* x;

  __device__ __forceinline__ Lanes lanes(int64_t) const { return {}; }

  template <int U>
  __device__ __forceinline__ void fold(Acc& acc, const Lanes&, int64_t off, int64_t step) const {
    Vec v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = *reinterpret_cast<const Vec*>(x + off + u * step);
#pragma unroll
    for (int u = 0; u < U; ++u) acc.push(v[u]);
  }

  __device__ __forceinline__ Lane finish(const Acc& acc, int k, int64_t) const { return acc.lane(k); }
};

// Per channel: saved statistics, the scale and shift of the apply pass and the running-stat update. The
// per-channel tensors are read and updated in their own dtype param_t (see direct_param_dtype).
template <typename acc_t, typename param_t>
struct StatsFinalize {
  const param_t* weight;   // nullable: w = 1
  const param_t* bias;     // nullable: b = 0, and shift is not written
  param_t* running_mean;   // nullable
  param_t* running_var;    // nullable
  acc_t* save_mean;
  acc_t* save_invstd;
  acc_t* scale;
  acc_t* shift;
  acc_t n;
  acc_t eps;
  acc_t momentum;

  __device__ void operator()(int64_t c, const Welford<acc_t>& s) const {
    const acc_t mean = s.mean;
    // Rounding can leave a tiny negative M2; NaN (an Inf or NaN input) must stay NaN, as in eager.
    const acc_t var = s.m2 < acc_t(0) ? acc_t(0) : s.m2 / n;
    const acc_t invstd = acc_t(1) / sqrt(var + eps);
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    scale[c] = (weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1)) * invstd;
    if (bias != nullptr) shift[c] = static_cast<acc_t>(bias[c]);
    if (running_mean != nullptr) {
      running_mean[c] =
          static_cast<param_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_mean[c]) + momentum * mean);
    }
    if (running_var != nullptr) {
      running_var[c] = static_cast<param_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_var[c]) +
                                            momentum * var * n / (n - acc_t(1)));
    }
  }
};

template <typename scalar_t, typename acc_t>
struct BackwardSums {
  const scalar_t* grad_out;
  const scalar_t* out;  // nullable: no ReLU
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* invstd;

  __device__ __forceinline__ void operator()(Sum2<acc_t>& acc, int64_t idx, int64_t c) const {
    const acc_t g = masked_grad<scalar_t, acc_t>(grad_out, out, idx);
    acc.a += g;
    acc.b += g * (static_cast<acc_t>(x[idx]) - mean[c]) * invstd[c];
  }
};

// BackwardSums on 16-byte vectors of VEC channels of one NHWC row. A thread keeps its channels, so it holds
// their means in registers and sums g*(x - mean), scaled by invstd once per channel in finish().
template <typename scalar_t, typename acc_t>
struct BackwardSumsVec {
  using Vec = Vec16<scalar_t>;
  static constexpr int kV = Vec::kSize;
  static constexpr int kUnroll = kV > 4 ? 1 : cuda::kUnroll;  // 2-byte types: 3 streams x 1 vector, no spills
  using Acc = Sum2Vec<acc_t, kV>;
  using Lane = Sum2<acc_t>;
  struct Lanes {
    acc_t mean[kV];
  };
  const scalar_t* grad_out;
  const scalar_t* out;  // nullable: no ReLU
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* invstd;

  __device__ __forceinline__ Lanes lanes(int64_t c0) const {
    Lanes l;
#pragma unroll
    for (int k = 0; k < kV; ++k) l.mean[k] = mean[c0 + k];
    return l;
  }

  template <int U>
  __device__ __forceinline__ void fold(Acc& acc, const Lanes& l, int64_t off, int64_t step) const {
    Vec gv[U], ov[U], xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      gv[u] = *reinterpret_cast<const Vec*>(grad_out + off + u * step);
      if (out != nullptr) ov[u] = *reinterpret_cast<const Vec*>(out + off + u * step);
      xv[u] = *reinterpret_cast<const Vec*>(x + off + u * step);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        const acc_t g0 = static_cast<acc_t>(gv[u].v[k]);
        const acc_t g = (out != nullptr && static_cast<acc_t>(ov[u].v[k]) <= acc_t(0)) ? acc_t(0) : g0;
        acc.a[k] += g;
        acc.b[k] += g * (static_cast<acc_t>(xv[u].v[k]) - l.mean[k]);
      }
    }
  }

  __device__ __forceinline__ Lane finish(const Acc& acc, int k, int64_t c) const {
    return Lane{acc.a[k], acc.b[k] * invstd[c]};
  }
};

// Per channel: grad_weight/grad_bias (in param_t) and the coefficients [mean | a | k1 | m2] of
// grad_input = (g - k1 - (x - mean)*m2) * a,  a = invstd*w, k1 = sum_g/n, m2 = invstd*sum_gx/n.
template <typename acc_t, typename param_t>
struct BackwardFinalize {
  const param_t* weight;  // nullable: w = 1
  const acc_t* mean;
  const acc_t* invstd;
  param_t* grad_weight;   // nullable
  param_t* grad_bias;     // nullable
  acc_t* coef;            // nullable: grad_input not requested
  int64_t channels;
  acc_t n;

  __device__ void operator()(int64_t c, const Sum2<acc_t>& s) const {
    if (grad_weight != nullptr) grad_weight[c] = static_cast<param_t>(s.b);
    if (grad_bias != nullptr) grad_bias[c] = static_cast<param_t>(s.a);
    if (coef != nullptr) {
      coef[c] = mean[c];
      coef[channels + c] = invstd[c] * (weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1));
      coef[2 * channels + c] = s.a / n;
      coef[3 * channels + c] = invstd[c] * s.b / n;
    }
  }
};

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The dtype in which the finalisers can read and update the per-channel tensors `ts` directly: their common
// dtype when it is x's or the accumulation dtype and each is contiguous (a model cast to bf16, or fp32
// parameters under autocast); the accumulation dtype when none is given. Otherwise nullopt, and they go through
// accumulation-dtype copies: at most four conversion launches and two copies back per call, which cost more
// host time than the statistics kernels themselves at small activations.
std::optional<at::ScalarType> direct_param_dtype(const at::Tensor& x, at::ScalarType acc_dtype,
                                                 std::initializer_list<const std::optional<at::Tensor>*> ts) {
  std::optional<at::ScalarType> common;
  for (const auto* t : ts) {
    if (!present(*t)) continue;
    if (!(*t)->is_contiguous() || (common && *common != (*t)->scalar_type())) return std::nullopt;
    common = (*t)->scalar_type();
  }
  if (!common) return acc_dtype;
  if (*common == acc_dtype || *common == x.scalar_type()) return common;
  return std::nullopt;
}

// Runs fn(param_t{}) with param_t = scalar_t when dtype is x's, else acc_t (dtype is one of the two).
template <typename scalar_t, typename acc_t, typename Fn>
void with_param_type(at::ScalarType dtype, at::ScalarType x_dtype, Fn&& fn) {
  if (dtype == x_dtype) {
    fn(scalar_t{});
  } else {
    fn(acc_t{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps, bool relu) {
  check_bn_act_args(input, weight, bias, residual, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const auto acc_opts = input.options().dtype(acc_dtype);

  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return {out, at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const std::optional<at::ScalarType> direct =
      direct_param_dtype(x, acc_dtype, {&weight, &bias, &running_mean, &running_var});
  const at::ScalarType pdtype = direct ? *direct : acc_dtype;
  auto param = [&](const std::optional<at::Tensor>& t) {
    return present(t) ? (direct ? *t : as_channel_vector(*t, acc_dtype)) : at::Tensor();
  };
  const at::Tensor w = param(weight);
  const at::Tensor b = param(bias);
  // Without a direct dtype the finaliser updates accumulation-dtype copies, copied back afterwards.
  at::Tensor rm = param(running_mean);
  at::Tensor rv = param(running_var);

  at::Tensor save_mean = at::empty({C}, acc_opts);
  at::Tensor save_invstd = at::empty({C}, acc_opts);
  at::Tensor scale_shift = at::empty({2, C}, acc_opts);  // the apply pass's scale and shift, one allocation

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t, acc_t>(pdtype, x.scalar_type(), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      acc_t* scale = scale_shift.data_ptr<acc_t>();
      acc_t* shift = b.defined() ? scale + C : nullptr;
      const StatsFinalize<acc_t, param_t> fin{ptr_or_null<param_t>(w),
                                              ptr_or_null<param_t>(b),
                                              ptr_or_null<param_t>(rm),
                                              ptr_or_null<param_t>(rv),
                                              save_mean.data_ptr<acc_t>(),
                                              save_invstd.data_ptr<acc_t>(),
                                              scale,
                                              shift,
                                              static_cast<acc_t>(static_cast<double>(v.per_channel())),
                                              static_cast<acc_t>(eps),
                                              static_cast<acc_t>(momentum)};
      const scalar_t* xp = x.data_ptr<scalar_t>();
      if (cl_vec_reduce_ok<scalar_t>(v, {xp})) {
        reduce_per_channel_cl_vec(v, x, PushInputVec<scalar_t, acc_t>{xp}, fin);
      } else {
        reduce_per_channel<Welford<acc_t>>(v, x, PushInput<scalar_t, acc_t>{xp}, fin);
      }
      launch_affine_act<scalar_t, acc_t>(v, xp, out.data_ptr<scalar_t>(), save_mean.data_ptr<acc_t>(), scale,
                                         shift, ptr_or_null<scalar_t>(res), relu);
    });
  });

  if (rm.defined() && !rm.is_same(*running_mean)) running_mean->copy_(rm);
  if (rv.defined() && !rv.is_same(*running_var)) running_var->copy_(rv);
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& out, const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu,
    std::array<bool, 4> output_mask) {
  check_bn_act_backward_args(grad_out, input, weight, out, save_mean, save_invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(x, format);
  const int64_t C = v.channels;
  const at::ScalarType pdtype = param_dtype(weight);
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const auto acc_opts = input.options().dtype(acc_dtype);

  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;  // assigned inside the dispatch lambda below
  std::tie(grad_input, grad_weight, grad_bias, grad_residual) = bn_backward_outputs(input, pdtype, format, output_mask);
  if (x.numel() == 0) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  const bool need_sums = output_mask[0] || output_mask[1] || output_mask[2];
  const at::Tensor mean = as_channel_vector(save_mean, acc_dtype);
  const at::Tensor invstd = as_channel_vector(save_invstd, acc_dtype);
  // grad_weight / grad_bias are written straight into the outputs (dtype pdtype) when the finaliser can read
  // the weight in that dtype; otherwise through accumulation-dtype temporaries.
  std::optional<at::ScalarType> direct = direct_param_dtype(x, acc_dtype, {&weight});
  if (direct && *direct != pdtype) direct = std::nullopt;  // no weight, and pdtype (fp32) is not usable here
  const at::ScalarType kernel_pdtype = direct ? pdtype : acc_dtype;
  const at::Tensor w = present(weight) ? (direct ? *weight : as_channel_vector(*weight, acc_dtype)) : at::Tensor();
  const auto kernel_param = [&](bool wanted, const at::Tensor& output) {
    return !wanted ? at::Tensor() : (direct ? output : at::empty({C}, acc_opts));
  };
  const at::Tensor gw = kernel_param(output_mask[1], grad_weight);
  const at::Tensor gb = kernel_param(output_mask[2], grad_bias);
  const at::Tensor coef = output_mask[0] ? at::empty({4 * C}, acc_opts) : at::Tensor();

  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = ptr_or_null<scalar_t>(o);
    if (need_sums) {
      with_param_type<scalar_t, acc_t>(kernel_pdtype, x.scalar_type(), [&](auto param_tag) {
        using param_t = decltype(param_tag);
        const BackwardFinalize<acc_t, param_t> fin{ptr_or_null<param_t>(w),
                                                   mean.data_ptr<acc_t>(),
                                                   invstd.data_ptr<acc_t>(),
                                                   ptr_or_null<param_t>(gw),
                                                   ptr_or_null<param_t>(gb),
                                                   ptr_or_null<acc_t>(coef),
                                                   C,
                                                   static_cast<acc_t>(static_cast<double>(v.per_channel()))};
        if (cl_vec_reduce_ok<scalar_t>(v, {gp, op, xp})) {
          const BackwardSumsVec<scalar_t, acc_t> vsums{gp, op, xp, mean.data_ptr<acc_t>(),
                                                       invstd.data_ptr<acc_t>()};
          reduce_per_channel_cl_vec(v, x, vsums, fin);
        } else {
          const BackwardSums<scalar_t, acc_t> sums{gp, op, xp, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>()};
          reduce_per_channel<Sum2<acc_t>>(v, x, sums, fin);
        }
      });
    }
    if (output_mask[0] || output_mask[3]) {
      launch_backward_elementwise<scalar_t, acc_t>(v, gp, op, xp, ptr_or_null<acc_t>(coef),
                                                   output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
                                                   output_mask[3] ? grad_residual.data_ptr<scalar_t>() : nullptr);
    }
  });

  if (output_mask[1] && !direct) grad_weight = gw.to(pdtype);
  if (output_mask[2] && !direct) grad_bias = gb.to(pdtype);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// ---------------------------------------------------------------------------------------------------------------
// The passes above one at a time, for BatchNorm synchronised over a process group (resfuse/ops/sync_bn_act.py).
// The same reductions and elementwise kernels, with finalisers that write what the collectives carry.

// Per channel: the local [mean | M2 | count] in double (count written once, by channel 0).
template <typename acc_t>
struct LocalStatsFinalize {
  double* packed;  // 2C + 1 values
  int64_t channels;
  double n;

  __device__ void operator()(int64_t c, const Welford<acc_t>& s) const {
    packed[c] = static_cast<double>(s.mean);
    // NaN stays NaN, as in StatsFinalize.
    packed[channels + c] = s.m2 < acc_t(0) ? 0.0 : static_cast<double>(s.m2);
    if (c == 0) packed[2 * channels] = n;
  }
};

// Per channel: the local [sum g | sum g*xhat].
template <typename acc_t>
struct LocalSumsFinalize {
  acc_t* sums;  // 2C values
  int64_t channels;

  __device__ void operator()(int64_t c, const Sum2<acc_t>& s) const {
    sums[c] = s.a;
    sums[channels + c] = s.b;
  }
};

at::Tensor bn_stats_cuda(const at::Tensor& input) {
  check_activation(input, "resfuse::_bn_stats", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const auto packed_opts = input.options().dtype(at::kDouble);
  if (x.numel() == 0) {
    return at::zeros({2 * v.channels + 1}, packed_opts);  // count 0 weighs nothing
  }
  at::Tensor packed = at::empty({2 * v.channels + 1}, packed_opts);
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LocalStatsFinalize<acc_t> fin{packed.data_ptr<double>(), v.channels,
                                        static_cast<double>(v.per_channel())};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (cl_vec_reduce_ok<scalar_t>(v, {xp})) {
      reduce_per_channel_cl_vec(v, x, PushInputVec<scalar_t, acc_t>{xp}, fin);
    } else {
      reduce_per_channel<Welford<acc_t>>(v, x, PushInput<scalar_t, acc_t>{xp}, fin);
    }
  });
  return packed;
}

at::Tensor bn_act_apply_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, bool relu) {
  check_bn_act_apply_args(input, mean, invstd, weight, bias, residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return out;
  }
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  const at::Tensor center = as_channel_vector(mean, acc_dtype);
  const at::Tensor inv = as_channel_vector(invstd, acc_dtype);
  const at::Tensor scale = present(weight) ? inv.mul(as_channel_vector(*weight, acc_dtype)) : inv;
  const at::Tensor shift = present(bias) ? as_channel_vector(*bias, acc_dtype) : at::Tensor();
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_affine_act<scalar_t, acc_t>(v, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), center.data_ptr<acc_t>(),
                                       scale.data_ptr<acc_t>(), ptr_or_null<acc_t>(shift),
                                       ptr_or_null<scalar_t>(res), relu);
  });
  return out;
}

at::Tensor bn_act_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
                                       const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  check_bn_act_backward_pass_args(grad_out, input, out, mean, invstd, "resfuse::_bn_act_backward_reduce");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const ChannelView v = channel_view(x, format);
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  if (x.numel() == 0) {
    return at::zeros({2 * v.channels}, input.options().dtype(acc_dtype));
  }
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const at::Tensor m = as_channel_vector(mean, acc_dtype);
  const at::Tensor inv = as_channel_vector(invstd, acc_dtype);
  at::Tensor sums = at::empty({2 * v.channels}, input.options().dtype(acc_dtype));
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = ptr_or_null<scalar_t>(o);
    const LocalSumsFinalize<acc_t> fin{sums.data_ptr<acc_t>(), v.channels};
    if (cl_vec_reduce_ok<scalar_t>(v, {gp, op, xp})) {
      reduce_per_channel_cl_vec(v, x, BackwardSumsVec<scalar_t, acc_t>{gp, op, xp, m.data_ptr<acc_t>(),
                                                                       inv.data_ptr<acc_t>()}, fin);
    } else {
      reduce_per_channel<Sum2<acc_t>>(v, x, BackwardSums<scalar_t, acc_t>{gp, op, xp, m.data_ptr<acc_t>(),
                                                                          inv.data_ptr<acc_t>()}, fin);
    }
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& out, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& grad_means, bool relu,
    std::array<bool, 2> output_mask) {
  constexpr const char* op_name = "resfuse::_bn_act_backward_elemt";
  check_bn_act_backward_pass_args(grad_out, input, out, mean, invstd, op_name);
  check_optional_per_channel(weight, input.size(1), input, op_name, "weight");
  check_grad_means(grad_means, input, op_name);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  auto activation = [&](bool wanted) {
    return wanted ? empty_activation(input.sizes(), input, format) : not_requested(input, input.scalar_type());
  };
  at::Tensor grad_input = activation(output_mask[0]);
  at::Tensor grad_residual = activation(output_mask[1]);
  if (input.numel() == 0 || !(output_mask[0] || output_mask[1])) {
    return {grad_input, grad_residual};
  }
  const int64_t C = input.size(1);
  const at::ScalarType acc_dtype = accumulate_dtype(input);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor go = grad_out.contiguous(format);
  const at::Tensor o = relu ? out.contiguous(format) : at::Tensor();
  const ChannelView v = channel_view(x, format);
  at::Tensor coef;  // [mean | a | k1 | m2] of grad_input = (g - k1 - (x - mean)*m2) * a, as BackwardFinalize's
  if (output_mask[0]) {
    const at::Tensor inv = as_channel_vector(invstd, acc_dtype);
    const at::Tensor gm = as_channel_vector(grad_means, acc_dtype);
    const at::Tensor a = present(weight) ? inv.mul(as_channel_vector(*weight, acc_dtype)) : inv;
    coef = at::cat({as_channel_vector(mean, acc_dtype), a, gm.slice(0, 0, C), inv.mul(gm.slice(0, C, 2 * C))});
  }
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_bn_act_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_backward_elementwise<scalar_t, acc_t>(v, go.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(o),
                                                 x.data_ptr<scalar_t>(), ptr_or_null<acc_t>(coef),
                                                 output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
                                                 output_mask[1] ? grad_residual.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_input, grad_residual};
}

}  // namespace
}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_act", &resfuse::cuda::bn_act_cuda);
  m.impl("_bn_act_backward", &resfuse::cuda::bn_act_backward_cuda);
  m.impl("_bn_stats", &resfuse::cuda::bn_stats_cuda);
  m.impl("_bn_act_apply", &resfuse::cuda::bn_act_apply_cuda);
  m.impl("_bn_act_backward_reduce", &resfuse::cuda::bn_act_backward_reduce_cuda);
  m.impl("_bn_act_backward_elemt", &resfuse::cuda::bn_act_backward_elemt_cuda);
}
