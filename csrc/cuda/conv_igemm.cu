// resfuse::conv_bn_act_igemm: the eval-mode conv + folded BN (+ residual) (+ ReLU) as ONE tensor-core kernel of
// our own (contract: the conv_bn_act schema in csrc/resfuse.cpp; the backward is conv_bn_act's).
//
// Implicit GEMM over NHWC, C[M, Cout] = A[M, K] * B[K, Cout] with M = N*OH*OW and K = KH*KW*Cin:
//   A[m, k] = x[n, oh*sh - ph + r*dh, ow*sw - pw + q*dw, c]   (zero outside the image),  k = (r*KW + q)*Cin + c
//   B[k, o] = w[o, r, q, c]                                   (the weight in channels_last: OHWI, contiguous in k)
//   out[m, o] = act(C[m, o] + bias[o] + residual[m, o])       written once, NHWC, as 16-byte vectors.
// Block tile 128 (M) x 64 (Cout) x 32 (K), four warps of 64 x 32 on WMMA 16x16x16 fragments with fp32
// accumulators; operands staged through shared memory by a two-stage cp.async pipeline whose zero-fill
// supplies the padding; the epilogue goes through shared memory so that every global store is 16 bytes.
// Scope: fp16 / bf16, channels_last input, groups == 1, Cin % 8 == 0 and Cout % 8 == 0 (a 16-byte vector then
// never straddles a filter tap, a tile edge or the channel end), sm_80 or newer. unusable_reason() names what
// else is refused, for this kernel and the Hopper one: the one rule of csrc/cuda/conv_kernels.h.
#include "channel_view.cuh"
#include "conv_kernels.h"
#include "conv_sm90.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <limits>
#include <string>

namespace resfuse::cuda {
namespace {

constexpr int kBM = 128;                 // output pixels per block
constexpr int kBN = 64;                  // output channels per block
constexpr int kBK = 32;                  // reduction slice per pipeline stage
constexpr int kIgemmThreads = 128;       // four warps, 2 (M) x 2 (N), each 64 x 32
constexpr int kLd = kBK + 8;             // smem row of an operand tile: 80 bytes, staggers banks, 16-byte aligned
constexpr int kEpiLd = kBN + 4;          // smem row of the fp32 epilogue tile
constexpr int kStageA = kBM * kLd;       // elements of one A stage
constexpr int kStageB = kBN * kLd;       // elements of one B stage

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

struct IgemmShape {
  int h, w, cin;           // input (N is implied by m)
  int oh, ow, cout;
  int kw;                  // filter width (the height is implied by k)
  int sh, sw, ph, pw, dh, dw;
  int m;                   // N*OH*OW
  int k;                   // KH*KW*Cin
};

// 16 bytes global -> shared, asynchronously; `valid` false writes 16 zero bytes instead (the conv's padding).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

template <typename scalar_t>
__global__ void __launch_bounds__(kIgemmThreads)
    conv_igemm_kernel(IgemmShape s, const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                      const scalar_t* __restrict__ bias, const scalar_t* __restrict__ residual,
                      scalar_t* __restrict__ out, bool relu) {
#if __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using wmma_t = typename WmmaType<scalar_t>::type;
  constexpr int kPipeBytes = 2 * (kStageA + kStageB) * static_cast<int>(sizeof(scalar_t));
  constexpr int kEpiBytes = kBM * kEpiLd * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes];
  scalar_t* sa = reinterpret_cast<scalar_t*>(smem);  // [2][kBM][kLd]
  scalar_t* sb = sa + 2 * kStageA;                    // [2][kBN][kLd]

  const int tid = static_cast<int>(threadIdx.x);
  const int m0 = static_cast<int>(blockIdx.x) * kBM;
  const int n0 = static_cast<int>(blockIdx.y) * kBN;

  // Loads: a stage is kBM x 4 vectors of A and kBN x 4 of B. This thread moves vector `kv` of rows
  // row0 + 32*i: four A rows (output pixels) and two B rows (output channels).
  const int kv = tid & 3;
  const int row0 = tid >> 2;
  int a_base[4], a_ih[4], a_iw[4];  // a_base: image offset n*H*W (in pixels); -1 for rows past M
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + row0 + 32 * i;
    const int ow = m % s.ow;
    const int t = m / s.ow;
    const int oh = t % s.oh;
    const int n = t / s.oh;
    a_base[i] = m < s.m ? n * s.h * s.w : -1;
    a_ih[i] = oh * s.sh - s.ph;
    a_iw[i] = ow * s.sw - s.pw;
  }

