"""pytest-benchmark: an identity BasicBlock per ResNet-18 stage, eager vs each fused resfuse backend.

    pytest benchmarks --benchmark-only            # time (a GPU if visible, else small CPU shapes)
    pytest benchmarks --benchmark-disable         # run each case once, as CI does, so the file cannot rot
"""
import copy

import pytest
import torch

import resfuse
from resfuse import reference
from resfuse.bench import STAGES

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCH = 128 if ON_GPU else 2
# the Triton interpreter is a test vehicle: never benchmarked
PROVIDERS = ["eager"] + [f"resfuse_{b}" for b in resfuse.available_backends(DEVICE)
                         if b != "reference" and (ON_GPU or b != "triton")]


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stage", STAGES if ON_GPU else STAGES[2:], ids=lambda s: f"C{s[0]}_H{s[1]}")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_basicblock(benchmark, provider, stage, mode):
    channels, size = stage
    torch.manual_seed(0)
    block = reference.BasicBlock(channels, channels).to(DEVICE, DTYPE, memory_format=torch.channels_last)
    if provider != "eager":
        block = resfuse.convert(copy.deepcopy(block), backend=provider[len("resfuse_"):])
    block.train(mode == "train")
    x = torch.randn(BATCH, channels, size, size, device=DEVICE, dtype=DTYPE)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(mode == "train")

    def step():
        if mode == "train":
            block(x).sum().backward()
        else:
            with torch.no_grad():
                block(x)
        _sync()

    benchmark(step)
