"""Sweep of tile / cluster / stage configurations of resfuse's CUTLASS Hopper convolution (bf16), against cuDNN's
fused conv + bias (+ add) + ReLU, over the 3x3 and 1x1 convs of ResNet-18/50 at N=128. Needs an sm_90 GPU, the
nvidia-cutlass wheel and nvcc; builds its own extension (about a minute on 16 cores). How the three shipped
configurations were chosen (csrc/cuda/conv_sm90.cu, run_for_dtype):

    TORCH_CUDA_ARCH_LIST=9.0a python benchmarks/sm90_sweep/sweep.py

Each configuration is one instantiation of conv_sm90.cu's HopperConv template; its text is taken from that file,
so the sweep times the shipped kernel code. Prints median microseconds (triton.testing.do_bench, L2 flushed)
per configuration; a configuration whose output differs from the fp32 reference by more than 2e-2 relative
L2 error is marked ERR and never picked.
"""
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

CONFIGS = [  # tile M,N,K; cluster; mainloop stages (0: as many as shared memory holds)
    ("_128,_64,Shape<_64>", "_1,_1,_1", 0),
    ("_128,_64,Shape<_64>", "_1,_1,_1", 4),
    ("_128,_64,Shape<_64>", "_1,_1,_1", 3),
    ("_128,_64,Shape<_64>", "_1,_1,_1", 2),
    ("_128,_64,Shape<_64>", "_2,_1,_1", 3),
    ("_128,_128,Shape<_64>", "_1,_1,_1", 0),
    ("_128,_128,Shape<_64>", "_1,_1,_1", 3),
    ("_128,_128,Shape<_64>", "_1,_2,_1", 4),
    ("_128,_128,Shape<_64>", "_2,_1,_1", 4),
    ("_64,_128,Shape<_64>", "_1,_1,_1", 4),
    ("_64,_64,Shape<_64>", "_1,_1,_1", 4),
    ("_128,_64,Shape<_64>", "_1,_2,_1", 3),
    ("_256,_64,Shape<_64>", "_1,_1,_1", 0),
    ("_256,_64,Shape<_64>", "_1,_1,_1", 4),
    ("_256,_64,Shape<_64>", "_2,_1,_1", 4),
    ("_64,_256,Shape<_64>", "_1,_1,_1", 4),
    ("_64,_256,Shape<_64>", "_1,_1,_1", 0),
    ("_128,_64,Shape<_64>", "_1,_1,_1", 6),
]
FILES = 6  # translation units, compiled in parallel
SHAPES = [  # name, N, C, K, H, kernel size, residual
    ("C64_H56 3x3 +r", 128, 64, 64, 56, 3, True),
    ("C128_H28 3x3 +r", 128, 128, 128, 28, 3, True),
    ("C256_H14 3x3 +r", 128, 256, 256, 14, 3, True),
    ("C512_H7 3x3 +r", 128, 512, 512, 7, 3, True),
    ("256>64 H56 1x1", 128, 256, 64, 56, 1, False),
    ("64>256 H56 1x1 +r", 128, 64, 256, 56, 1, True),
    ("1024>256 H14 1x1", 128, 1024, 256, 14, 1, False),
    ("256>1024 H14 1x1 +r", 128, 256, 1024, 14, 1, True),
    ("2048>512 H7 1x1", 128, 2048, 512, 7, 1, False),
    ("512>2048 H7 1x1 +r", 128, 512, 2048, 7, 1, True),
    ("C128_H28 3x3", 128, 128, 128, 28, 3, False),
]
HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = os.path.join(HERE, "..", "..", "csrc", "cuda", "conv_sm90.cu")

BINDING = r'''
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include "conv_sm90.h"
namespace resfuse::cuda {
%(decls)s
}
at::Tensor run(at::Tensor x, at::Tensor w, std::optional<at::Tensor> b, std::optional<at::Tensor> r, int64_t pad,
               int64_t cfg) {
  const int64_t oh = x.size(2) + 2 * pad - w.size(2) + 1, ow = x.size(3) + 2 * pad - w.size(3) + 1;
  auto out = at::empty({x.size(0), w.size(0), oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  resfuse::cuda::ConvSm90Problem p{};
  p.n = x.size(0); p.h = x.size(2); p.w = x.size(3); p.c = x.size(1);
  p.k = w.size(0); p.r = w.size(2); p.s = w.size(3);
  p.pad_h = p.pad_w = pad; p.stride_h = p.stride_w = 1; p.dil_h = p.dil_w = 1; p.relu = true;
  p.input = x.data_ptr(); p.weight = w.data_ptr(); p.bias = b ? b->data_ptr() : nullptr;
  p.residual = r ? r->data_ptr() : nullptr; p.out = out.data_ptr();
  const char* error = nullptr;
  switch (cfg %% %(files)d) {
%(cases)s
  }
  TORCH_CHECK(error == nullptr, error ? error : "");
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
'''


