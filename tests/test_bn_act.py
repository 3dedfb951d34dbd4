"""resfuse.ops.bn_act (and its registered flavours) against nn.BatchNorm2d / F.batch_norm, every backend."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, rel_err, resfuse

CPU_BACKENDS = backends_on("cpu")
SHAPES = [(3, 5, 9, 11), (2, 3, 1, 1), (4, 16, 7, 7), (1, 7, 1, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# (affine, residual, relu, running stats)
VARIANTS = [(True, True, True, True), (False, False, False, False), (True, False, True, False),
            (False, True, False, True)]


def make_input(shape, layout, dtype=torch.float32, seed=0):
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        n, c, h, w = shape
        return randn(n, c, h, 2 * w, dtype=dtype, seed=seed)[..., ::2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return randn(*shape, dtype=dtype, seed=seed, memory_format=fmt)


def reference(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    """F.batch_norm in float64, the eager truth (running stats updated on float64 copies)."""
    rm = running_mean.double().clone() if running_mean is not None else None
    rv = running_var.double().clone() if running_var is not None else None
    y = F.batch_norm(x.double(), rm, rv, None if weight is None else weight.double(),
                     None if bias is None else bias.double(), True, momentum, eps)
    if residual is not None:
        y = y + residual.double()
    return (torch.relu(y) if relu else y), rm, rv


def make_case(shape, layout, variant, dtype=torch.float32, requires_grad=False):
    affine, with_residual, relu, with_running = variant
    c = shape[1]
    x = make_input(shape, layout, dtype, seed=1)
    weight = (torch.rand(c, dtype=dtype) + 0.5) if affine else None
    bias = randn(c, dtype=dtype, seed=2) if affine else None
    residual = make_input(shape, layout, dtype, seed=3) if with_residual else None
    rm = randn(c, seed=4) * 0.1 if with_running else None
    rv = torch.rand(c) + 0.5 if with_running else None
    if requires_grad:
        for t in (x, weight, bias, residual):
            if t is not None:
                t.requires_grad_(True)
    return dict(x=x, weight=weight, bias=bias, residual=residual, running_mean=rm, running_var=rv,
                momentum=0.1, eps=1e-5, relu=relu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_running_stats(backend, layout, shape, variant):
    case = make_case(shape, layout, variant, requires_grad=True)
    ref_inputs = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                  for k, v in case.items()}
    expected, rm, rv = reference(**ref_inputs)
    out = resfuse.ops.bn_act(**case, backend=backend)

    assert out.dtype == case["x"].dtype and out.shape == case["x"].shape
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < 5e-6
    if rm is not None:
        torch.testing.assert_close(case["running_mean"].double(), rm, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(case["running_var"].double(), rv, rtol=1e-6, atol=1e-7)

    grad = randn(*shape, seed=9)
    out.backward(grad)
    expected.backward(grad.double())
    for name in ("x", "weight", "bias", "residual"):
        if case[name] is not None:
            assert case[name].grad is not None, name
            # elementwise: with few values per channel dx is a small difference of O(1) terms
            torch.testing.assert_close(case[name].grad.double(), ref_inputs[name].grad.double(), rtol=1e-4, atol=1e-5)


# Which of (x, weight, bias, residual) are given and which require grad: the autograd kernels map each given
# tensor to its gradient, whatever is left out before it (the C++ one counts only the tensors given).
GRAD_PATTERNS = [
    dict(weight=None, bias=True, residual=True, needs=("bias", "residual")),
    dict(weight=True, bias=None, residual=True, needs=("x", "residual")),
    dict(weight=None, bias=None, residual=True, needs=("residual",)),
    dict(weight=True, bias=True, residual=None, needs=("weight",)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pattern", GRAD_PATTERNS, ids=lambda p: "needs_" + "_".join(p["needs"]))
def test_gradients_of_partial_inputs(backend, pattern):
    shape, c = (2, 4, 3, 5), 4
    given = dict(x=randn(*shape, seed=1), weight=torch.rand(c) + 0.5 if pattern["weight"] else None,
                 bias=randn(c, seed=2) if pattern["bias"] else None,
                 residual=randn(*shape, seed=3) if pattern["residual"] else None)
    for name in pattern["needs"]:
        given[name].requires_grad_(True)
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in given.items()}
    out = resfuse.ops.bn_act(**given, relu=True, backend=backend)
    expected = reference(**ref, running_mean=None, running_var=None, momentum=0.1, eps=1e-5, relu=True)[0]
    grad = randn(*shape, seed=9)
    wanted = [given[n] for n in pattern["needs"]]
    ours = torch.autograd.grad(out, wanted, grad)
    theirs = torch.autograd.grad(expected, [ref[n] for n in pattern["needs"]], grad.double())
    for name, a, e in zip(pattern["needs"], ours, theirs):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(backend, dtype):
    """Flash-attention's rule: our error against fp64 is at most 2x PyTorch's own error at this dtype."""
    case = make_case((4, 6, 5, 7), "channels_last", VARIANTS[0], dtype=dtype)
    exact, _, _ = reference(**case)
    ours = resfuse.ops.bn_act(**{**case, "running_mean": None, "running_var": None}, backend=backend)
    torch_out = F.batch_norm(case["x"], None, None, case["weight"], case["bias"], True, 0.1, 1e-5)
    torch_out = torch.relu(torch_out + case["residual"])
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= 2 * rel_err(torch_out, exact) + 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    case = make_case((2, 2, 3, 3), "contiguous", (True, True, True, False), dtype=torch.float64,
                     requires_grad=True)

    def fn(x, weight, bias, residual):
        return resfuse.ops.bn_act(x, weight, bias, residual, None, None, 0.1, 1e-5, True, backend=backend)

    assert torch.autograd.gradcheck(fn, (case["x"], case["weight"], case["bias"], case["residual"]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_running_stats_bump_version_counter(backend):
    case = make_case((2, 4, 3, 3), "contiguous", VARIANTS[0])
    before = case["running_mean"]._version, case["running_var"]._version
    resfuse.ops.bn_act(**case, backend=backend)
    assert case["running_mean"]._version > before[0] and case["running_var"]._version > before[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    """As nn.BatchNorm2d: an empty output, the running statistics untouched, zero parameter gradients."""
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    weight, bias = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    before = running_mean.clone(), running_var.clone()
    out = resfuse.ops.bn_act(x, weight, bias, None, running_mean, running_var, backend=backend)
    assert out.shape == x.shape
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(4)) and torch.equal(bias.grad, torch.zeros(4))
    assert x.grad.shape == x.shape


def test_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        resfuse.ops.bn_act(torch.randn(1, 3, 1, 1), running_mean=torch.zeros(3), running_var=torch.ones(3))


def _flavours():
    names = ["bn_act_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("bn_act")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_opcheck(name, variant):
    case = make_case((2, 3, 4, 5), "channels_last", variant, requires_grad=True)
    op = getattr(torch.ops.resfuse, name).default
    args = (case["x"], case["weight"], case["bias"], case["residual"], case["running_mean"],
            case["running_var"], 0.1, 1e-5, case["relu"])
    torch.library.opcheck(op, args)
    backward = getattr(torch.ops.resfuse, "_bn_act_backward" + name[len("bn_act"):]).default
    out, mean, invstd = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    mask = [True, case["weight"] is not None, case["bias"] is not None, case["residual"] is not None]
    torch.library.opcheck(backward, (randn(2, 3, 4, 5, seed=5), case["x"].detach(),
                                     None if case["weight"] is None else case["weight"].detach(),
                                     out, mean, invstd, case["relu"], mask))
