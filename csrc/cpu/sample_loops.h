// CPU loops over the [N, C, P] sample view (csrc/sample_view.h), shared by bn_squeeze and bn_scale_act.
//
// Parallel work units follow the memory layout so every thread streams contiguous memory:
//   NCHW: a unit is one (n, c) plane of P positions;
//   NHWC: a unit is one sample's [P, C] block, the channel loop innermost.
// Either way one thread sees all of an (n, c)'s elements, in position order: the per-(n, c) sums need no
// partials and do not depend on the thread count.
#pragma once

#include "../sample_view.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace resfuse::cpu {

// Elements per parallel task, as channel_view.h's kGrainElems.
constexpr int64_t kSampleGrainElems = 32768;

inline int64_t sample_grain(int64_t unit_length) {
  return std::max<int64_t>(1, kSampleGrainElems / std::max<int64_t>(1, unit_length));
}

// Calls fn(n, c, idx, acc) for every element; acc points to the K doubles of (n, c) in `sums` ([N][C][K]).
template <int K, typename F>
void visit_samples(const SampleView& v, double* sums, const F& fn) {
  const int64_t C = v.channels, P = v.positions;
  if (v.channels_last) {
    at::parallel_for(0, v.samples, sample_grain(P * C), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        double* acc = sums + n * C * K;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t base = (n * P + p) * C;
          for (int64_t c = 0; c < C; ++c) {
            fn(n, c, base + c, acc + c * K);
          }
        }
      }
    });
  } else {
    at::parallel_for(0, v.samples * C, sample_grain(P), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / C, c = j - n * C;
        double local[K] = {};  // one plane at a time: the sums stay in registers
        const int64_t base = j * P;
        for (int64_t p = 0; p < P; ++p) {
          fn(n, c, base + p, local);
        }
        std::copy(local, local + K, sums + j * K);
      }
    });
  }
}

// Per-(sample, channel) sums of K quantities over the positions, in double, laid out [N][C][K].
// fn(n, c, idx, acc) adds element idx's contributions into acc[0..K); it may also write element idx.
template <int K, typename F>
std::vector<double> reduce_per_sample(const SampleView& v, const F& fn) {
  std::vector<double> sums(static_cast<size_t>(v.samples * v.channels * K), 0.0);
  if (v.numel() > 0) {
    visit_samples<K>(v, sums.data(), fn);
  }
  return sums;
}

// Elementwise pass: fn(n, c, idx) once per element, in parallel. fn must only write element idx.
template <typename F>
void parallel_for_each_sample(const SampleView& v, const F& fn) {
  const int64_t C = v.channels, P = v.positions;
  if (v.numel() == 0) return;
  if (v.channels_last) {
    at::parallel_for(0, v.samples * P, sample_grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / P;
        for (int64_t c = 0; c < C; ++c) {
          fn(n, c, r * C + c);
        }
      }
    });
  } else {
    at::parallel_for(0, v.samples * C, sample_grain(P), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j / C, c = j - n * C;
        for (int64_t p = 0; p < P; ++p) {
          fn(n, c, j * P + p);
        }
      }
    });
  }
}

}  // namespace resfuse::cpu
