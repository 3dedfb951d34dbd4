// CPU loops over the [outer, C, inner] channel view (see csrc/common.h), shared by the CPU kernels.
//
// The passes of the kernels (statistics, affine + activation, the backward's sums and elementwise pass) run the
// vectorised loops of csrc/cpu/channel_loops.h, in parallel:
//   NHWC (inner == 1): over ranges of rows of C channels, the channel loop innermost;
//   NCHW (inner > 1):  over ranges of channels, a thread taking all of a channel's planes.
// parallel_for_each and reduce_per_channel take any per-element function, for what those loops do not cover;
// their units follow the layout too: a row of C channels (NHWC), or one (o, c) plane (NCHW).
//
// Every reduction is deterministic, the same bits at any thread count: a channel's NCHW sums are one thread's,
// in plane order; NHWC rows and the units of reduce_per_channel are cut into chunks whose number depends only on
// the shape, each chunk sums into its own double partials, and the partials are added in chunk order.
#pragma once

#include "../common.h"
#include "channel_loops.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace resfuse::cpu {

// Elements per parallel task: large enough to amortise the scheduling, small enough to balance 2..64 threads.
constexpr int64_t kGrainElems = 32768;
// Upper bound on reduction chunks, which bounds the partial-sum scratch at kMaxChunks * K * C doubles.
constexpr int64_t kMaxChunks = 256;

struct Units {
  int64_t count;   // number of units
  int64_t length;  // elements per unit
};

inline Units units_of(const ChannelView& v) {
  return v.inner == 1 ? Units{v.outer, v.channels} : Units{v.outer * v.channels, v.inner};
}

// Calls fn(c, idx) for every element of units [u0, u1), in memory order.
template <typename F>
inline void visit_units(const ChannelView& v, int64_t u0, int64_t u1, const F& fn) {
  const int64_t C = v.channels;
  if (v.inner == 1) {
    for (int64_t o = u0; o < u1; ++o) {
      const int64_t base = o * C;
      for (int64_t c = 0; c < C; ++c) {
        fn(c, base + c);
      }
    }
  } else {
    int64_t c = u0 % C;
    for (int64_t p = u0; p < u1; ++p) {
      const int64_t base = p * v.inner;
      for (int64_t i = 0; i < v.inner; ++i) {
        fn(c, base + i);
      }
      if (++c == C) {
        c = 0;
      }
    }
  }
}

// fn(u0, u1) over ranges of units, in parallel.
template <typename F>
inline void parallel_for_units(const ChannelView& v, const F& fn) {
  const Units u = units_of(v);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, u.length));
  at::parallel_for(0, u.count, grain, fn);
}

// The gradient through ReLU of element idx as torch's threshold_backward gives it: zero where out <= 0,
// grad_out elsewhere (a NaN output passes it on). `out` null: no ReLU. For the per-element passes below.
template <typename scalar_t>
inline at::opmath_type<scalar_t> relu_grad(const scalar_t* grad_out, const scalar_t* out, int64_t idx) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t g = static_cast<opmath_t>(grad_out[idx]);
  return (out != nullptr && static_cast<opmath_t>(out[idx]) <= opmath_t(0)) ? opmath_t(0) : g;
}

// Elementwise pass: fn(c, idx) once per element, in parallel. fn must only write element idx.
template <typename F>
inline void parallel_for_each(const ChannelView& v, const F& fn) {
  parallel_for_units(v, [&](int64_t begin, int64_t end) { visit_units(v, begin, end, fn); });
}

// NCHW (inner > 1): fn(c, offset) for every channel c, in parallel; its elements are the planes at
// offset + o*C*inner, o < outer (offset = c*inner). A kernel that runs all its passes over a channel inside one
// call keeps the channel's planes in that core's cache between the passes.
template <typename F>
inline void parallel_for_each_channel(const ChannelView& v, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, v.per_channel()));
  at::parallel_for(0, v.channels, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      fn(c, c * v.inner);
    }
  });
}

// Per-channel sums of K quantities over ranges of units, returned as K*C doubles laid out [K][C].
// fn(u0, u1, acc) adds the contributions of units [u0, u1) into acc[k*C + c]. Deterministic (see the top).
template <int K, typename F>
std::vector<double> reduce_units(const ChannelView& v, const F& fn) {
  const int64_t C = v.channels;
  const Units u = units_of(v);
  if (u.count == 0 || u.length == 0) {
    return std::vector<double>(static_cast<size_t>(K * C), 0.0);
  }
  int64_t chunks = std::clamp<int64_t>(ceil_div(u.count * u.length, kGrainElems), 1, std::min(kMaxChunks, u.count));
  const int64_t per_chunk = ceil_div(u.count, chunks);
  chunks = ceil_div(u.count, per_chunk);

  std::vector<double> partial(static_cast<size_t>(chunks * K * C), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t u0 = chunk * per_chunk;
      fn(u0, std::min(u.count, u0 + per_chunk), partial.data() + chunk * K * C);
    }
  });

  std::vector<double> total(static_cast<size_t>(K * C), 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* acc = partial.data() + chunk * K * C;
    for (int64_t j = 0; j < K * C; ++j) {
      total[j] += acc[j];
    }
  }
  return total;
}

