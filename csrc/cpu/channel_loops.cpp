// The vectorised inner loops declared in csrc/cpu/channel_loops.h.
//
// Two loop skeletons per shape of work, planes and rows: one runs an elementwise step over every element, the
// other adds the two sums of a step into double. The steps (below the skeletons) say what one vector of 16
// elements, or one element, does; their per-channel values are a Scalar (the planes of one channel) or a
// PerChannel array (rows). Options (residual, ReLU mask, which outputs) are template parameters, so the vector
// step has no branch; the exported functions at the bottom pick the variant, and for float and double carry
// RESFUSE_CPU_CLONES (csrc/cpu/simd.h): each variant is compiled once per instruction set. Everything they call is
// always inlined (functors, not lambdas, whose bodies a clone might not compile for its instruction set). Half and
// bfloat16 run the scalar steps only.
#include "channel_loops.h"

#include "simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace resfuse::cpu::loops {
namespace {

using simd::Doubles;
using simd::kLanes;
using simd::load;
using simd::store;
using simd::sum_lanes;

constexpr int64_t kHalfLanes = kLanes / 2;

// Sums run in two levels: 16 lanes of at::opmath_type<T> take a short block of elements each (kBlockSteps vector
// steps of a plane, kRowBlock rows), then go into double lanes. Most of the arithmetic stays in float, 16 lanes a
// register; no float partial sum has more than 8 terms.
constexpr int64_t kBlockSteps = 8;
constexpr int64_t kRowBlock = 8;

template <typename T>
constexpr bool kVectorised = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T>
using VecOf = simd::Vec<opmath_t<T>>;

template <typename T>
RESFUSE_ALWAYS_INLINE opmath_t<T> as_opmath(T v) {
  return static_cast<opmath_t<T>>(v);
}

template <typename T>
RESFUSE_ALWAYS_INLINE double as_double(T v) {
  return static_cast<double>(as_opmath(v));
}

// Adds the 16 lanes of v (of opmath type M) into two vectors of 8 doubles.
template <typename M>
RESFUSE_ALWAYS_INLINE void add_to_doubles(const simd::Vec<M>& v, Doubles& low, Doubles& high) {
  simd::Half<M> a, b;
  std::memcpy(&a, &v, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
  low += __builtin_convertvector(a, Doubles);
  high += __builtin_convertvector(b, Doubles);
}

// The same, into 16 doubles in memory.
template <typename M>
RESFUSE_ALWAYS_INLINE void add_to_doubles(const simd::Vec<M>& v, double* acc) {
  Doubles low = load<Doubles>(acc), high = load<Doubles>(acc + kHalfLanes);
  add_to_doubles<M>(v, low, high);
  store(acc, low);
  store(acc + kHalfLanes, high);
}

// A per-channel value of a step: one for every element (a channel's planes), or channel c's of an array (rows;
// vec(c) is channels c..c+15).
template <typename M>
struct Scalar {
  M value;
  RESFUSE_ALWAYS_INLINE simd::Vec<M> vec(int64_t) const { return simd::Vec<M>{} + value; }
  RESFUSE_ALWAYS_INLINE M at(int64_t) const { return value; }
};

template <typename M>
struct PerChannel {
  const M* values;
  RESFUSE_ALWAYS_INLINE simd::Vec<M> vec(int64_t c) const { return load<simd::Vec<M>>(values + c); }
  RESFUSE_ALWAYS_INLINE M at(int64_t c) const { return values[c]; }
};

// ---------------------------------------------------------------------------------------------------------------
// Skeletons. `i` is an element's index from the start of the data, `c` its channel in the rows (0 for planes,
// whose steps hold scalars).

// step.vector(i, c) on 16 elements from i; step.scalar(i, c) on one.
template <bool kVector, typename Step>
RESFUSE_ALWAYS_INLINE void each_in_planes(const Step& step, int64_t planes, int64_t stride, int64_t n) {
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t base = p * stride;
    int64_t i = 0;
    if constexpr (kVector) {
      for (; i + kLanes <= n; i += kLanes) step.vector(base + i, 0);
    }
    for (; i < n; ++i) step.scalar(base + i, 0);
  }
}

template <bool kVector, typename Step>
RESFUSE_ALWAYS_INLINE void each_in_rows(const Step& step, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * C;
    int64_t c = 0;
    if constexpr (kVector) {
      for (; c + kLanes <= C; c += kLanes) step.vector(base + c, c);
    }
    for (; c < C; ++c) step.scalar(base + c, c);
  }
}

