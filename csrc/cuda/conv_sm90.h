// The interface between resfuse::conv_bn_act_sm90 (csrc/cuda/conv_igemm.cu, torch side) and its kernel
// (csrc/cuda/conv_sm90.cu, CUTLASS side). Plain types only, so neither file has to include the other's headers:
// CUTLASS's Hopper templates and torch's headers are each heavy to compile.
#pragma once

#include <cuda_runtime_api.h>

namespace resfuse::cuda {

// out[n, p, q, k] = act(sum_{r, s, c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c] * w[k, r, s, c] + bias[k]
//                       + residual[n, p, q, k]),  every tensor dense NHWC (the weight KRSC), one dtype.
struct ConvSm90Problem {
  int n, h, w, c;            // input
  int k, r, s;               // weight: output channels, filter height and width
  int pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
  bool fp16;                 // the dtype of every tensor: float16, else bfloat16
  bool relu;
  const void* input;
  const void* weight;
  const void* bias;          // [k] or nullptr
  const void* residual;      // shaped like out, or nullptr
  void* out;
};

// Why this build cannot run the kernel (nullptr: it can, on an sm_90 GPU): compiled without CUTLASS's headers
// (RESFUSE_WITH_CUTLASS) or without an sm_90a target. The op checks it, and resfuse._C reports it to Python.
const char* conv_sm90_build_reason();

// What conv_sm90_run did: error == nullptr on success; otherwise `refused` tells whether CUTLASS refused the
// problem before anything was launched (can_implement, a workspace, the TMA descriptors: the caller may take
// another path) or the launch itself failed.
struct ConvSm90Outcome {
  const char* error;
  bool refused;
};

// Runs the convolution on `stream`. Needs an sm_90 GPU and a build for sm_90a; the caller checks both.
ConvSm90Outcome conv_sm90_run(const ConvSm90Problem& problem, cudaStream_t stream);

}  // namespace resfuse::cuda