  auto load_stage = [&](int stage, int k0) {
    const int k = k0 + kv * 8;  // k % 8 == 0 and Cin % 8 == 0: the vector lies in one filter tap
    const bool k_ok = k < s.k;
    const int tap = k / s.cin;
    const int c = k - tap * s.cin;
    const int r = tap / s.kw;
    const int q = tap - r * s.kw;
    scalar_t* a_dst = sa + stage * kStageA + row0 * kLd + kv * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int ih = a_ih[i] + r * s.dh;
      const int iw = a_iw[i] + q * s.dw;
      const bool ok = k_ok && a_base[i] >= 0 && ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
      const scalar_t* src = ok ? x + (static_cast<int64_t>(a_base[i]) + ih * s.w + iw) * s.cin + c : x;
      cp_async_16(a_dst + 32 * i * kLd, src, ok);
    }
    scalar_t* b_dst = sb + stage * kStageB + row0 * kLd + kv * 8;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int o = n0 + row0 + 32 * j;
      const bool ok = k_ok && o < s.cout;
      const scalar_t* src = ok ? w + static_cast<int64_t>(o) * s.k + k : w;
      cp_async_16(b_dst + 32 * j * kLd, src, ok);
    }
    cp_async_commit();
  };

  const int warp = tid / 32;
  const int warp_m = (warp >> 1) * 64;
  const int warp_n = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  const int k_tiles = (s.k + kBK - 1) / kBK;
  load_stage(0, 0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    if (kt + 1 < k_tiles) {
      load_stage(stage ^ 1, (kt + 1) * kBK);  // overlaps this stage's math
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const wmma_t* a = reinterpret_cast<const wmma_t*>(sa + stage * kStageA);
    const wmma_t* b = reinterpret_cast<const wmma_t*>(sb + stage * kStageB);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], a + (warp_m + 16 * i) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + (warp_n + 16 * j) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // Epilogue: accumulators -> shared memory (the pipeline's buffers are free now) -> bias, residual, ReLU ->
  // one 16-byte store per 8 output channels.
  float* se = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(se + (warp_m + 16 * i) * kEpiLd + warp_n + 16 * j, acc[i][j], kEpiLd,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  using V = Vec16<scalar_t>;
  constexpr int kVecPerRow = kBN / V::kSize;
  for (int e = tid; e < kBM * kVecPerRow; e += kIgemmThreads) {
    const int row = e / kVecPerRow;
    const int col = (e - row * kVecPerRow) * V::kSize;
    const int m = m0 + row;
    const int o = n0 + col;
    if (m >= s.m || o >= s.cout) continue;  // Cout % 8 == 0: a vector is wholly inside or outside
    const int64_t off = static_cast<int64_t>(m) * s.cout + o;
    V rv;
    if (residual != nullptr) rv = *reinterpret_cast<const V*>(residual + off);
    V ov;
#pragma unroll
    for (int t = 0; t < V::kSize; ++t) {
      float y = se[row * kEpiLd + col + t];
      if (bias != nullptr) y += static_cast<float>(bias[o + t]);
      if (residual != nullptr) y += static_cast<float>(rv.v[t]);
      if (relu && y < 0.0f) y = 0.0f;  // `y < 0` keeps NaN as NaN, like torch.relu
      ov.v[t] = static_cast<scalar_t>(y);
    }
    *reinterpret_cast<V*>(out + off) = ov;
  }
#else
  __trap();  // conv_igemm_unsupported() refuses devices before sm_80
#endif
}

int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

// Why neither one-launch kernel can run this call (nullptr: both can, hardware and build aside).
const char* one_launch_scope_reason(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!input.is_cuda()) return "not a CUDA tensor";
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return "only float16 and bfloat16 inputs";
  if (groups != 1) return "grouped convolution";
  if (input.size(1) == 0) return "an input without channels";
  if (weight.size(1) != input.size(1)) return "an input whose channels do not match the weight";
  if (!input.is_contiguous(at::MemoryFormat::ChannelsLast)) return "the input is not channels_last";
  if (input.size(1) % 8 != 0 || weight.size(0) % 8 != 0) return "channel counts that are not multiples of 8";
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (input.numel() > kMax || weight.numel() > kMax) return "tensors of 2^31 elements or more";
  const int64_t oh = out_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]);
  const int64_t ow = out_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1]);
  if (oh <= 0 || ow <= 0) return "an empty output";
  if (input.size(0) * oh * ow * weight.size(0) > kMax) return "outputs of 2^31 elements or more";
  if (reinterpret_cast<std::uintptr_t>(input.data_ptr()) % 16 != 0) return "an input not aligned to 16 bytes";
  if (present(residual) && reinterpret_cast<std::uintptr_t>(residual->data_ptr()) % 16 != 0) {
    return "a residual not aligned to 16 bytes";
  }
  return nullptr;
}