// Per-channel sums of K quantities, returned as K*C doubles laid out [K][C].
// fn(c, idx, acc) adds element idx's contributions into acc[k*C + c]. Deterministic (see the top).
template <int K, typename F>
std::vector<double> reduce_per_channel(const ChannelView& v, const F& fn) {
  return reduce_units<K>(v, [&](int64_t u0, int64_t u1, double* acc) {
    visit_units(v, u0, u1, [&](int64_t c, int64_t idx) { fn(c, idx, acc); });
  });
}

// Pointer to element `off` of t, or null when t is.
template <typename T>
inline T* offset_or_null(T* t, int64_t off) {
  return t == nullptr ? nullptr : t + off;
}

// Per-channel Σ(x - pivot[c]) and Σ(x - pivot[c])^2, as 2*C doubles laid out [2][C]. pivot[c] is exact in
// opmath_t (the kernels pass a sample of the channel).
template <typename scalar_t>
std::vector<double> shifted_sums(const ChannelView& v, const scalar_t* x,
                                 const std::vector<at::opmath_type<scalar_t>>& pivot) {
  const int64_t C = v.channels;
  const auto* k = pivot.data();
  if (v.inner == 1) {
    return reduce_units<2>(v, [&](int64_t u0, int64_t u1, double* acc) {
      loops::shifted_sums_rows(x + u0 * C, u1 - u0, C, k, acc, acc + C);
    });
  }
  std::vector<double> sums(static_cast<size_t>(2 * C), 0.0);
  parallel_for_each_channel(v, [&](int64_t c, int64_t off) {
    loops::shifted_sums_planes(x + off, v.outer, C * v.inner, v.inner, k[c], &sums[c], &sums[C + c]);
  });
  return sums;
}

// The backward's per-channel Σg and Σg*(x - center[c]), as 2*C doubles laid out [2][C], where
// g = out <= 0 ? 0 : grad_out (`out` null: g = grad_out). `masked` (or null) receives g.
template <typename scalar_t>
std::vector<double> grad_sums(const ChannelView& v, const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
                              const std::vector<at::opmath_type<scalar_t>>& center, scalar_t* masked) {
  const int64_t C = v.channels;
  const auto* m = center.data();
  if (v.inner == 1) {
    return reduce_units<2>(v, [&](int64_t u0, int64_t u1, double* acc) {
      const int64_t off = u0 * C;
      loops::grad_sums_rows(grad_out + off, offset_or_null(out, off), x + off, u1 - u0, C, m, acc, acc + C,
                            offset_or_null(masked, off));
    });
  }
  std::vector<double> sums(static_cast<size_t>(2 * C), 0.0);
  parallel_for_each_channel(v, [&](int64_t c, int64_t off) {
    loops::grad_sums_planes(grad_out + off, offset_or_null(out, off), x + off, v.outer, C * v.inner, v.inner, m[c],
                            &sums[c], &sums[C + c], offset_or_null(masked, off));
  });
  return sums;
}

// The backward's elementwise pass: grad_input = (g - k1[c] - (x - center[c])*m2[c])*a[c] and grad_residual = g,
// with g as in grad_sums. grad_input or grad_residual may be null (not written).
template <typename scalar_t>
void grad_apply(const ChannelView& v, const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
                loops::GradCoefficientArrays<at::opmath_type<scalar_t>> coef, scalar_t* grad_input,
                scalar_t* grad_residual) {
  const int64_t C = v.channels;
  if (v.inner == 1) {
    parallel_for_units(v, [&](int64_t u0, int64_t u1) {
      const int64_t off = u0 * C;
      loops::grad_apply_rows(grad_out + off, offset_or_null(out, off), x + off, u1 - u0, C, coef,
                             offset_or_null(grad_input, off), offset_or_null(grad_residual, off));
    });
    return;
  }
  parallel_for_each_channel(v, [&](int64_t c, int64_t off) {
    loops::grad_apply_planes(grad_out + off, offset_or_null(out, off), x + off, v.outer, C * v.inner, v.inner,
                             {coef.center[c], coef.k1[c], coef.m2[c], coef.a[c]}, offset_or_null(grad_input, off),
                             offset_or_null(grad_residual, off));
  });
}

