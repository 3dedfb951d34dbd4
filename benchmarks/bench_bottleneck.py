"""pytest-benchmark: ResNet-50 Bottlenecks, every stage (identity and downsampling), eval and train.

    pytest benchmarks/bench_bottleneck.py --benchmark-only      # time (a GPU if visible)
    pytest benchmarks --benchmark-disable                       # each case once, as CI does
"""
import pytest
from _common import DTYPES, ON_GPU, PROVIDERS, run_case
from shapes import BOTTLENECK_SHAPES, select

SHAPES = BOTTLENECK_SHAPES if ON_GPU else select(BOTTLENECK_SHAPES, ["C2048_H7", "C1024_H14_down"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.stage)
def test_bottleneck(benchmark, shape, mode, dtype, provider):
    run_case(benchmark, "bottleneck", shape, mode, dtype, provider)
