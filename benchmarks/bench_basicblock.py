"""pytest-benchmark: ResNet-18/34 BasicBlocks, every stage (identity and downsampling), eval and train.

    pytest benchmarks/bench_basicblock.py --benchmark-only          # time (a GPU if visible)
    pytest benchmarks/bench_basicblock.py --benchmark-only -k "C64_H56-"   # one stage
    pytest benchmarks --benchmark-disable                           # each case once, as CI does
"""
import pytest
from _common import DTYPES, ON_GPU, PROVIDERS, run_case
from shapes import BASICBLOCK_SHAPES, select

SHAPES = BASICBLOCK_SHAPES if ON_GPU else select(BASICBLOCK_SHAPES, ["C512_H7", "C256_H14_down"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.stage)
def test_basicblock(benchmark, shape, mode, dtype, provider):
    run_case(benchmark, "basicblock", shape, mode, dtype, provider)