const char* igemm_hardware_reason(const at::Tensor& input) {
  return at::cuda::getDeviceProperties(input.get_device())->major < 8 ? "a GPU older than sm_80" : nullptr;
}

// Why the Hopper kernel (csrc/cuda/conv_sm90.cu) cannot run on this machine and build (nullptr: it can).
const char* sm90_hardware_reason(const at::Tensor& input) {
  if (const char* reason = conv_sm90_build_reason()) return reason;
  return at::cuda::getDeviceProperties(input.get_device())->major != 9 ? "a GPU other than sm_90 (Hopper)"
                                                                         : nullptr;
}

const char* unusable_reason(ConvKernel kernel, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (const char* reason = one_launch_scope_reason(input, weight, residual, stride, padding, dilation, groups)) {
    return reason;
  }
  return kernel == ConvKernel::kSm90 ? sm90_hardware_reason(input) : igemm_hardware_reason(input);
}

// What both kernels take: the checked call, its output (NHWC) and its operands as dense NHWC / KRSC tensors.
struct IgemmCall {
  at::Tensor out, weight, bias, residual;
  int64_t oh = 0, ow = 0;
};

// For a call unusable_reason accepted.
IgemmCall prepare_igemm_call(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  IgemmCall call;
  call.oh = out_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]);
  call.ow = out_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1]);
  call.out = at::empty({input.size(0), weight.size(0), call.oh, call.ow},
                       input.options().memory_format(at::MemoryFormat::ChannelsLast));
  call.weight = weight.contiguous(at::MemoryFormat::ChannelsLast);  // OHWI (KRSC): contiguous in k
  if (reinterpret_cast<std::uintptr_t>(call.weight.data_ptr()) % 16 != 0) {
    call.weight = call.weight.clone(at::MemoryFormat::ChannelsLast);  // a view at an odd offset: the copy is aligned
  }
  if (present(bias)) call.bias = bias->to(input.scalar_type()).contiguous();
  if (present(residual)) call.residual = residual->contiguous(at::MemoryFormat::ChannelsLast);
  return call;
}

void launch_igemm(const IgemmCall& call, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const at::Tensor& out = call.out;
  const int64_t cin = input.size(1), kh = weight.size(2), kw = weight.size(3), cout = weight.size(0);
  IgemmShape s{};
  s.h = static_cast<int>(input.size(2));
  s.w = static_cast<int>(input.size(3));
  s.cin = static_cast<int>(cin);
  s.oh = static_cast<int>(call.oh);
  s.ow = static_cast<int>(call.ow);
  s.cout = static_cast<int>(cout);
  s.kw = static_cast<int>(kw);
  s.sh = static_cast<int>(stride[0]);
  s.sw = static_cast<int>(stride[1]);
  s.ph = static_cast<int>(padding[0]);
  s.pw = static_cast<int>(padding[1]);
  s.dh = static_cast<int>(dilation[0]);
  s.dw = static_cast<int>(dilation[1]);
  s.m = static_cast<int>(input.size(0) * call.oh * call.ow);
  s.k = static_cast<int>(kh * kw * cin);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.m, kBM)), static_cast<unsigned>(ceil_div(cout, kBN)));
  auto launch = [&](auto tag) {
    using scalar_t = decltype(tag);
    conv_igemm_kernel<scalar_t><<<grid, kIgemmThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        s, input.data_ptr<scalar_t>(), call.weight.data_ptr<scalar_t>(),
        call.bias.defined() ? call.bias.data_ptr<scalar_t>() : nullptr,
        call.residual.defined() ? call.residual.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), relu);
  };
  if (input.scalar_type() == at::kHalf) {
    launch(at::Half{});
  } else {
    launch(at::BFloat16{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

ConvSm90Outcome launch_sm90(const IgemmCall& call, const at::Tensor& input, const at::Tensor& weight,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  ConvSm90Problem p{};
  p.n = static_cast<int>(input.size(0));
  p.h = static_cast<int>(input.size(2));
  p.w = static_cast<int>(input.size(3));
  p.c = static_cast<int>(input.size(1));
  p.k = static_cast<int>(weight.size(0));
  p.r = static_cast<int>(weight.size(2));
  p.s = static_cast<int>(weight.size(3));
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  p.fp16 = input.scalar_type() == at::kHalf;
  p.relu = relu;
  p.input = input.data_ptr();
  p.weight = call.weight.data_ptr();
  p.bias = call.bias.defined() ? call.bias.data_ptr() : nullptr;
  p.residual = call.residual.defined() ? call.residual.data_ptr() : nullptr;
  p.out = call.out.data_ptr();
  const ConvSm90Outcome outcome = conv_sm90_run(p, at::cuda::getCurrentCUDAStream());
  if (outcome.error == nullptr) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return outcome;
}

void check_one_launch_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups) {
  check_conv_args(input, weight, stride, padding, dilation, groups, op);
  check_optional_per_channel(bias, weight.size(0), input, op, "bias");
  if (present(residual)) {
    const int64_t oh = out_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]);
    const int64_t ow = out_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1]);
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == input.size(0) && residual->size(1) == weight.size(0) &&
                    residual->size(2) == oh && residual->size(3) == ow,
                op, ": residual must have the same shape as the convolution output [", input.size(0), ", ",
                weight.size(0), ", ", oh, ", ", ow, "], but got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type() && residual->device() == input.device(), op,
                ": residual must have the input's dtype and device");
  }
}