// out = act((x - center[c])*scale[c] + shift[c] + residual): the forward epilogue of both ops.
// BatchNorm passes (mean, w*invstd, b): the same value as the x*scale + (b - mean*scale) of the contract, without
// its cancellation when |mean| >> std. conv_bn_act passes (0, 1, bias), which is exact.
// `residual` may be null; `x` may alias `out` (in-place epilogue on a fresh convolution output).
template <typename scalar_t>
void affine_act(const ChannelView& v, const scalar_t* x, scalar_t* out,
                const std::vector<at::opmath_type<scalar_t>>& center,
                const std::vector<at::opmath_type<scalar_t>>& scale,
                const std::vector<at::opmath_type<scalar_t>>& shift, const scalar_t* residual, bool relu) {
  const int64_t C = v.channels;
  if (v.inner == 1) {
    parallel_for_units(v, [&](int64_t u0, int64_t u1) {
      const int64_t off = u0 * C;
      loops::affine_act_rows(x + off, offset_or_null(residual, off), out + off, u1 - u0, C, center.data(),
                             scale.data(), shift.data(), relu);
    });
    return;
  }
  parallel_for_each_channel(v, [&](int64_t c, int64_t off) {
    loops::affine_act_planes(x + off, offset_or_null(residual, off), out + off, v.outer, C * v.inner, v.inner,
                             center[c], scale[c], shift[c], relu);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Small [C] vectors: per-channel parameters are read into doubles, results written back in the requested dtype.

// Whether t's dtype is one RESFUSE_DISPATCH_FLOATING reads directly.
inline bool dispatchable(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A tensor's values as doubles in row-major order: a [C] per-channel vector (read in place, strided or not: no
// temporary tensor, this runs several times per call) or an [N, C] per-sample matrix.
inline std::vector<double> to_doubles(const at::Tensor& t) {
  if (!dispatchable(t.scalar_type())) {
    return to_doubles(t.to(at::kDouble));
  }
  if (t.dim() > 1 && !t.is_contiguous()) {
    return to_doubles(t.contiguous());
  }
  std::vector<double> values(static_cast<size_t>(t.numel()));
  RESFUSE_DISPATCH_FLOATING(t.scalar_type(), "resfuse_to_doubles", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    // Only a 1-D tensor is walked by its stride; a 0-D one has one value, a contiguous n-D one is flat.
    const int64_t stride = t.dim() == 1 ? t.stride(0) : 1;
    for (size_t i = 0; i < values.size(); ++i) {
      values[i] = static_cast<double>(p[static_cast<int64_t>(i) * stride]);
    }
  });
  return values;
}

inline std::vector<double> to_doubles_or(const std::optional<at::Tensor>& t, int64_t n, double fallback) {
  return present(t) ? to_doubles(*t) : std::vector<double>(static_cast<size_t>(n), fallback);
}

// values[offset .. offset+n) as a [n] tensor of `dtype` on the CPU, written in place.
inline at::Tensor from_doubles(const std::vector<double>& values, int64_t offset, int64_t n, at::ScalarType dtype) {
  if (!dispatchable(dtype)) {
    return from_doubles(values, offset, n, at::kDouble).to(dtype);
  }
  at::Tensor t = at::empty({n}, at::TensorOptions().dtype(dtype));
  RESFUSE_DISPATCH_FLOATING(dtype, "resfuse_from_doubles", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      p[i] = static_cast<scalar_t>(values[offset + i]);
    }
  });
  return t;
}

template <typename T>
std::vector<T> cast_vector(const std::vector<double>& values) {
  return std::vector<T>(values.begin(), values.end());
}

// running = (1 - momentum) * running + momentum * stat, in place, in double.
inline void update_running(at::Tensor& running, const std::vector<double>& stat, double momentum) {
  at::Tensor r = running.contiguous();
  RESFUSE_DISPATCH_FLOATING(r.scalar_type(), "resfuse_update_running", [&] {
    scalar_t* p = r.data_ptr<scalar_t>();
    for (size_t c = 0; c < stat.size(); ++c) {
      p[c] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(p[c]) + momentum * stat[c]);
    }
  });
  if (!r.is_same(running)) {
    running.copy_(r);
  }
}

// A new activation, out = act((input - center[c])*scale[c] + shift[c] + residual), in input's suggested layout,
// the per-channel vectors in double: the one pass of bn_act's apply (batch statistics) and of bn_eval_act
// (running statistics).
inline at::Tensor affine_act_pass(const at::Tensor& input, const std::vector<double>& center,
                                  const std::vector<double>& scale, const std::vector<double>& shift,
                                  const std::optional<at::Tensor>& residual, bool relu) {
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  at::Tensor out = empty_activation(input.sizes(), input, format);
  if (x.numel() == 0) {
    return out;
  }
  const at::Tensor res = present(residual) ? residual->contiguous(format) : at::Tensor();
  RESFUSE_DISPATCH_FLOATING(x.scalar_type(), "resfuse_affine_act_pass_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    affine_act<scalar_t>(channel_view(x, format), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         cast_vector<opmath_t>(center), cast_vector<opmath_t>(scale), cast_vector<opmath_t>(shift),
                         res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu);
  });
  return out;
}

}  // namespace resfuse::cpu
