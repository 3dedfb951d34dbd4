// The inner loops of the CPU kernels, vectorised: one call runs over one channel's NCHW planes or a block of NHWC
// rows.
//
// Planes: `planes` runs of `n` contiguous elements of one channel, `stride` elements apart (NCHW, the
// [outer, C, inner] view with inner > 1: n = inner, stride = C*inner); per-channel values are scalars. Rows: `rows`
// consecutive rows of C channels (NHWC, inner == 1); per-channel values are arrays of C.
// csrc/cpu/channel_view.h cuts a tensor into channels or blocks of rows and runs them in parallel.
//
// Sums: 16 lanes of at::opmath_type<T> (lane l takes the elements at l modulo 16 of a plane, or channel c + l of
// the rows) each sum a block of at most 8 terms, which then go into lanes of double; a plane's lanes are added in
// lane order at the end, a channel's row blocks in row order. A call adds its sums to what `sum*` already hold.
// Per-channel values of the sums (pivot, center) are given in opmath_t: the kernels pass the exact pivot (an
// element of x) and correct the rounding of center themselves (csrc/cpu/channel_view.h). The elementwise loops compute in at::opmath_type<T> (float for float, half and bfloat16; double
// for double).
//
// Pointers documented "or null" switch a term off: residual (no residual), out (no ReLU mask: g = grad_out),
// masked / grad_input / grad_residual (not written). The elementwise loops allow out == x and
// grad_input == grad_out (in place). Defined for float, double, c10::Half and c10::BFloat16
// (csrc/cpu/channel_loops.cpp); float and double are vectorised and compiled once per instruction set
// (csrc/cpu/simd.h).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace resfuse::cpu::loops {

template <typename T>
using opmath_t = at::opmath_type<T>;

// sum += Σ (x - pivot);  sum_sq += Σ (x - pivot)^2.
template <typename T>
void shifted_sums_planes(const T* x, int64_t planes, int64_t stride, int64_t n, opmath_t<T> pivot, double* sum,
                         double* sum_sq);
template <typename T>
void shifted_sums_rows(const T* x, int64_t rows, int64_t channels, const opmath_t<T>* pivot, double* sum,
                       double* sum_sq);

// out = act((x - center)*scale + shift + residual); residual or null.
template <typename T>
void affine_act_planes(const T* x, const T* residual, T* out, int64_t planes, int64_t stride, int64_t n,
                       opmath_t<T> center, opmath_t<T> scale, opmath_t<T> shift, bool relu);
template <typename T>
void affine_act_rows(const T* x, const T* residual, T* out, int64_t rows, int64_t channels,
                     const opmath_t<T>* center, const opmath_t<T>* scale, const opmath_t<T>* shift, bool relu);

// g = out <= 0 ? 0 : grad_out (out or null: g = grad_out);  sum_g += Σ g;  sum_gx += Σ g*(x - center);
// masked = g (or null): the pass that reads grad_out and out can leave g for the next one.
template <typename T>
void grad_sums_planes(const T* grad_out, const T* out, const T* x, int64_t planes, int64_t stride, int64_t n,
                      opmath_t<T> center, double* sum_g, double* sum_gx, T* masked);
template <typename T>
void grad_sums_rows(const T* grad_out, const T* out, const T* x, int64_t rows, int64_t channels,
                    const opmath_t<T>* center, double* sum_g, double* sum_gx, T* masked);

// Per-channel coefficients of grad_input = (g - k1 - (x - center)*m2)*a.
template <typename M>
struct GradCoefficients {
  M center, k1, m2, a;
};
template <typename M>
struct GradCoefficientArrays {
  const M* center;
  const M* k1;
  const M* m2;
  const M* a;
};

// g as above;  grad_input = (g - k1 - (x - center)*m2)*a;  grad_residual = g.  Either output or null.
template <typename T>
void grad_apply_planes(const T* grad_out, const T* out, const T* x, int64_t planes, int64_t stride, int64_t n,
                       GradCoefficients<opmath_t<T>> coef, T* grad_input, T* grad_residual);
template <typename T>
void grad_apply_rows(const T* grad_out, const T* out, const T* x, int64_t rows, int64_t channels,
                     GradCoefficientArrays<opmath_t<T>> coef, T* grad_input, T* grad_residual);

}  // namespace resfuse::cpu::loops
