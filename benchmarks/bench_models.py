"""pytest-benchmark: whole torchvision ResNets and timm's resnet50d (resfuse.convert on the resfuse providers).

eval: one no-grad forward; train: one step (forward, cross-entropy, backward, SGD step). images/s = batch /
time. GPU: B=256 at 224x224; CPU: B=2 at 64x64. timm models are built with random weights (nothing is
downloaded); a resfuse provider on one runs what resfuse.convert() fuses in it, and is skipped with the reason
where that is nothing.

    pytest benchmarks/bench_models.py --benchmark-only       # time (a GPU if visible)
    pytest benchmarks --benchmark-disable                    # each case once, as CI does
"""
import importlib.util

import pytest
from _common import DTYPES, MODEL_BATCH, PROVIDERS, run_case
from shapes import MODELS

TIMM_MODELS = ["timm:resnet50d"] if importlib.util.find_spec("timm") is not None else []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("model", list(MODELS) + TIMM_MODELS)
def test_model(benchmark, model, mode, dtype, provider):
    run_case(benchmark, "model", model, mode, dtype, provider, batch=MODEL_BATCH)