// Two sums: step.vector(i, c, a, b) adds the terms of 16 elements into lanes a and b (opmath type M),
// step.scalar(i, c, sa, sb) one element's into doubles. Adds the totals to *sum_a, *sum_b.
template <typename M, bool kVector, typename Step>
RESFUSE_ALWAYS_INLINE void two_sums_in_planes(const Step& step, int64_t planes, int64_t stride, int64_t n,
                                              double* sum_a, double* sum_b) {
  using V = simd::Vec<M>;
  double sa = 0.0, sb = 0.0;  // the elements past the last whole vector of each plane
  Doubles a0{}, a1{}, b0{}, b1{};
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t base = p * stride;
    int64_t i = 0;
    if constexpr (kVector) {
      while (i + kLanes <= n) {
        V a{}, b{};
        for (int64_t k = 0; k < kBlockSteps && i + kLanes <= n; ++k, i += kLanes) step.vector(base + i, 0, a, b);
        add_to_doubles<M>(a, a0, a1);
        add_to_doubles<M>(b, b0, b1);
      }
    }
    for (; i < n; ++i) step.scalar(base + i, 0, sa, sb);
  }
  *sum_a += sum_lanes(a0 + a1) + sa;
  *sum_b += sum_lanes(b0 + b1) + sb;
}

