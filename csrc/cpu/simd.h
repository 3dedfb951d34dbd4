// Fixed-width vectors for the CPU loops (csrc/cpu/channel_loops.cpp), and the CPU-feature clones they run as.
//
// The loops are written once on 16-lane vectors of GCC/Clang's vector extension. The compiler lowers a 16-lane
// vector to whatever the instruction set of the function at hand has (4 SSE registers, 2 AVX2, 1 AVX-512): the
// lanes, and so the order of every sum, are the same on every machine and at every thread count (the last bits
// can differ between instruction sets, where the compiler fuses a multiply and an add into one FMA).
//
// The extension is compiled for the baseline x86-64 (SSE2), like PyTorch itself; ATen's own CPU kernels are
// compiled once per instruction set and picked at run time (DispatchStub). RESFUSE_CPU_CLONES does the same for
// one function: with GCC 12 or newer on x86-64 Linux it compiles the function for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and the baseline, and the loader picks the best the CPU runs (an ifunc). Functions that
// carry it only call always-inlined code, so everything they run is compiled for the clone's instruction set.
// Elsewhere (other compilers, other architectures), or built with -DRESFUSE_NO_CPU_CLONES (to test the baseline
// on a machine that has more), it is empty and the baseline is compiled.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(__GNUC__)
#error "resfuse's CPU loops are written on GCC/Clang vector extensions: build with GCC or Clang"
#endif

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && \
    !defined(RESFUSE_NO_CPU_CLONES)
#define RESFUSE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RESFUSE_CPU_CLONES
#endif

#define RESFUSE_ALWAYS_INLINE inline __attribute__((always_inline))

// Vectors are passed between always-inlined functions only; GCC's note that an AVX vector argument would
// change the ABI of a real call does not apply.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace resfuse::cpu::simd {

// Elements per vector step of every loop.
constexpr int64_t kLanes = 16;

template <typename T, int64_t N>
struct VectorOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
// kLanes elements of T; Half<T>: half of them, what one vector of 8 doubles takes.
template <typename T>
using Vec = typename VectorOf<T, kLanes>::type;
template <typename T>
using Half = typename VectorOf<T, kLanes / 2>::type;
using Doubles = Half<double>;

template <typename V, typename T>
RESFUSE_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename T>
RESFUSE_ALWAYS_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
RESFUSE_ALWAYS_INLINE V zeros() {
  return V{};
}

// `zero ? 0 : v` per lane.
template <typename V, typename M>
RESFUSE_ALWAYS_INLINE V zero_where(const M& zero, const V& v) {
  return zero ? zeros<V>() : v;
}

// max(v, 0) per lane, keeping NaN as NaN like torch.relu.
template <typename V>
RESFUSE_ALWAYS_INLINE V relu(const V& v) {
  return v < zeros<V>() ? zeros<V>() : v;
}

// The lanes' sum, in lane order.
RESFUSE_ALWAYS_INLINE double sum_lanes(const Doubles& v) {
  double s = 0.0;
  for (int64_t l = 0; l < kLanes / 2; ++l) {
    s += v[l];
  }
  return s;
}

}  // namespace resfuse::cpu::simd
