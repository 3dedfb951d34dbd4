"""resfuse.ops.bn_squeeze (and its registered flavours) against eager BatchNorm statistics, every backend here."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, rel_err, resfuse, skip_triton_bf16_under_interpreter
from test_bn_act import make_input

CPU_BACKENDS = backends_on("cpu")
SHAPES = [(3, 5, 9, 11), (2, 3, 1, 1), (4, 16, 7, 7), (1, 7, 1, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Which outputs the loss reads: a gradient that does not come back must count as zero.
USES = [("squeeze", "mean", "invstd"), ("squeeze",), ("mean", "invstd"), ("invstd",)]


def eager(x, running_mean, running_var, momentum=0.1, eps=1e-5, dtype=torch.float64):
    """The truth in float64 from torch's own ops: F.batch_norm's normalised output averaged over (H, W), and
    the batch statistics written out (running stats updated on copies); ``dtype``: torch's own at another."""
    xd = x.to(dtype)
    rm = None if running_mean is None else running_mean.to(dtype, copy=True)
    rv = None if running_var is None else running_var.to(dtype, copy=True)
    normalised = F.batch_norm(xd, rm, rv, None, None, True, momentum, eps)
    mean = xd.mean((0, 2, 3))
    invstd = torch.rsqrt(xd.var((0, 2, 3), unbiased=False) + eps)
    return (normalised.mean((2, 3)), mean, invstd), rm, rv


def loss_of(outputs, uses, seed=7):
    """A random linear functional of the outputs named in ``uses``."""
    total = 0
    for k, name in enumerate(("squeeze", "mean", "invstd")):
        if name in uses:
            total = total + (outputs[k].double() * randn(*outputs[k].shape, dtype=torch.float64,
                                                         seed=seed + k)).sum()
    return total


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("uses", USES, ids="+".join)
def test_forward_backward_running_stats(backend, layout, shape, uses):
    c = shape[1]
    x = (make_input(shape, layout, seed=1) * 3 + 2).requires_grad_(True)  # |mean| > std: no cancellation
    running_mean, running_var = randn(c, seed=4) * 0.1, torch.rand(c) + 0.5
    x_ref = x.detach().double().requires_grad_(True)
    expected, rm, rv = eager(x_ref, running_mean, running_var)

    outputs = resfuse.ops.bn_squeeze(x, running_mean, running_var, backend=backend)
    assert [o.shape for o in outputs] == [(shape[0], c), (c,), (c,)]
    assert all(o.dtype == torch.float32 for o in outputs)
    for name, a, e in zip(("squeeze", "mean", "invstd"), outputs, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(running_mean.double(), rm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(running_var.double(), rv, rtol=1e-6, atol=1e-7)

    (grad,) = torch.autograd.grad(loss_of(outputs, uses), x)
    (grad_ref,) = torch.autograd.grad(loss_of(expected, uses), x_ref)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    if layout == "channels_last" and shape[2] * shape[3] > 1 and backend != "reference":
        assert grad.is_contiguous(memory_format=torch.channels_last)
    # Where the true gradient cancels to ~0 (N=1: the squeeze is 0 whatever x; N=2, P=1: it is +-1), fp32
    # leaves a residue of the size of its terms; torch's own fp32 ops leave one too: allow twice theirs.
    x32 = x.detach().clone().requires_grad_(True)
    (grad_torch,) = torch.autograd.grad(loss_of(eager(x32, None, None, dtype=torch.float32)[0], uses), x32)
    atol = 1e-6 + 2 * float((grad_torch.double() - grad_ref).abs().max())
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("uses", USES, ids="+".join)
def test_gradcheck_float64(backend, uses):
    x = (randn(2, 3, 3, 2, dtype=torch.float64, seed=1) * 2 + 1).requires_grad_(True)

    def fn(x):
        outputs = resfuse.ops.bn_squeeze(x, backend=backend)
        return tuple(o for name, o in zip(("squeeze", "mean", "invstd"), outputs) if name in uses)

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)  # random projections: short Triton runs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradgradcheck_float64(backend):
    x = (randn(2, 3, 3, 2, dtype=torch.float64, seed=1) * 2 + 1).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: resfuse.ops.bn_squeeze(x, backend=backend), (x,), fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_create_graph_gradient_equals_the_kernels(backend):
    """With create_graph=True the backward is the differentiable torch math (bn_squeeze.py); its first-order
    value must be the kernel's (gradgradcheck alone would accept a wrong formula that is consistent with its
    own derivative)."""
    x = (randn(3, 4, 3, 2, dtype=torch.float64, seed=1) * 2 + 1).requires_grad_(True)
    outputs = resfuse.ops.bn_squeeze(x, backend=backend)
    grads = [randn(*o.shape, dtype=torch.float64, seed=5 + k) for k, o in enumerate(outputs)]
    (plain,) = torch.autograd.grad(outputs, x, grads, retain_graph=True)
    (recorded,) = torch.autograd.grad(outputs, x, grads, create_graph=True)
    assert recorded.grad_fn is not None
    torch.testing.assert_close(recorded, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(backend, dtype):
    """Flash-attention's rule: our error against fp64 at most 2x PyTorch's own at this dtype (its squeeze is
    the mean of F.batch_norm's output in that dtype, as an eager SE block computes it)."""
    skip_triton_bf16_under_interpreter(backend, dtype)
    x = make_input((4, 6, 5, 7), "channels_last", dtype, seed=1) * 2 + 1
    exact = eager(x, None, None)[0][0]
    ours = resfuse.ops.bn_squeeze(x, backend=backend)[0]
    theirs = F.batch_norm(x, None, None, None, None, True).mean((2, 3))
    assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact) + 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_running_stats_bump_version_counter(backend):
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    before = running_mean._version, running_var._version
    resfuse.ops.bn_squeeze(randn(2, 4, 3, 3), running_mean, running_var, backend=backend)
    assert running_mean._version > before[0] and running_var._version > before[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    """As bn_act: zeros for the statistics, the running statistics untouched, a zero gradient."""
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    before = running_mean.clone(), running_var.clone()
    squeeze, mean, invstd = resfuse.ops.bn_squeeze(x, running_mean, running_var, backend=backend)
    assert squeeze.shape == (0, 4) and torch.equal(mean, torch.zeros(4)) and torch.equal(invstd, torch.zeros(4))
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    (mean.sum() + invstd.sum()).backward()
    assert x.grad.shape == x.shape


def test_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        resfuse.ops.bn_squeeze(torch.randn(1, 3, 1, 1))


def _flavours():
    names = ["bn_squeeze_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("bn_squeeze")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("running", [True, False], ids=["running", "no_running"])
def test_opcheck(name, running):
    x = make_input((2, 3, 4, 5), "channels_last", seed=1).requires_grad_(True)
    stats = (torch.zeros(3), torch.ones(3)) if running else (None, None)
    op = getattr(torch.ops.resfuse, name).default
    torch.library.opcheck(op, (x, *stats, 0.1, 1e-5))
    backward = getattr(torch.ops.resfuse, "_bn_squeeze_backward" + name[len("bn_squeeze"):]).default
    squeeze, mean, invstd = op(x.detach(), None, None, 0.1, 1e-5)
    for grads in [(randn(2, 3, seed=5), randn(3, seed=6), randn(3, seed=7)), (randn(2, 3, seed=5), None, None),
                  (None, randn(3, seed=6), None)]:
        torch.library.opcheck(backward, (*grads, x.detach(), mean, invstd, squeeze))
