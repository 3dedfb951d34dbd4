"""resfuse.ops.bn_scale_act (and its registered flavours) against torch's ops (BN with given statistics * scale +
residual + ReLU), every backend here, forward and every gradient; an eval-mode nn.BatchNorm2d as well."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse, skip_triton_bf16_under_interpreter
from test_bn_act import make_input

CPU_BACKENDS = backends_on("cpu")
SHAPES = [(3, 5, 9, 11), (2, 3, 1, 1), (4, 16, 7, 7), (1, 7, 1, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
NAMES = ("x", "weight", "bias", "mean", "invstd", "scale", "residual")
# (statistics, affine, scale, residual, relu)
VARIANTS = [(True, True, True, True, True), (False, False, True, False, False), (True, False, False, True, True),
            (False, True, True, True, True), (True, True, True, False, False)]


def make_case(shape, layout, variant, dtype=torch.float32):
    stats, affine, with_scale, with_residual, relu = variant
    n, c = shape[:2]
    vec = dict(dtype=stats_dtype(dtype))
    return dict(
        x=make_input(shape, layout, dtype, seed=1) * 2 + 1,
        weight=(torch.rand(c, dtype=dtype) + 0.5) if affine else None,
        bias=randn(c, dtype=dtype, seed=2) if affine else None,
        mean=randn(c, seed=3, **vec) + 1 if stats else None,
        invstd=(torch.rand(c, **vec) + 0.4) if stats else None,
        scale=torch.rand(n, c, dtype=dtype) * 2 if with_scale else None,
        residual=make_input(shape, layout, dtype, seed=4) if with_residual else None,
        relu=relu)


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def eager(x, weight, bias, mean, invstd, scale, residual, relu):
    """torch's own ops, differentiable in every argument (F.batch_norm refuses a gradient for its running
    statistics, which here are the batch statistics bn_squeeze hands on): BN with the given statistics, then the
    factor, the shortcut and ReLU."""
    def channel(v):
        return v.view(1, -1, 1, 1)

    y = x
    if mean is not None:
        y = y - channel(mean)
    if invstd is not None:
        y = y * channel(invstd)
    if weight is not None or bias is not None:
        y = torch.addcmul(channel(bias) if bias is not None else torch.zeros_like(y), y,
                          channel(weight) if weight is not None else torch.ones_like(y))
    if scale is not None:
        y = y * scale[:, :, None, None]
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def leaves(case, dtype=None, requires_grad=True):
    return {k: (v.detach().to(dtype or v.dtype).clone().requires_grad_(requires_grad)
                if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(backend, layout, shape, variant):
    case = leaves(make_case(shape, layout, variant))
    ref = leaves(case, torch.float64)
    expected = eager(**ref)
    out = resfuse.ops.bn_scale_act(**case, backend=backend)
    assert out.dtype == case["x"].dtype and out.shape == case["x"].shape
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < 5e-6

    grad = randn(*shape, seed=9)
    out.backward(grad)
    expected.backward(grad.double())
    for name in NAMES:
        if case[name] is not None:
            assert case[name].grad is not None and case[name].grad.dtype == case[name].dtype, name
            torch.testing.assert_close(case[name].grad.double(), ref[name].grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_batchnorm_module(backend, layout):
    """An eval-mode nn.BatchNorm2d with randomized running statistics, times a gate, + shortcut, ReLU: the
    statistics given as (running_mean, rsqrt(running_var + eps)); output and the gradients of x, the BN's
    affine, the gate and the shortcut."""
    shape = (3, 5, 4, 6)
    bn = randomize_bn_(torch.nn.BatchNorm2d(5)).double().eval()
    x = make_input(shape, layout, torch.float64, seed=1).requires_grad_(True)
    r = make_input(shape, layout, torch.float64, seed=2).requires_grad_(True)
    gate = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    grad = randn(*shape, dtype=torch.float64, seed=9)
    expected = torch.relu(bn(x) * gate[:, :, None, None] + r)
    wanted = (x, r, gate, bn.weight, bn.bias)
    expected_grads = torch.autograd.grad(expected, wanted, grad)
    invstd = torch.rsqrt(bn.running_var + bn.eps)
    out = resfuse.ops.bn_scale_act(x, bn.weight, bn.bias, bn.running_mean, invstd, gate, r, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("x", "residual", "scale", "weight", "bias"), torch.autograd.grad(out, wanted, grad),
                          expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


# The backward op's output_mask, one differentiable argument at a time: each gradient must come out right when
# it is the only one asked for (the kernels skip the work of the others).
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("wanted", NAMES)
def test_one_gradient_at_a_time(backend, wanted):
    case = leaves(make_case((2, 4, 3, 5), "channels_last", VARIANTS[0]), requires_grad=False)
    case[wanted].requires_grad_(True)
    ref = leaves(case, torch.float64, requires_grad=False)
    ref[wanted].requires_grad_(True)
    grad = randn(2, 4, 3, 5, seed=9)
    (ours,) = torch.autograd.grad(resfuse.ops.bn_scale_act(**case, backend=backend), case[wanted], grad)
    (theirs,) = torch.autograd.grad(eager(**ref), ref[wanted], grad.double())
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(backend, dtype):
    skip_triton_bf16_under_interpreter(backend, dtype)
    case = make_case((4, 6, 5, 7), "channels_last", VARIANTS[0], dtype)
    exact = eager(**leaves(case, torch.float64, requires_grad=False))
    ours = resfuse.ops.bn_scale_act(**case, backend=backend)
    assert ours.dtype == dtype
    # torch's error: its ops with every argument in this dtype, as an fp16/bf16 model holds them
    theirs = eager(**{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact) + 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_gradcheck_float64(backend, variant):
    case = make_case((2, 3, 3, 2), "contiguous", variant, torch.float64)
    given = [k for k in NAMES if case[k] is not None]
    inputs = tuple(case[k].requires_grad_(True) for k in given)

    def fn(*tensors):
        return resfuse.ops.bn_scale_act(**{**case, **dict(zip(given, tensors))}, backend=backend)

    # fast mode (random projections: any wrong term still moves them) keeps the interpreted Triton runs short
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_create_graph_gradients_equal_the_kernels(backend, variant):
    """With create_graph=True the backward is the differentiable torch math (bn_scale_act.py); its first-order
    values must be the kernel's (gradgradcheck alone would accept a wrong formula that is consistent with
    its own derivative)."""
    case = make_case((2, 3, 3, 2), "channels_last", variant, torch.float64)
    given = [k for k in NAMES if case[k] is not None]
    inputs = [case[k].requires_grad_(True) for k in given]
    grad = randn(2, 3, 3, 2, dtype=torch.float64, seed=9)
    out = resfuse.ops.bn_scale_act(**case, backend=backend)
    plain = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    recorded = torch.autograd.grad(out, inputs, grad, create_graph=True)
    assert any(g.grad_fn is not None for g in recorded)  # grad_residual is the masked grad_out: a constant
    for name, a, b in zip(given, recorded, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    case = leaves(make_case((2, 4, 3, 3), "contiguous", VARIANTS[0]))
    case["x"] = torch.randn(0, 4, 3, 3, requires_grad=True)
    case["residual"] = torch.randn(0, 4, 3, 3, requires_grad=True)
    case["scale"] = torch.rand(0, 4, requires_grad=True)
    out = resfuse.ops.bn_scale_act(**case, backend=backend)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    for name in ("weight", "bias", "mean", "invstd"):
        assert torch.equal(case[name].grad, torch.zeros(4)), name


def test_scale_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"scale must have shape \[N, C\]"):
        resfuse.ops.bn_scale_act(torch.randn(2, 3, 4, 4), scale=torch.rand(2, 3, 1, 1))


def _flavours():
    names = ["bn_scale_act_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("bn_scale_act")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_opcheck(name, variant):
    case = leaves(make_case((2, 3, 4, 5), "channels_last", variant))
    args = [case[k] for k in NAMES] + [case["relu"]]
    op = getattr(torch.ops.resfuse, name).default
    torch.library.opcheck(op, tuple(args))
    backward = getattr(torch.ops.resfuse, "_bn_scale_act_backward" + name[len("bn_scale_act"):]).default
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*detached)
    mask = [t is not None for t in detached[:7]]
    torch.library.opcheck(backward, (randn(2, 3, 4, 5, seed=5), *detached[:6], out, case["relu"], mask))
