"""pytest-benchmark: the fused ops against their eager equivalents, one activation per ResNet stage.

- ``conv_bn_act`` (eval): 3x3 conv + BN + residual + ReLU; resfuse and cuDNN run it with BN folded.
- ``bn_act`` (train, forward + backward): BatchNorm with batch statistics + residual + ReLU.

    pytest benchmarks/bench_ops.py --benchmark-only      # time (a GPU if visible)
    pytest benchmarks --benchmark-disable                 # each case once, as CI does
"""
import pytest
from _common import DTYPES, ON_GPU, PROVIDERS, run_case
from shapes import OP_SHAPES, select

from resfuse.bench.cases import BENCH_MODES

SHAPES = OP_SHAPES if ON_GPU else select(OP_SHAPES, ["C256_H14"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", BENCH_MODES["conv_bn_act"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.stage)
def test_conv_bn_act(benchmark, shape, mode, dtype, provider):
    run_case(benchmark, "conv_bn_act", shape, mode, dtype, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", BENCH_MODES["bn_act"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.stage)
def test_bn_act(benchmark, shape, mode, dtype, provider):
    run_case(benchmark, "bn_act", shape, mode, dtype, provider)
