"""Backend choice: argument, RESFUSE_BACKEND, auto; unavailable backends are errors, not silent fallbacks."""
import os
import subprocess
import sys

import pytest
import torch

from _helpers import backends_on, randn, resfuse
from resfuse.ops import backend as backend_mod


def test_auto_on_cpu_prefers_the_extension_and_never_the_interpreter():
    expected = "cuda" if resfuse._loader.extension is not None else "reference"
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == expected
    assert backend_mod.resolve_backend(None, torch.device("cpu")) in ("cuda", "reference")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", "reference")
    assert backend_mod.resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("RESFUSE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown resfuse backend 'nonsense'"):
        backend_mod.resolve_backend(None, torch.device("cpu"))
    # an explicit argument wins over the environment
    assert backend_mod.resolve_backend("reference", torch.device("cpu")) == "reference"


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match="expected one of auto, cuda, triton, reference"):
        resfuse.ops.bn_act(randn(2, 3, 2, 2), backend="cudnn")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable for cpu tensors"):
        resfuse.ops.bn_act(randn(2, 3, 2, 2), backend="triton")


def test_cuda_backend_without_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(resfuse._loader, "extension", None)
    monkeypatch.setattr(resfuse._loader, "extension_error", "not built")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable .* not built"):
        resfuse.ops.bn_act(randn(2, 3, 2, 2), backend="cuda")
    assert "cuda" not in resfuse.available_backends("cpu")


def test_available_backends_lists_reference():
    assert "reference" in resfuse.available_backends("cpu")
    assert backends_on("cpu")[-1] == "reference"


@pytest.mark.cuda
def test_auto_on_gpu_prefers_cuda_then_triton():
    """The order measured faster on an H100 (resfuse/ops/backend.py)."""
    gpu = torch.device("cuda")
    expected = "cuda" if backend_mod.unavailable_reason("cuda", gpu) is None else "triton"
    assert backend_mod.resolve_backend("auto", gpu) == expected


def test_import_without_extension_or_triton():
    """resfuse imports and runs (reference backend) when neither resfuse._C nor triton can be imported."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['resfuse._C'] = None\n"
        "import torch, resfuse\n"
        "assert resfuse.available_backends('cpu') == ['reference'], resfuse.available_backends('cpu')\n"
        "assert 'not built' in resfuse._loader.extension_error, resfuse._loader.extension_error\n"
        "block = resfuse.BasicBlock(4, 4)\n"
        "block(torch.randn(2, 4, 3, 3)).sum().backward()\n"
        "try:\n"
        "    resfuse.BasicBlock(4, 4, backend='cuda')(torch.randn(2, 4, 3, 3))\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('asking for an unavailable backend must fail')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RESFUSE_BACKEND",)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
