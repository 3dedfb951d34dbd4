"""NaN and Inf propagate through every kernel as through eager's ops: the same elements come out NaN or +-Inf,
forward and backward, and the finite ones agree. CPU here (the C++ kernels, the Triton kernels under the
interpreter, the reference); the same tests run on a GPU for the CUDA and Triton kernels."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, resfuse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases():
    for device in DEVICES:
        for backend in backends_on(device):
            marks = [pytest.mark.cuda] if device == "cuda" else []
            yield pytest.param(device, backend, id=f"{device}-{backend}", marks=marks)


def _poke(t, value, where):
    t = t.detach().clone()
    t[where] = value
    return t


def assert_same_special_values(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN positions differ"
    assert torch.equal(torch.isposinf(actual), torch.isposinf(expected)), "+Inf positions differ"
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "-Inf positions differ"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "residual"])
def test_bn_act(device, backend, value, where):
    shape = (2, 4, 3, 5)
    x = randn(*shape, device=device, seed=1)
    r = randn(*shape, device=device, seed=2)
    if where == "input":
        x = _poke(x, value, (1, 2, 0, 3))
    else:
        r = _poke(r, value, (0, 1, 2, 2))
    w = (torch.rand(4) + 0.5).to(device)
    b = randn(4, device=device, seed=3)
    grad = randn(*shape, device=device, seed=4)
    results = []
    for fn in (lambda *a: resfuse.ops.bn_act(*a, backend=backend),
               lambda x, w, b, r: torch.relu(F.batch_norm(x, None, None, w, b, True) + r)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, r)]
        out = fn(*leaves)
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves])
    for actual, expected in zip(*results):
        assert_same_special_values(actual, expected)


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "residual", "bias"])
def test_conv_bn_act(device, backend, value, where):
    x = randn(2, 4, 6, 6, device=device, seed=1)
    w = randn(5, 4, 3, 3, device=device, seed=2) * 0.2
    b = randn(5, device=device, seed=3)
    r = randn(2, 5, 6, 6, device=device, seed=4)
    if where == "input":
        x = _poke(x, value, (0, 1, 2, 3))
    elif where == "residual":
        r = _poke(r, value, (1, 3, 4, 0))
    else:
        b = _poke(b, value, 2)
    grad = randn(2, 5, 6, 6, device=device, seed=5)
    results = []
    for fn in (lambda x, w, b, r: resfuse.ops.conv_bn_act(x, w, b, r, padding=1, backend=backend),
               lambda x, w, b, r: torch.relu(F.conv2d(x, w, b, padding=1) + r)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, r)]
        out = fn(*leaves)
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves])
    for actual, expected in zip(*results):
        assert_same_special_values(actual, expected)


# ---------------------------------------------------------------------------------------------------------------
# Devices: a kernel runs on its tensors' device, whichever device is current.


def test_triton_launchers_run_on_the_tensors_device(monkeypatch):
    """On CPU: every public Triton launcher makes its first tensor's CUDA device current (a stand-in tensor
    says it is on cuda:1 while the current device is 0)."""
    pytest.importorskip("triton")
    from resfuse.triton_kernels import _device

    entered = []

    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: _Recorder(entered, d))
    assert _device.on_tensor_device(lambda t: "launched")(FakeCudaTensor()) == "launched"
    assert entered == [torch.device("cuda", 1)]
    from resfuse import triton_kernels

    for name in ("bn_act_fwd", "bn_act_bwd", "conv_bn_act_fwd", "conv_epilogue_bwd"):
        assert getattr(triton_kernels, name).__wrapped__ is not None, name  # wrapped by on_tensor_device


class _Recorder:
    def __init__(self, log, device):
        self.log, self.device = log, device

    def __enter__(self):
        self.log.append(self.device)

    def __exit__(self, *exc):
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ops_on_the_second_gpu_while_the_first_is_current(backend):
    torch.cuda.set_device(0)
    x = randn(4, 8, 6, 6, device="cuda:1", seed=1)
    w = randn(8, 8, 3, 3, device="cuda:1", seed=2) * 0.1
    out = resfuse.ops.bn_act(x, torch.ones(8, device="cuda:1"), None, backend=backend)
    torch.testing.assert_close(out, torch.relu(F.batch_norm(x, None, None, training=True)), rtol=1e-4, atol=1e-5)
    conv = resfuse.ops.conv_bn_act(x, w, None, None, padding=1, backend=backend)
    torch.testing.assert_close(conv, torch.relu(F.conv2d(x, w, padding=1)), rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["conv_bn_act_sm90", "conv_bn_act_igemm", "cudnn_fused"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_gpu_conv_kernels_propagate_special_values(kernel, value):
    """The one-launch eval convs on a GPU (bf16, channels_last, the shapes they take), forward: CUTLASS's Clamp
    epilogue must keep NaN (it is built with PropagateNaN) and +-Inf as torch.relu does."""
    from resfuse.ops import cudnn_fused

    cl = torch.channels_last
    x = _poke(randn(2, 16, 8, 8, device="cuda", seed=1), value, (0, 3, 4, 4)).to(torch.bfloat16).contiguous(
        memory_format=cl)
    w = (randn(16, 16, 3, 3, device="cuda", seed=2) * 0.1).to(torch.bfloat16).contiguous(memory_format=cl)
    b = randn(16, device="cuda", seed=3).to(torch.bfloat16)
    r = _poke(randn(2, 16, 8, 8, device="cuda", seed=4), value, (1, 5, 2, 2)).to(torch.bfloat16).contiguous(
        memory_format=cl)
    expected = torch.relu(F.conv2d(x, w, b, padding=1) + r)
    if kernel == "cudnn_fused":
        out = cudnn_fused.run(x, w, b, r, [1, 1], [1, 1], [1, 1], 1)
        if out is None:
            pytest.skip("cuDNN refused its fused convolution here")
    else:
        try:
            out = getattr(torch.ops.resfuse, kernel)(x, w, b, r, [1, 1], [1, 1], [1, 1], 1, True)
        except RuntimeError as exc:
            if "does not take this call" not in str(exc):
                raise
            pytest.skip(f"{kernel} cannot run here: {exc}")
    assert_same_special_values(out.float(), expected.float())
