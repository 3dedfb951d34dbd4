"""pytest-benchmark: whole torchvision ResNets (resfuse.convert on the resfuse providers).

eval: one no-grad forward; train: one step (forward, cross-entropy, backward, SGD step). images/s = batch /
time. GPU: B=256 at 224x224; CPU: B=2 at 64x64.

    pytest benchmarks/bench_models.py --benchmark-only       # time (a GPU if visible)
    pytest benchmarks --benchmark-disable                    # each case once, as CI does
"""
import pytest
from _common import DTYPES, MODEL_BATCH, PROVIDERS, run_case
from shapes import MODELS


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("model", MODELS)
def test_model(benchmark, model, mode, dtype, provider):
    run_case(benchmark, "model", model, mode, dtype, provider, batch=MODEL_BATCH)
