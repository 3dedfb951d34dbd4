// Per-channel vectors read and written in place by the eval-mode kernels (bn_eval_act.cu, fold_bn.cu), whatever
// their floating dtype and stride: BatchNorm parameters and running statistics come in the activation's dtype
// or fp32 (any float dtype from C++), and converting each to the accumulation dtype first would cost a launch
// per tensor on every call, more host time than these kernels' own work.
#pragma once

#include "../common.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace resfuse::cuda {

enum class ChannelDtype : int8_t { kAbsent, kFloat, kDouble, kHalf, kBFloat16 };

inline ChannelDtype channel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ChannelDtype::kFloat;
    case at::kDouble:
      return ChannelDtype::kDouble;
    case at::kHalf:
      return ChannelDtype::kHalf;
    case at::kBFloat16:
      return ChannelDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "resfuse: per-channel tensors must be float16, bfloat16, float32 or float64, but got ", t);
  }
}

// A [C] tensor read in place: data, stride and dtype; kAbsent stands for an absent optional (a fallback value).
struct ChannelParam {
  const void* data = nullptr;
  int64_t stride = 0;
  ChannelDtype dtype = ChannelDtype::kAbsent;
};

inline ChannelParam channel_param(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), channel_dtype(t.scalar_type())};
}

inline ChannelParam channel_param(const std::optional<at::Tensor>& t) {
  return present(t) ? channel_param(*t) : ChannelParam{};
}

// Element c of p in acc_t, or `fallback` when p is absent.
template <typename acc_t>
__device__ __forceinline__ acc_t load_channel(const ChannelParam& p, int64_t c, acc_t fallback) {
  const int64_t i = c * p.stride;
  switch (p.dtype) {
    case ChannelDtype::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(p.data)[i]);
    case ChannelDtype::kDouble:
      return static_cast<acc_t>(static_cast<const double*>(p.data)[i]);
    case ChannelDtype::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p.data)[i]));
    case ChannelDtype::kBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p.data)[i]));
    default:
      return fallback;
  }
}

// A contiguous [C] output written in place in its dtype; kAbsent: not written.
struct ChannelOut {
  void* data = nullptr;
  ChannelDtype dtype = ChannelDtype::kAbsent;
};

inline ChannelOut channel_out(at::Tensor& t, bool wanted) {
  return wanted ? ChannelOut{t.data_ptr(), channel_dtype(t.scalar_type())} : ChannelOut{};
}

template <typename acc_t>
__device__ __forceinline__ void store_channel(const ChannelOut& p, int64_t c, acc_t v) {
  switch (p.dtype) {
    case ChannelDtype::kFloat:
      static_cast<float*>(p.data)[c] = static_cast<float>(v);
      break;
    case ChannelDtype::kDouble:
      static_cast<double*>(p.data)[c] = static_cast<double>(v);
      break;
    case ChannelDtype::kHalf:
      static_cast<at::Half*>(p.data)[c] = static_cast<at::Half>(static_cast<float>(v));
      break;
    case ChannelDtype::kBFloat16:
      static_cast<at::BFloat16*>(p.data)[c] = static_cast<at::BFloat16>(static_cast<float>(v));
      break;
    default:
      break;
  }
}

}  // namespace resfuse::cuda