// The same over rows, per channel: sum_a[c], sum_b[c].
template <typename M, bool kVector, typename Step>
RESFUSE_ALWAYS_INLINE void two_sums_in_rows(const Step& step, int64_t rows, int64_t C, double* sum_a,
                                            double* sum_b) {
  using V = simd::Vec<M>;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    int64_t c = 0;
    if constexpr (kVector) {
      for (; c + kLanes <= C; c += kLanes) {
        V a{}, b{};
        for (int64_t r = r0; r < r1; ++r) step.vector(r * C + c, c, a, b);
        add_to_doubles<M>(a, sum_a + c);
        add_to_doubles<M>(b, sum_b + c);
      }
    }
    for (; c < C; ++c) {
      double sa = sum_a[c], sb = sum_b[c];
      for (int64_t r = r0; r < r1; ++r) step.scalar(r * C + c, c, sa, sb);
      sum_a[c] = sa;
      sum_b[c] = sb;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Steps

// The ReLU mask of the backward: g = out <= 0 ? 0 : grad_out, as torch's threshold_backward (where out is NaN the
// gradient passes).
template <bool kMask, typename T>
RESFUSE_ALWAYS_INLINE opmath_t<T> masked_grad(const T* grad_out, const T* out, int64_t i) {
  if constexpr (kMask) {
    return as_opmath(out[i]) <= opmath_t<T>(0) ? opmath_t<T>(0) : as_opmath(grad_out[i]);
  } else {
    return as_opmath(grad_out[i]);
  }
}

template <bool kMask, typename T>
RESFUSE_ALWAYS_INLINE VecOf<T> masked_grad_vector(const T* grad_out, const T* out, int64_t i) {
  using V = VecOf<T>;
  const V g = load<V>(grad_out + i);
  if constexpr (kMask) {
    return simd::zero_where(load<V>(out + i) <= simd::zeros<V>(), g);
  } else {
    return g;
  }
}

// d = x - pivot:  sums d and d^2.
template <typename T, typename P>
struct ShiftedSquares {
  const T* x;
  P pivot;

  RESFUSE_ALWAYS_INLINE void vector(int64_t i, int64_t c, VecOf<T>& a, VecOf<T>& b) const {
    const VecOf<T> d = load<VecOf<T>>(x + i) - pivot.vec(c);
    a += d;
    b += d * d;
  }
  RESFUSE_ALWAYS_INLINE void scalar(int64_t i, int64_t c, double& sa, double& sb) const {
    const double d = as_double(x[i]) - static_cast<double>(pivot.at(c));
    sa += d;
    sb += d * d;
  }
};

// out = act((x - center)*scale + shift + residual).
template <typename T, bool kResidual, bool kRelu, typename P>
struct AffineAct {
  const T* x;
  const T* residual;
  T* out;
  P center, scale, shift;

  RESFUSE_ALWAYS_INLINE void vector(int64_t i, int64_t c) const {
    VecOf<T> y = (load<VecOf<T>>(x + i) - center.vec(c)) * scale.vec(c) + shift.vec(c);
    if constexpr (kResidual) y += load<VecOf<T>>(residual + i);
    if constexpr (kRelu) y = simd::relu(y);
    store(out + i, y);
  }
  RESFUSE_ALWAYS_INLINE void scalar(int64_t i, int64_t c) const {
    using M = opmath_t<T>;
    M y = (as_opmath(x[i]) - center.at(c)) * scale.at(c) + shift.at(c);
    if constexpr (kResidual) y += as_opmath(residual[i]);
    // `y < 0` rather than `y > 0` keeps NaN as NaN, like torch.relu.
    if constexpr (kRelu) y = y < M(0) ? M(0) : y;
    out[i] = static_cast<T>(y);
  }
};

// g (masked grad_out, stored at `masked`):  sums g and g*(x - center).
template <typename T, bool kMask, bool kStore, typename P>
struct GradTerms {
  const T* grad_out;
  const T* out;
  const T* x;
  T* masked;
  P center;

  RESFUSE_ALWAYS_INLINE void vector(int64_t i, int64_t c, VecOf<T>& a, VecOf<T>& b) const {
    const VecOf<T> g = masked_grad_vector<kMask>(grad_out, out, i);
    if constexpr (kStore) store(masked + i, g);
    a += g;
    b += g * (load<VecOf<T>>(x + i) - center.vec(c));
  }
  RESFUSE_ALWAYS_INLINE void scalar(int64_t i, int64_t c, double& sa, double& sb) const {
    const auto g = masked_grad<kMask>(grad_out, out, i);
    if constexpr (kStore) masked[i] = static_cast<T>(g);
    sa += static_cast<double>(g);
    sb += static_cast<double>(g) * (as_double(x[i]) - static_cast<double>(center.at(c)));
  }
};

// g as in GradTerms;  grad_input = (g - k1 - (x - center)*m2)*a;  grad_residual = g.
template <typename T, bool kMask, bool kInput, bool kResidual, typename P>
struct GradApply {
  const T* grad_out;
  const T* out;
  const T* x;
  T* grad_input;
  T* grad_residual;
  P center, k1, m2, a;

  RESFUSE_ALWAYS_INLINE void vector(int64_t i, int64_t c) const {
    const VecOf<T> g = masked_grad_vector<kMask>(grad_out, out, i);
    if constexpr (kResidual) store(grad_residual + i, g);
    if constexpr (kInput) {
      const VecOf<T> xc = load<VecOf<T>>(x + i) - center.vec(c);
      store(grad_input + i, (g - k1.vec(c) - xc * m2.vec(c)) * a.vec(c));
    }
  }
  RESFUSE_ALWAYS_INLINE void scalar(int64_t i, int64_t c) const {
    const auto g = masked_grad<kMask>(grad_out, out, i);
    if constexpr (kResidual) grad_residual[i] = static_cast<T>(g);
    if constexpr (kInput) {
      grad_input[i] = static_cast<T>((g - k1.at(c) - (as_opmath(x[i]) - center.at(c)) * m2.at(c)) * a.at(c));
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Run-time options to template parameters (plain branches: see the top). kRows: `count` rows of C = n channels,
// per-channel values PerChannel; otherwise `count` planes of n, `stride` apart, per-channel values Scalar.

template <typename T, bool kRows>
using ParamOf = std::conditional_t<kRows, PerChannel<opmath_t<T>>, Scalar<opmath_t<T>>>;

template <typename T, bool kRows, typename Step>
RESFUSE_ALWAYS_INLINE void run_each(const Step& step, int64_t count, int64_t stride, int64_t n) {
  if constexpr (kRows) {
    each_in_rows<kVectorised<T>>(step, count, n);
  } else {
    each_in_planes<kVectorised<T>>(step, count, stride, n);
  }
}

template <typename T, bool kRows, typename Step>
RESFUSE_ALWAYS_INLINE void run_two_sums(const Step& step, int64_t count, int64_t stride, int64_t n, double* sum_a,
                                        double* sum_b) {
  if constexpr (kRows) {
    two_sums_in_rows<opmath_t<T>, kVectorised<T>>(step, count, n, sum_a, sum_b);
  } else {
    two_sums_in_planes<opmath_t<T>, kVectorised<T>>(step, count, stride, n, sum_a, sum_b);
  }
}

template <typename T, bool kRows>
RESFUSE_ALWAYS_INLINE void shifted_sums_any(const T* x, ParamOf<T, kRows> pivot, int64_t count, int64_t stride,
                                            int64_t n, double* sum, double* sum_sq) {
  run_two_sums<T, kRows>(ShiftedSquares<T, ParamOf<T, kRows>>{x, pivot}, count, stride, n, sum, sum_sq);
}

template <typename T, bool kRows>
RESFUSE_ALWAYS_INLINE void affine_act_any(const T* x, const T* residual, T* out, ParamOf<T, kRows> center,
                                          ParamOf<T, kRows> scale, ParamOf<T, kRows> shift, bool relu, int64_t count,
                                          int64_t stride, int64_t n) {
  using P = ParamOf<T, kRows>;
#define RESFUSE_CALL(RES, RELU) \
  run_each<T, kRows>(AffineAct<T, RES, RELU, P>{x, residual, out, center, scale, shift}, count, stride, n)
  if (residual != nullptr) {
    if (relu) RESFUSE_CALL(true, true); else RESFUSE_CALL(true, false);
  } else {
    if (relu) RESFUSE_CALL(false, true); else RESFUSE_CALL(false, false);
  }
#undef RESFUSE_CALL
}

template <typename T, bool kRows>
RESFUSE_ALWAYS_INLINE void grad_sums_any(const T* grad_out, const T* out, const T* x, ParamOf<T, kRows> center,
                                         T* masked, int64_t count, int64_t stride, int64_t n, double* sum_g,
                                         double* sum_gx) {
  using P = ParamOf<T, kRows>;
#define RESFUSE_CALL(MASK, STORE)                                                                                   \
  run_two_sums<T, kRows>(GradTerms<T, MASK, STORE, P>{grad_out, out, x, masked, center}, count, stride, n, sum_g, \
                         sum_gx)
  if (out != nullptr) {
    if (masked != nullptr) RESFUSE_CALL(true, true); else RESFUSE_CALL(true, false);
  } else {
    if (masked != nullptr) RESFUSE_CALL(false, true); else RESFUSE_CALL(false, false);
  }
#undef RESFUSE_CALL
}

template <typename T, bool kRows>
RESFUSE_ALWAYS_INLINE void grad_apply_any(const T* grad_out, const T* out, const T* x, ParamOf<T, kRows> center,
                                          ParamOf<T, kRows> k1, ParamOf<T, kRows> m2, ParamOf<T, kRows> a,
                                          T* grad_input, T* grad_residual, int64_t count, int64_t stride, int64_t n) {
  using P = ParamOf<T, kRows>;
#define RESFUSE_CALL(MASK, INPUT, RESIDUAL)                                                                   \
  run_each<T, kRows>(GradApply<T, MASK, INPUT, RESIDUAL, P>{grad_out, out, x, grad_input, grad_residual, center, \
                                                           k1, m2, a},                                         \
                     count, stride, n)
#define RESFUSE_CALL_OUTPUTS(MASK)                                                            \
  if (grad_input != nullptr && grad_residual != nullptr) RESFUSE_CALL(MASK, true, true);      \
  else if (grad_input != nullptr) RESFUSE_CALL(MASK, true, false);                            \
  else if (grad_residual != nullptr) RESFUSE_CALL(MASK, false, true)
  if (out != nullptr) {
    RESFUSE_CALL_OUTPUTS(true);
  } else {
    RESFUSE_CALL_OUTPUTS(false);
  }
#undef RESFUSE_CALL_OUTPUTS
#undef RESFUSE_CALL
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// The exported functions, per dtype. CLONES: RESFUSE_CPU_CLONES for the vectorised dtypes, nothing otherwise.

#define RESFUSE_DEFINE_CHANNEL_LOOPS(T, CLONES)                                                                   \
  template <>                                                                                                     \
  CLONES void shifted_sums_planes<T>(const T* x, int64_t planes, int64_t stride, int64_t n, opmath_t<T> pivot,    \
                                     double* sum, double* sum_sq) {                                               \
    shifted_sums_any<T, false>(x, {pivot}, planes, stride, n, sum, sum_sq);                                       \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void shifted_sums_rows<T>(const T* x, int64_t rows, int64_t channels, const opmath_t<T>* pivot,          \
                                   double* sum, double* sum_sq) {                                                 \
    shifted_sums_any<T, true>(x, {pivot}, rows, 0, channels, sum, sum_sq);                                        \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void affine_act_planes<T>(const T* x, const T* residual, T* out, int64_t planes, int64_t stride,         \
                                   int64_t n, opmath_t<T> center, opmath_t<T> scale, opmath_t<T> shift,           \
                                   bool relu) {                                                                   \
    affine_act_any<T, false>(x, residual, out, {center}, {scale}, {shift}, relu, planes, stride, n);              \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void affine_act_rows<T>(const T* x, const T* residual, T* out, int64_t rows, int64_t channels,           \
                                 const opmath_t<T>* center, const opmath_t<T>* scale, const opmath_t<T>* shift,   \
                                 bool relu) {                                                                     \
    affine_act_any<T, true>(x, residual, out, {center}, {scale}, {shift}, relu, rows, 0, channels);               \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void grad_sums_planes<T>(const T* grad_out, const T* out, const T* x, int64_t planes, int64_t stride,    \
                                  int64_t n, opmath_t<T> center, double* sum_g, double* sum_gx, T* masked) {      \
    grad_sums_any<T, false>(grad_out, out, x, {center}, masked, planes, stride, n, sum_g, sum_gx);                \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void grad_sums_rows<T>(const T* grad_out, const T* out, const T* x, int64_t rows, int64_t channels,      \
                                const opmath_t<T>* center, double* sum_g, double* sum_gx, T* masked) {            \
    grad_sums_any<T, true>(grad_out, out, x, {center}, masked, rows, 0, channels, sum_g, sum_gx);                 \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void grad_apply_planes<T>(const T* grad_out, const T* out, const T* x, int64_t planes, int64_t stride,   \
                                   int64_t n, GradCoefficients<opmath_t<T>> k, T* grad_input, T* grad_residual) { \
    grad_apply_any<T, false>(grad_out, out, x, {k.center}, {k.k1}, {k.m2}, {k.a}, grad_input, grad_residual,      \
                             planes, stride, n);                                                                  \
  }                                                                                                               \
  template <>                                                                                                     \
  CLONES void grad_apply_rows<T>(const T* grad_out, const T* out, const T* x, int64_t rows, int64_t channels,     \
                                 GradCoefficientArrays<opmath_t<T>> k, T* grad_input, T* grad_residual) {         \
    grad_apply_any<T, true>(grad_out, out, x, {k.center}, {k.k1}, {k.m2}, {k.a}, grad_input, grad_residual, rows, \
                            0, channels);                                                                         \
  }

#define RESFUSE_NO_CLONES
RESFUSE_DEFINE_CHANNEL_LOOPS(float, RESFUSE_CPU_CLONES)
RESFUSE_DEFINE_CHANNEL_LOOPS(double, RESFUSE_CPU_CLONES)
RESFUSE_DEFINE_CHANNEL_LOOPS(c10::Half, RESFUSE_NO_CLONES)
RESFUSE_DEFINE_CHANNEL_LOOPS(c10::BFloat16, RESFUSE_NO_CLONES)
#undef RESFUSE_NO_CLONES
#undef RESFUSE_DEFINE_CHANNEL_LOOPS

}  // namespace resfuse::cpu::loops
