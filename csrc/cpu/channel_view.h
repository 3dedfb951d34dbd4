// CPU loops over the [outer, C, inner] channel view (see csrc/common.h), shared by the CPU kernels.
//
// Parallel work units follow the memory layout so every thread streams contiguous memory:
//   NHWC (inner == 1): a unit is one row of C channels (o fixed), the channel loop is innermost;
//   NCHW (inner > 1):  a unit is one (o, c) plane of `inner` elements of a single channel.
#pragma once

#include "../common.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
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

// Elementwise pass: fn(c, idx) once per element, in parallel. fn must only write element idx.
template <typename F>
inline void parallel_for_each(const ChannelView& v, const F& fn) {
  const Units u = units_of(v);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, u.length));
  at::parallel_for(0, u.count, grain, [&](int64_t begin, int64_t end) { visit_units(v, begin, end, fn); });
}

// Per-channel sums of K quantities, returned as K*C doubles laid out [K][C].
// fn(c, idx, acc) adds element idx's contributions into acc[k*C + c].
// Deterministic: the work is cut into chunks whose number depends only on the shape (not on the thread count),
// each chunk accumulates its own double partials, and the partials are added in chunk order.
template <int K, typename F>
std::vector<double> reduce_per_channel(const ChannelView& v, const F& fn) {
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
      double* acc = partial.data() + chunk * K * C;
      const int64_t u0 = chunk * per_chunk;
      const int64_t u1 = std::min(u.count, u0 + per_chunk);
      visit_units(v, u0, u1, [&](int64_t c, int64_t idx) { fn(c, idx, acc); });
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

// out = act((x - center[c])*scale[c] + shift[c] + residual): the forward epilogue of both ops.
// BatchNorm passes (mean, w*invstd, b): the same value as the x*scale + (b - mean*scale) of the contract, without
// its cancellation when |mean| >> std. conv_bn_act passes (0, 1, bias), which is exact.
// `residual` may be null; `x` may alias `out` (in-place epilogue on a fresh convolution output).
template <typename scalar_t>
void affine_act(const ChannelView& v, const scalar_t* x, scalar_t* out,
                const std::vector<at::opmath_type<scalar_t>>& center,
                const std::vector<at::opmath_type<scalar_t>>& scale,
                const std::vector<at::opmath_type<scalar_t>>& shift, const scalar_t* residual, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t* ce = center.data();
  const opmath_t* sc = scale.data();
  const opmath_t* sh = shift.data();
  parallel_for_each(v, [=](int64_t c, int64_t idx) {
    opmath_t y = (static_cast<opmath_t>(x[idx]) - ce[c]) * sc[c] + sh[c];
    if (residual != nullptr) {
      y += static_cast<opmath_t>(residual[idx]);
    }
    // `y < 0` rather than `y > 0` keeps NaN as NaN, like torch.relu.
    if (relu && y < opmath_t(0)) {
      y = opmath_t(0);
    }
    out[idx] = static_cast<scalar_t>(y);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Small [C] vectors: per-channel parameters are read into doubles, results written back in the requested dtype.

inline std::vector<double> to_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return std::vector<double>(p, p + d.numel());
}

inline std::vector<double> to_doubles_or(const std::optional<at::Tensor>& t, int64_t n, double fallback) {
  return present(t) ? to_doubles(*t) : std::vector<double>(static_cast<size_t>(n), fallback);
}

// values[offset .. offset+n) as a [n] tensor of `dtype` on the CPU.
inline at::Tensor from_doubles(const std::vector<double>& values, int64_t offset, int64_t n, at::ScalarType dtype) {
  at::Tensor d = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  if (n > 0) {
    std::memcpy(d.data_ptr<double>(), values.data() + offset, static_cast<size_t>(n) * sizeof(double));
  }
  return d.to(dtype);
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

}  // namespace resfuse::cpu
