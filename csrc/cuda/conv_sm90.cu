// The kernel of resfuse::conv_bn_act_sm90: an implicit-GEMM convolution for Hopper built from CUTLASS's sm90
// templates (TMA im2col loads, wgmma, a producer warp and a consumer warpgroup), with the eval block's epilogue
// fused into CUTLASS's epilogue visitor tree:
//   out = clamp(acc + bias[k] + beta * residual, lower, highest)   beta = 1 with a residual, else 0 (C is then
//   never loaded); lower = 0 for ReLU, lowest() without it
// GEMM view: M = N*P*Q output pixels, N = K output channels, K = R*S*C; the tiles are chosen per shape in
// run_for_dtype. Why CUTLASS and not our own wgmma kernel: benchmarks/NOTES.md. Compiled only with RESFUSE_WITH_CUTLASS (setup.py finds the headers of
// the nvidia-cutlass wheel); the kernels run only from an sm_90a build.
// CUTLASS's device-side asserts are calls out of the mainloop, and ptxas then serializes every wgmma around
// them (warning C7510); CUTLASS's own builds define NDEBUG. This file holds nothing else that asserts.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "conv_sm90.h"

#if defined(RESFUSE_WITH_CUTLASS)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/conv/convolution.h>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>

#include <limits>
#endif

#include <string>

#ifndef RESFUSE_CUDA_ARCH_LIST
#define RESFUSE_CUDA_ARCH_LIST ""
#endif

namespace resfuse::cuda {

#if defined(RESFUSE_WITH_CUTLASS)
namespace {

using namespace cute;

// kStages = 0: as many mainloop stages as shared memory holds next to the epilogue's.
template <class Element, class TileShape, class Cluster = Shape<_1, _1, _1>, int kStages = 0>
struct HopperConv {
  using Layout = cutlass::layout::TensorNHWC;  // activations NHWC, the filter KRSC, the output NPQK
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Clamp, Element,
                                                                     float, Element, Element, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, Layout, kAlign, Element, Layout,
      kAlign, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element, Layout,
      kAlign, Element, Layout, kAlign, float, TileShape, Cluster,
      cute::conditional_t<kStages == 0,
                          cutlass::conv::collective::StageCountAutoCarveout<
                              static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
                          cutlass::conv::collective::StageCount<kStages>>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop,
                                                  Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Device = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <class Conv>
ConvSm90Outcome run(const ConvSm90Problem& p, cudaStream_t stream) {
  using Element = typename Conv::Mainloop::ElementA;
  using Kernel = typename Conv::Kernel;
  typename Conv::Problem problem(cutlass::conv::Mode::kCrossCorrelation, {p.n, p.h, p.w, p.c}, {p.k, p.r, p.s, p.c},
                                 {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w},
                                 {p.dil_h, p.dil_w}, 1);
  typename Kernel::StrideC stride_c;
  typename Kernel::StrideD stride_d;
  // The output's (q, p, n) strides, innermost first, as CUTLASS's examples derive them from the problem.
  cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(stride_c) = problem.stride_C[Conv::Problem::RankT - 2 - i];
    cute::get<0, i>(stride_d) = problem.stride_C[Conv::Problem::RankT - 2 - i];
  });
  auto* out = static_cast<Element*>(p.out);
  // Without a residual C points at the output, only for a valid address: beta = 0 skips its loads.
  const auto* source = p.residual != nullptr ? static_cast<const Element*>(p.residual) : out;
  typename Conv::Device::Arguments args{
      problem,
      {static_cast<const Element*>(p.input), static_cast<const Element*>(p.weight)},
      {{}, source, stride_c, out, stride_d}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = p.residual != nullptr ? 1.0f : 0.0f;
  fusion.bias_ptr = static_cast<const Element*>(p.bias);
  fusion.activation.lower_bound = p.relu ? 0.0f : std::numeric_limits<float>::lowest();
  fusion.activation.upper_bound = std::numeric_limits<float>::max();

  typename Conv::Device conv;
  if (conv.can_implement(args) != cutlass::Status::kSuccess) {
    return {"CUTLASS's Hopper convolution cannot implement this problem (TMA limits on its shape or strides)", true};
  }
  if (Conv::Device::get_workspace_size(args) != 0) {
    return {"CUTLASS's Hopper convolution asked for a workspace", true};  // none for this kernel
  }
  if (conv.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    return {"CUTLASS's Hopper convolution could not be initialized (TMA descriptors)", true};
  }
  if (conv.run(stream) != cutlass::Status::kSuccess) {
    return {"CUTLASS's Hopper convolution failed to launch", false};
  }
  return {nullptr, false};
}

// Three configurations, picked by the problem's shape from a sweep of twelve on an H100 over every
// ResNet-18/50 conv at N=128 (benchmarks/NOTES.md has the table). Fixed stage counts leave room for a second
// block per SM where registers allow, which the non-persistent kernel needs to hide its epilogue:
//  - K <= 64 output channels: 128 x 64 tiles, four stages (a 128-wide N tile would waste half its MMAs).
//  - K >= 256 with a long reduction (R*S*C >= 1024): 128 x 128 tiles in clusters of two along N, so the pair
//    shares each activation tile through TMA multicast.
//  - otherwise: 64 x 128 tiles, four stages (more blocks in flight for the short reductions).
// The reduction tile is a nested shape (C's slice of K = R*S*C), as CUTLASS's conv mainloop expects.
template <class Element>
ConvSm90Outcome run_for_dtype(const ConvSm90Problem& p, cudaStream_t stream) {
  if (p.k <= 64) {
    return run<HopperConv<Element, Shape<_128, _64, Shape<_64>>, Shape<_1, _1, _1>, 4>>(p, stream);
  }
  if (p.k >= 256 && p.r * p.s * p.c >= 1024) {
    return run<HopperConv<Element, Shape<_128, _128, Shape<_64>>, Shape<_1, _2, _1>, 4>>(p, stream);
  }
  return run<HopperConv<Element, Shape<_64, _128, Shape<_64>>, Shape<_1, _1, _1>, 4>>(p, stream);
}

}  // namespace

ConvSm90Outcome conv_sm90_run(const ConvSm90Problem& p, cudaStream_t stream) {
  return p.fp16 ? run_for_dtype<cutlass::half_t>(p, stream) : run_for_dtype<cutlass::bfloat16_t>(p, stream);
}

#else  // built without CUTLASS's headers

ConvSm90Outcome conv_sm90_run(const ConvSm90Problem&, cudaStream_t) {
  return {conv_sm90_build_reason(), true};
}

#endif

const char* conv_sm90_build_reason() {
#if defined(RESFUSE_WITH_CUTLASS)
  static const bool built_for_sm90a = std::string(RESFUSE_CUDA_ARCH_LIST).find("9.0a") != std::string::npos;
  return built_for_sm90a ? nullptr : "a build without sm_90a (TORCH_CUDA_ARCH_LIST lacks 9.0a)";
#else
  return "a build without CUTLASS's headers (pip install --no-deps nvidia-cutlass, then rebuild)";
#endif
}

}  // namespace resfuse::cuda