def write_sources(folder: str) -> list[str]:
    src = open(KERNEL).read()
    head = src[:src.index("namespace resfuse::cuda {")]
    templates = src[src.index("namespace {"):src.index("// Three configurations")]
    paths = []
    for f in range(FILES):
        lines = [head, "namespace resfuse::cuda {", templates, "}  // namespace",
                 f"const char* sweep_run_{f}(const ConvSm90Problem& p, cudaStream_t stream, int cfg) {{",
                 "  switch (cfg) {"]
        for i in range(f, len(CONFIGS), FILES):
            tile, cluster, stages = CONFIGS[i]
            lines.append(f"    case {i}: return run<HopperConv<cutlass::bfloat16_t, Shape<{tile}>, "
                         f"Shape<{cluster}>, {stages}>>(p, stream);")
        lines += ["  }", '  return "no such configuration";', "}", "}  // namespace resfuse::cuda"]
        paths.append(os.path.join(folder, f"sweep_{f}.cu"))
        open(paths[-1], "w").write("\n".join(lines) + "\n")
    decls = "\n".join(f"const char* sweep_run_{f}(const ConvSm90Problem&, cudaStream_t, int);" for f in range(FILES))
    cases = "\n".join(f"    case {f}: error = resfuse::cuda::sweep_run_{f}(p, at::cuda::getCurrentCUDAStream(), cfg); "
                      "break;" for f in range(FILES))
    paths.append(os.path.join(folder, "binding.cpp"))
    open(paths[-1], "w").write(BINDING % {"decls": decls, "cases": cases, "files": FILES})
    return paths


def main() -> int:
    import cutlass_library
    import triton.testing
    from torch.utils.cpp_extension import load

    from resfuse.ops import cudnn_fused

    cutlass = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    folder = tempfile.mkdtemp(prefix="resfuse-sm90-sweep-")
    start = time.time()
    module = load("resfuse_sm90_sweep", write_sources(folder), build_directory=folder,
                  extra_include_paths=[os.path.dirname(KERNEL), cutlass + "/include", cutlass + "/tools/util/include"],
                  extra_cuda_cflags=["-O3", "-DRESFUSE_WITH_CUTLASS"])
    print(f"# built in {time.time() - start:.0f} s; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("# configurations: " + "; ".join(f"{i}: {t.replace('Shape<_64>', '_64')} cluster {c} stages {s or 'auto'}"
                                           for i, (t, c, s) in enumerate(CONFIGS)))
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    for name, n, c, k, h, ks, with_residual in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        cl = torch.channels_last
        x = torch.randn(n, c, h, h, device="cuda", generator=g).bfloat16().contiguous(memory_format=cl)
        w = (torch.randn(k, c, ks, ks, device="cuda", generator=g) / (c * ks * ks) ** 0.5).bfloat16()
        w = w.contiguous(memory_format=cl)
        b = (torch.randn(k, device="cuda", generator=g) * 0.1).bfloat16()
        r = torch.randn(n, k, h, h, device="cuda", generator=g).bfloat16().contiguous(memory_format=cl) \
            if with_residual else None
        pad = ks // 2
        ref = F.conv2d(x.float(), w.float(), b.float(), 1, pad) + (r.float() if r is not None else 0)
        ref = ref.relu()
        cudnn_us = bench(lambda: cudnn_fused.run(x, w, b, r, [1, 1], [pad, pad], [1, 1], 1))
        cells, best = [], (None, float("inf"))
        for cfg in range(len(CONFIGS)):
            try:
                err = ((module.run(x, w, b, r, pad, cfg).float() - ref).norm() / ref.norm()).item()
                us = bench(lambda: module.run(x, w, b, r, pad, cfg))
            except RuntimeError as exc:
                cells.append(f"{cfg}:refused({str(exc)[:40]})")
                continue
            cells.append(f"{cfg}:{us:.1f}" + ("" if err < 2e-2 else f"(ERR {err:.1e})"))
            if err < 2e-2 and us < best[1]:
                best = (cfg, us)
        flops = 2 * n * h * h * k * c * ks * ks
        print(f"{name:20s} cudnn {cudnn_us:6.1f} | " + " ".join(cells) +
              f" | best {best[0]}: {best[1]:.1f} us = {best[1] / cudnn_us:.2f}x cuDNN, {flops / best[1] / 1e6:.0f} TFLOP/s",
              flush=True)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("the sweep runs CUTLASS's Hopper kernels: it needs an sm_90 GPU")
    sys.exit(main())
