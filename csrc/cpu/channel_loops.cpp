// The vectorised inner loops declared in csrc/cpu/channel_loops.h.
//
// Each loop is an always-inlined template (the *_impl below) with its options (residual, ReLU mask, which
// outputs) as template parameters, so the vector step has no branch. The exported functions pick the variant;
// for float and double they carry RESFUSE_CPU_CLONES (csrc/cpu/simd.h), so the variant is compiled once per
// instruction set. Half and bfloat16 run the scalar loops only: the vector step is for float and double.
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
// register; no float partial sums more than 8 terms.
constexpr int64_t kBlockSteps = 8;
constexpr int64_t kRowBlock = 8;

template <typename T>
constexpr bool kVectorised = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T>
RESFUSE_ALWAYS_INLINE double as_double(T v) {
  return static_cast<double>(static_cast<opmath_t<T>>(v));
}

template <typename T>
RESFUSE_ALWAYS_INLINE opmath_t<T> as_opmath(T v) {
  return static_cast<opmath_t<T>>(v);
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

// The ReLU mask of the backward: g = out > 0 ? grad_out : 0 (0 where out is 0 or NaN).
template <bool kMask, typename T>
RESFUSE_ALWAYS_INLINE opmath_t<T> masked_grad(const T* grad_out, const T* out, int64_t i) {
  if constexpr (kMask) {
    return as_opmath(out[i]) > opmath_t<T>(0) ? as_opmath(grad_out[i]) : opmath_t<T>(0);
  } else {
    return as_opmath(grad_out[i]);
  }
}

template <bool kMask, typename V, typename T>
RESFUSE_ALWAYS_INLINE V masked_grad_vector(const T* grad_out, const T* out, int64_t i) {
  const V g = load<V>(grad_out + i);
  if constexpr (kMask) {
    return simd::select(load<V>(out + i) > simd::zeros<V>(), g);
  } else {
    return g;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics of the forward

template <typename T>
RESFUSE_ALWAYS_INLINE void shifted_sums_planes_impl(const T* x, int64_t planes, int64_t stride, int64_t n,
                                                    opmath_t<T> pivot, double* sum, double* sum_sq) {
  using M = opmath_t<T>;
  double s = 0.0, q = 0.0;  // the elements past the last whole vector of each plane
  Doubles s0{}, s1{}, q0{}, q1{};
  for (int64_t p = 0; p < planes; ++p) {
    const T* xp = x + p * stride;
    int64_t i = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<M>;
      while (i + kLanes <= n) {
        V bs{}, bq{};
        for (int64_t k = 0; k < kBlockSteps && i + kLanes <= n; ++k, i += kLanes) {
          const V d = load<V>(xp + i) - pivot;
          bs += d;
          bq += d * d;
        }
        add_to_doubles<M>(bs, s0, s1);
        add_to_doubles<M>(bq, q0, q1);
      }
    }
    for (; i < n; ++i) {
      const double d = as_double(xp[i]) - static_cast<double>(pivot);
      s += d;
      q += d * d;
    }
  }
  *sum += sum_lanes(s0 + s1) + s;
  *sum_sq += sum_lanes(q0 + q1) + q;
}

template <typename T>
RESFUSE_ALWAYS_INLINE void shifted_sums_rows_impl(const T* x, int64_t rows, int64_t channels,
                                                  const opmath_t<T>* pivot, double* sum, double* sum_sq) {
  using M = opmath_t<T>;
  const int64_t C = channels;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<M>;
      for (; c + kLanes <= C; c += kLanes) {
        const V k = load<V>(pivot + c);
        V bs{}, bq{};
        for (int64_t r = r0; r < r1; ++r) {
          const V d = load<V>(x + r * C + c) - k;
          bs += d;
          bq += d * d;
        }
        add_to_doubles<M>(bs, sum + c);
        add_to_doubles<M>(bq, sum_sq + c);
      }
    }
    for (; c < C; ++c) {
      double s = sum[c], q = sum_sq[c];
      for (int64_t r = r0; r < r1; ++r) {
        const double d = as_double(x[r * C + c]) - static_cast<double>(pivot[c]);
        s += d;
        q += d * d;
      }
      sum[c] = s;
      sum_sq[c] = q;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The forward's elementwise pass

template <typename T, bool kResidual, bool kRelu>
RESFUSE_ALWAYS_INLINE void affine_act_planes_impl(const T* x, const T* residual, T* out, int64_t planes,
                                                  int64_t stride, int64_t n, opmath_t<T> center, opmath_t<T> scale,
                                                  opmath_t<T> shift) {
  using M = opmath_t<T>;
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t base = p * stride;
    int64_t i = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<T>;
      for (; i + kLanes <= n; i += kLanes) {
        V y = (load<V>(x + base + i) - center) * scale + shift;
        if constexpr (kResidual) y += load<V>(residual + base + i);
        if constexpr (kRelu) y = simd::relu(y);
        store(out + base + i, y);
      }
    }
    for (; i < n; ++i) {
      M y = (as_opmath(x[base + i]) - center) * scale + shift;
      if constexpr (kResidual) y += as_opmath(residual[base + i]);
      // `y < 0` rather than `y > 0` keeps NaN as NaN, like torch.relu.
      if constexpr (kRelu) y = y < M(0) ? M(0) : y;
      out[base + i] = static_cast<T>(y);
    }
  }
}

template <typename T, bool kResidual, bool kRelu>
RESFUSE_ALWAYS_INLINE void affine_act_rows_impl(const T* x, const T* residual, T* out, int64_t rows,
                                                int64_t channels, const opmath_t<T>* center,
                                                const opmath_t<T>* scale, const opmath_t<T>* shift) {
  using M = opmath_t<T>;
  const int64_t C = channels;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * C;
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<T>;
      for (; c + kLanes <= C; c += kLanes) {
        V y = (load<V>(x + base + c) - load<V>(center + c)) * load<V>(scale + c) + load<V>(shift + c);
        if constexpr (kResidual) y += load<V>(residual + base + c);
        if constexpr (kRelu) y = simd::relu(y);
        store(out + base + c, y);
      }
    }
    for (; c < C; ++c) {
      M y = (as_opmath(x[base + c]) - center[c]) * scale[c] + shift[c];
      if constexpr (kResidual) y += as_opmath(residual[base + c]);
      if constexpr (kRelu) y = y < M(0) ? M(0) : y;
      out[base + c] = static_cast<T>(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The backward's sums

// One vector step of the backward's sums: g at `i` (stored at masked + i), added into bg; g*(x - center) into bx.
template <typename T, bool kMask, bool kStore>
RESFUSE_ALWAYS_INLINE void grad_sums_step(const T* grad_out, const T* out, const T* x, int64_t i,
                                          const simd::Vec<opmath_t<T>>& center, simd::Vec<opmath_t<T>>& bg,
                                          simd::Vec<opmath_t<T>>& bx, T* masked) {
  using V = simd::Vec<opmath_t<T>>;
  const V g = masked_grad_vector<kMask, V>(grad_out, out, i);
  if constexpr (kStore) store(masked + i, g);
  bg += g;
  bx += g * (load<V>(x + i) - center);
}

template <typename T, bool kMask, bool kStore>
RESFUSE_ALWAYS_INLINE void grad_sums_scalar(const T* grad_out, const T* out, const T* x, int64_t i,
                                            double center, double& sum_g, double& sum_gx, T* masked) {
  const auto g = masked_grad<kMask>(grad_out, out, i);
  if constexpr (kStore) masked[i] = static_cast<T>(g);
  sum_g += static_cast<double>(g);
  sum_gx += static_cast<double>(g) * (as_double(x[i]) - center);
}

template <typename T, bool kMask, bool kStore>
RESFUSE_ALWAYS_INLINE void grad_sums_planes_impl(const T* grad_out, const T* out, const T* x, int64_t planes,
                                                 int64_t stride, int64_t n, opmath_t<T> center, double* sum_g,
                                                 double* sum_gx, T* masked) {
  using M = opmath_t<T>;
  double sg = 0.0, sx = 0.0;  // the elements past the last whole vector of each plane
  Doubles g0{}, g1{}, x0{}, x1{};
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t base = p * stride;
    const T* o = kMask ? out + base : nullptr;
    T* mk = kStore ? masked + base : nullptr;
    int64_t i = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<M>;
      const V m = V{} + center;
      while (i + kLanes <= n) {
        V bg{}, bx{};
        for (int64_t k = 0; k < kBlockSteps && i + kLanes <= n; ++k, i += kLanes) {
          grad_sums_step<T, kMask, kStore>(grad_out + base, o, x + base, i, m, bg, bx, mk);
        }
        add_to_doubles<M>(bg, g0, g1);
        add_to_doubles<M>(bx, x0, x1);
      }
    }
    for (; i < n; ++i) {
      grad_sums_scalar<T, kMask, kStore>(grad_out + base, o, x + base, i, static_cast<double>(center), sg, sx, mk);
    }
  }
  *sum_g += sum_lanes(g0 + g1) + sg;
  *sum_gx += sum_lanes(x0 + x1) + sx;
}

template <typename T, bool kMask, bool kStore>
RESFUSE_ALWAYS_INLINE void grad_sums_rows_impl(const T* grad_out, const T* out, const T* x, int64_t rows,
                                               int64_t channels, const opmath_t<T>* center, double* sum_g,
                                               double* sum_gx, T* masked) {
  using M = opmath_t<T>;
  const int64_t C = channels;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<M>;
      for (; c + kLanes <= C; c += kLanes) {
        const V m = load<V>(center + c);
        V bg{}, bx{};
        for (int64_t r = r0; r < r1; ++r) {
          grad_sums_step<T, kMask, kStore>(grad_out, out, x, r * C + c, m, bg, bx, masked);
        }
        add_to_doubles<M>(bg, sum_g + c);
        add_to_doubles<M>(bx, sum_gx + c);
      }
    }
    for (; c < C; ++c) {
      double sg = sum_g[c], sx = sum_gx[c];
      for (int64_t r = r0; r < r1; ++r) {
        grad_sums_scalar<T, kMask, kStore>(grad_out, out, x, r * C + c, static_cast<double>(center[c]), sg, sx,
                                           masked);
      }
      sum_g[c] = sg;
      sum_gx[c] = sx;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The backward's elementwise pass

template <typename T, bool kMask, bool kInput, bool kResidual>
RESFUSE_ALWAYS_INLINE void grad_apply_planes_impl(const T* grad_out, const T* out, const T* x, int64_t planes,
                                                  int64_t stride, int64_t n, GradCoefficients<opmath_t<T>> k,
                                                  T* grad_input, T* grad_residual) {
  using M = opmath_t<T>;
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t base = p * stride;
    int64_t i = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<T>;
      for (; i + kLanes <= n; i += kLanes) {
        const V g = masked_grad_vector<kMask, V>(grad_out, out, base + i);
        if constexpr (kResidual) store(grad_residual + base + i, g);
        if constexpr (kInput) {
          store(grad_input + base + i, (g - k.k1 - (load<V>(x + base + i) - k.center) * k.m2) * k.a);
        }
      }
    }
    for (; i < n; ++i) {
      const int64_t j = base + i;
      const M g = masked_grad<kMask>(grad_out, out, j);
      if constexpr (kResidual) grad_residual[j] = static_cast<T>(g);
      if constexpr (kInput) grad_input[j] = static_cast<T>((g - k.k1 - (as_opmath(x[j]) - k.center) * k.m2) * k.a);
    }
  }
}