at::Tensor conv_bn_act_igemm_cuda(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, bool relu) {
  return conv_bn_act_one_launch(ConvKernel::kIgemm, "resfuse::conv_bn_act_igemm", input, weight, bias, residual,
                                stride, padding, dilation, groups, relu);
}

at::Tensor conv_bn_act_sm90_cuda(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool relu) {
  return conv_bn_act_one_launch(ConvKernel::kSm90, "resfuse::conv_bn_act_sm90", input, weight, bias, residual,
                                stride, padding, dilation, groups, relu);
}

}  // namespace

ConvKernel cuda_conv_setting() {
  const char* raw = std::getenv("RESFUSE_CUDA_CONV");
  std::string name;
  for (const char* c = raw != nullptr ? raw : ""; *c != '\0'; ++c) {
    if (!std::isspace(static_cast<unsigned char>(*c))) name += static_cast<char>(std::tolower(*c));
  }
  if (name.empty() || name == "auto") return ConvKernel::kAuto;
  if (name == "aten") return ConvKernel::kAten;
  if (name == "igemm") return ConvKernel::kIgemm;
  TORCH_CHECK(name == "sm90", "RESFUSE_CUDA_CONV=", raw, ": expected one of auto, aten, igemm, sm90 (or unset)");
  return ConvKernel::kSm90;
}

std::string cuda_conv_setting_name() {
  return conv_kernel_name(cuda_conv_setting());
}

const char* conv_kernel_name(ConvKernel kernel) {
  switch (kernel) {
    case ConvKernel::kAten: return "aten";
    case ConvKernel::kIgemm: return "igemm";
    case ConvKernel::kSm90: return "sm90";
    default: return "auto";
  }
}

at::Tensor conv_bn_act_one_launch(ConvKernel kernel, const char* asked_by, const at::Tensor& input,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const char* op = kernel == ConvKernel::kSm90 ? "resfuse::conv_bn_act_sm90" : "resfuse::conv_bn_act_igemm";
  check_one_launch_args(asked_by, input, weight, bias, residual, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const char* reason = unusable_reason(kernel, input, weight, residual, stride, padding, dilation, groups);
  TORCH_CHECK(reason == nullptr, asked_by, ": ", op, " does not take this call (", reason ? reason : "",
              "); resfuse::conv_bn_act, the cuda backend's default, runs any convolution");
  const IgemmCall call = prepare_igemm_call(input, weight, bias, residual, stride, padding, dilation);
  if (kernel == ConvKernel::kIgemm) {
    launch_igemm(call, input, weight, stride, padding, dilation, relu);
  } else {
    const ConvSm90Outcome outcome = launch_sm90(call, input, weight, stride, padding, dilation, relu);
    TORCH_CHECK(outcome.error == nullptr, asked_by, ": ", op, ": ", outcome.error ? outcome.error : "");
  }
  return call.out;
}

std::optional<at::Tensor> conv_bn_act_sm90_if_it_takes(const at::Tensor& input, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const std::optional<at::Tensor>& residual,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups, bool relu) {
  if (unusable_reason(ConvKernel::kSm90, input, weight, residual, stride, padding, dilation, groups) != nullptr) {
    return std::nullopt;
  }
  const IgemmCall call = prepare_igemm_call(input, weight, bias, residual, stride, padding, dilation);
  const ConvSm90Outcome outcome = launch_sm90(call, input, weight, stride, padding, dilation, relu);
  if (outcome.error != nullptr && outcome.refused) {
    return std::nullopt;  // CUTLASS refused before launching anything: the ATen route takes it
  }
  TORCH_CHECK(outcome.error == nullptr, "resfuse::conv_bn_act: ", outcome.error);
  return call.out;
}

}  // namespace resfuse::cuda

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("conv_bn_act_igemm", &resfuse::cuda::conv_bn_act_igemm_cuda);
  m.impl("conv_bn_act_sm90", &resfuse::cuda::conv_bn_act_sm90_cuda);
}
