"""Backend choice: argument, RESFUSE_BACKEND, auto; unavailable backends are errors, not silent fallbacks."""
import os
import subprocess
import sys

import pytest
import torch

from _helpers import backends_on, randn, resfuse
from resfuse.ops import backend as backend_mod


@pytest.mark.skipif(resfuse._loader.extension is None, reason="the resfuse._C extension is not built")
def test_auto_on_cpu_takes_the_extension(monkeypatch):
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == "cuda"
    assert backend_mod.resolve_backend(None, torch.device("cpu")) == "cuda"


def test_auto_on_cpu_without_the_extension_never_takes_the_interpreter(monkeypatch):
    """Triton's interpreter is a test vehicle: auto on CPU tensors is the reference when the extension is
    missing, even while the interpreter is on (as in these tests)."""
    monkeypatch.setattr(resfuse._loader, "extension", None)
    if resfuse._loader.triton_kernels is not None:
        monkeypatch.setattr(resfuse._loader.triton_kernels, "INTERPRETING", True)
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == "reference"


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
    if resfuse._loader.triton_kernels is not None:
        monkeypatch.setattr(resfuse._loader.triton_kernels, "INTERPRETING", False)
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
def test_auto_on_gpu_prefers_cuda_then_triton(monkeypatch):
    """The order measured faster on an H100 (resfuse/ops/backend.py), where nothing is measured."""
    gpu = torch.device("cuda")
    if resfuse._loader.extension_has_cuda():
        assert backend_mod.resolve_backend("auto", gpu) == "cuda"
    monkeypatch.setattr(resfuse._loader, "extension", None)
    assert backend_mod.resolve_backend("auto", gpu) == ("triton" if resfuse._loader.triton_kernels else "reference")


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
    _run_script(code, block_extension=False)


def _triton_flavours_grads_code(device: str) -> str:
    """A script checking that the Triton flavours' gradients match the reference and printing their nodes."""
    return (
        "import torch, resfuse\n"
        "def grads(backend):\n"
        "    torch.manual_seed(0)\n"
        f"    kw = dict(device={device!r})\n"
        "    x = torch.randn(2, 4, 3, 3, **kw, requires_grad=True)\n"
        "    w, b = torch.randn(4, **kw, requires_grad=True), torch.randn(4, **kw, requires_grad=True)\n"
        "    r = torch.randn(2, 4, 3, 3, **kw, requires_grad=True)\n"
        "    out = resfuse.ops.bn_act(x, w, b, r, torch.zeros(4, **kw), torch.ones(4, **kw), backend=backend)\n"
        "    out.backward(torch.randn_like(out))\n"
        "    conv = resfuse.ops.conv_bn_act(x, torch.randn(5, 4, 3, 3, **kw, requires_grad=True), None, None, 1, 1,\n"
        "                                   backend=backend)\n"
        "    conv.backward(torch.randn_like(conv))\n"
        "    return [t.grad for t in (x, w, b, r)], (out.grad_fn.name(), conv.grad_fn.name())\n"
        "(actual, nodes), (expected, _) = grads('triton'), grads('reference')\n"
        "for a, e in zip(actual, expected):\n"
        "    assert a is not None and torch.allclose(a, e, rtol=1e-4, atol=1e-5), (a, e)\n"
        "print(*nodes, sep='\\n')\n"
    )


def _run_script(code: str, block_extension: bool) -> list[str]:
    """Runs code in a fresh interpreter (RESFUSE_BACKEND unset; resfuse._C made unimportable when
    block_extension) and returns its stdout lines; fails with its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("RESFUSE_BACKEND",)}
    if block_extension:
        code = "import sys; sys.modules['resfuse._C'] = None\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.triton
def test_triton_flavours_autograd_without_extension():
    """Without resfuse._C the Triton flavours' autograd kernels are Python ones (autograd.Function nodes), with
    the reference's gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter, set by conftest.py
    nodes = _run_script(_triton_flavours_grads_code(device), block_extension=True)
    assert len(nodes) == 2 and not any("CppNode" in n for n in nodes), nodes


@pytest.mark.triton
@pytest.mark.skipif(resfuse._loader.extension is None, reason="the resfuse._C extension is not built")
def test_triton_flavours_autograd_is_cpp_with_extension():
    """With the extension the Triton flavours' autograd is C++ too (csrc/*_autograd.cpp): a C++ node, not a
    Python autograd.Function, per op of a training step, with the same gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nodes = _run_script(_triton_flavours_grads_code(device), block_extension=False)
    assert "BnActFunction<" in nodes[0] and "TritonKernels" in nodes[0], nodes
    assert "ConvBnActFunction<" in nodes[1] and "TritonConv" in nodes[1], nodes