template <typename T, bool kMask, bool kInput, bool kResidual>
RESFUSE_ALWAYS_INLINE void grad_apply_rows_impl(const T* grad_out, const T* out, const T* x, int64_t rows,
                                                int64_t channels, GradCoefficientArrays<opmath_t<T>> k,
                                                T* grad_input, T* grad_residual) {
  using M = opmath_t<T>;
  const int64_t C = channels;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * C;
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      using V = simd::Vec<T>;
      for (; c + kLanes <= C; c += kLanes) {
        const int64_t i = base + c;
        const V g = masked_grad_vector<kMask, V>(grad_out, out, i);
        if constexpr (kResidual) store(grad_residual + i, g);
        if constexpr (kInput) {
          const V xc = load<V>(x + i) - load<V>(k.center + c);
          store(grad_input + i, (g - load<V>(k.k1 + c) - xc * load<V>(k.m2 + c)) * load<V>(k.a + c));
        }
      }
    }
    for (; c < C; ++c) {
      const int64_t i = base + c;
      const M g = masked_grad<kMask>(grad_out, out, i);
      if constexpr (kResidual) grad_residual[i] = static_cast<T>(g);
      if constexpr (kInput) {
        grad_input[i] = static_cast<T>((g - k.k1[c] - (as_opmath(x[i]) - k.center[c]) * k.m2[c]) * k.a[c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Run-time options to template parameters. Plain branches, no lambdas: a lambda is a function of its own, which
// a clone would not compile for its instruction set unless the compiler chose to inline it.

template <typename T>
RESFUSE_ALWAYS_INLINE void affine_act_planes_any(const T* x, const T* residual, T* out, int64_t planes,
                                                 int64_t stride, int64_t n, opmath_t<T> center, opmath_t<T> scale,
                                                 opmath_t<T> shift, bool relu) {
#define RESFUSE_CALL(RES, RELU) \
  affine_act_planes_impl<T, RES, RELU>(x, residual, out, planes, stride, n, center, scale, shift)
  if (residual != nullptr) {
    if (relu) RESFUSE_CALL(true, true); else RESFUSE_CALL(true, false);
  } else {
    if (relu) RESFUSE_CALL(false, true); else RESFUSE_CALL(false, false);
  }
#undef RESFUSE_CALL
}

template <typename T>
RESFUSE_ALWAYS_INLINE void affine_act_rows_any(const T* x, const T* residual, T* out, int64_t rows,
                                               int64_t channels, const opmath_t<T>* center,
                                               const opmath_t<T>* scale, const opmath_t<T>* shift, bool relu) {
#define RESFUSE_CALL(RES, RELU) \
  affine_act_rows_impl<T, RES, RELU>(x, residual, out, rows, channels, center, scale, shift)
  if (residual != nullptr) {
    if (relu) RESFUSE_CALL(true, true); else RESFUSE_CALL(true, false);
  } else {
    if (relu) RESFUSE_CALL(false, true); else RESFUSE_CALL(false, false);
  }
#undef RESFUSE_CALL
}

template <typename T>
RESFUSE_ALWAYS_INLINE void grad_sums_planes_any(const T* grad_out, const T* out, const T* x, int64_t planes,
                                                int64_t stride, int64_t n, opmath_t<T> center, double* sum_g,
                                                double* sum_gx, T* masked) {
#define RESFUSE_CALL(MASK, STORE) \
  grad_sums_planes_impl<T, MASK, STORE>(grad_out, out, x, planes, stride, n, center, sum_g, sum_gx, masked)
  if (out != nullptr) {
    if (masked != nullptr) RESFUSE_CALL(true, true); else RESFUSE_CALL(true, false);
  } else {
    if (masked != nullptr) RESFUSE_CALL(false, true); else RESFUSE_CALL(false, false);
  }
#undef RESFUSE_CALL
}

template <typename T>
RESFUSE_ALWAYS_INLINE void grad_sums_rows_any(const T* grad_out, const T* out, const T* x, int64_t rows,
                                              int64_t channels, const opmath_t<T>* center, double* sum_g,
                                              double* sum_gx, T* masked) {
#define RESFUSE_CALL(MASK, STORE) \
  grad_sums_rows_impl<T, MASK, STORE>(grad_out, out, x, rows, channels, center, sum_g, sum_gx, masked)
  if (out != nullptr) {
    if (masked != nullptr) RESFUSE_CALL(true, true); else RESFUSE_CALL(true, false);
  } else {
    if (masked != nullptr) RESFUSE_CALL(false, true); else RESFUSE_CALL(false, false);
  }
#undef RESFUSE_CALL
}

// IMPL<T, mask, input, residual>(ARGS..., grad_input, grad_residual) for the outputs asked for; nothing when
// neither is.
#define RESFUSE_GRAD_APPLY_VARIANTS(IMPL, MASK, ...)                     \
  do {                                                                   \
    if (grad_input != nullptr && grad_residual != nullptr) {             \
      IMPL<T, MASK, true, true>(__VA_ARGS__, grad_input, grad_residual); \
    } else if (grad_input != nullptr) {                                  \
      IMPL<T, MASK, true, false>(__VA_ARGS__, grad_input, grad_residual); \
    } else if (grad_residual != nullptr) {                               \
      IMPL<T, MASK, false, true>(__VA_ARGS__, grad_input, grad_residual); \
    }                                                                    \
  } while (false)

template <typename T>
RESFUSE_ALWAYS_INLINE void grad_apply_planes_any(const T* grad_out, const T* out, const T* x, int64_t planes,
                                                 int64_t stride, int64_t n, GradCoefficients<opmath_t<T>> coef,
                                                 T* grad_input, T* grad_residual) {
  if (out != nullptr) {
    RESFUSE_GRAD_APPLY_VARIANTS(grad_apply_planes_impl, true, grad_out, out, x, planes, stride, n, coef);
  } else {
    RESFUSE_GRAD_APPLY_VARIANTS(grad_apply_planes_impl, false, grad_out, out, x, planes, stride, n, coef);
  }
}

template <typename T>
RESFUSE_ALWAYS_INLINE void grad_apply_rows_any(const T* grad_out, const T* out, const T* x, int64_t rows,
                                               int64_t channels, GradCoefficientArrays<opmath_t<T>> coef,
                                               T* grad_input, T* grad_residual) {
  if (out != nullptr) {
    RESFUSE_GRAD_APPLY_VARIANTS(grad_apply_rows_impl, true, grad_out, out, x, rows, channels, coef);
  } else {
    RESFUSE_GRAD_APPLY_VARIANTS(grad_apply_rows_impl, false, grad_out, out, x, rows, channels, coef);
  }
}

#undef RESFUSE_GRAD_APPLY_VARIANTS

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// The exported functions, per dtype. CLONES: RESFUSE_CPU_CLONES for the vectorised dtypes, nothing otherwise.

#define RESFUSE_DEFINE_CHANNEL_LOOPS(T, CLONES)                                                                  \
  template <>                                                                                                    \
  CLONES void shifted_sums_planes<T>(const T* x, int64_t planes, int64_t stride, int64_t n, opmath_t<T> pivot,   \
                                     double* sum, double* sum_sq) {                                              \
    shifted_sums_planes_impl<T>(x, planes, stride, n, pivot, sum, sum_sq);                                      \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void shifted_sums_rows<T>(const T* x, int64_t rows, int64_t channels, const opmath_t<T>* pivot,         \
                                   double* sum, double* sum_sq) {                                                \
    shifted_sums_rows_impl<T>(x, rows, channels, pivot, sum, sum_sq);                                           \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void affine_act_planes<T>(const T* x, const T* residual, T* out, int64_t planes, int64_t stride,        \
                                   int64_t n, opmath_t<T> center, opmath_t<T> scale, opmath_t<T> shift,          \
                                   bool relu) {                                                                  \
    affine_act_planes_any<T>(x, residual, out, planes, stride, n, center, scale, shift, relu);                   \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void affine_act_rows<T>(const T* x, const T* residual, T* out, int64_t rows, int64_t channels,          \
                                 const opmath_t<T>* center, const opmath_t<T>* scale, const opmath_t<T>* shift,  \
                                 bool relu) {                                                                    \
    affine_act_rows_any<T>(x, residual, out, rows, channels, center, scale, shift, relu);                        \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void grad_sums_planes<T>(const T* grad_out, const T* out, const T* x, int64_t planes, int64_t stride,   \
                                  int64_t n, opmath_t<T> center, double* sum_g, double* sum_gx, T* masked) {     \
    grad_sums_planes_any<T>(grad_out, out, x, planes, stride, n, center, sum_g, sum_gx, masked);                 \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void grad_sums_rows<T>(const T* grad_out, const T* out, const T* x, int64_t rows, int64_t channels,     \
                                const opmath_t<T>* center, double* sum_g, double* sum_gx, T* masked) {           \
    grad_sums_rows_any<T>(grad_out, out, x, rows, channels, center, sum_g, sum_gx, masked);                      \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void grad_apply_planes<T>(const T* grad_out, const T* out, const T* x, int64_t planes, int64_t stride,  \
                                   int64_t n, GradCoefficients<opmath_t<T>> coef, T* grad_input,                 \
                                   T* grad_residual) {                                                           \
    grad_apply_planes_any<T>(grad_out, out, x, planes, stride, n, coef, grad_input, grad_residual);              \
  }                                                                                                              \
  template <>                                                                                                    \
  CLONES void grad_apply_rows<T>(const T* grad_out, const T* out, const T* x, int64_t rows, int64_t channels,    \
                                 GradCoefficientArrays<opmath_t<T>> coef, T* grad_input, T* grad_residual) {     \
    grad_apply_rows_any<T>(grad_out, out, x, rows, channels, coef, grad_input, grad_residual);                    \
  }

#define RESFUSE_NO_CLONES
RESFUSE_DEFINE_CHANNEL_LOOPS(float, RESFUSE_CPU_CLONES)
RESFUSE_DEFINE_CHANNEL_LOOPS(double, RESFUSE_CPU_CLONES)
RESFUSE_DEFINE_CHANNEL_LOOPS(c10::Half, RESFUSE_NO_CLONES)
RESFUSE_DEFINE_CHANNEL_LOOPS(c10::BFloat16, RESFUSE_NO_CLONES)
#undef RESFUSE_NO_CLONES
#undef RESFUSE_DEFINE_CHANNEL_LOOPS

}  // namespace resfuse::cpu::loops
