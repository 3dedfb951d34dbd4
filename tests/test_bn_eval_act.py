"""resfuse.ops.bn_eval_act (and its registered flavours) against nn.BatchNorm2d in eval mode (+ add + ReLU) and
resfuse.reference, on every backend here: outputs, every gradient, second derivatives, untouched running
statistics, NaN/Inf, empty batches, opcheck, torch.compile. GPU stage shapes are marked ``cuda``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from _helpers import backends_on, randn, rel_err, resfuse
from resfuse.reference import bn_eval_act_ref

CPU_BACKENDS = backends_on("cpu")
SHAPES = [(3, 5, 9, 11), (1, 3, 1, 1), (2, 16, 4, 6)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# (affine, residual, relu)
VARIANTS = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
EPS = 1e-5


def make_input(shape, layout, dtype=torch.float32, seed=0, device="cpu"):
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        n, c, h, w = shape
        return randn(n, c, h, 2 * w, dtype=dtype, seed=seed, device=device)[..., ::2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return randn(*shape, dtype=dtype, seed=seed, memory_format=fmt, device=device)


def make_case(shape, layout, variant, dtype=torch.float32, param_dtype=None, device="cpu", requires_grad=False):
    """Inputs of one call; running statistics far from (0, 1) so that normalising by them is exercised."""
    affine, with_residual, relu = variant
    c = shape[1]
    param_dtype = dtype if param_dtype is None else param_dtype
    g = torch.Generator().manual_seed(4)
    case = dict(
        x=make_input(shape, layout, dtype, seed=1, device=device),
        weight=(torch.rand(c, generator=g) + 0.5).to(device, param_dtype) if affine else None,
        bias=randn(c, dtype=param_dtype, seed=2, device=device) if affine else None,
        residual=make_input(shape, layout, dtype, seed=3, device=device) if with_residual else None,
        running_mean=(torch.randn(c, generator=g) * 0.5).to(device, param_dtype),
        running_var=(torch.rand(c, generator=g) * 2 + 0.25).to(device, param_dtype),
        eps=EPS, relu=relu)
    if requires_grad:
        for name in ("x", "weight", "bias", "residual"):
            if case[name] is not None:
                case[name].requires_grad_(True)
    return case


def eager(case, dtype=torch.float64):
    """nn.BatchNorm2d in eval mode (+ residual, + ReLU) at ``dtype`` (None: the case's own dtypes), on leaf
    copies of the inputs."""
    def leaf(t):
        return t.detach().clone() if dtype is None else t.detach().to(dtype)

    leaves = {k: (leaf(v).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in case.items()}
    x = leaves["x"]
    if (case["weight"] is None) == (case["bias"] is None):
        bn = nn.BatchNorm2d(x.shape[1], eps=case["eps"], affine=case["weight"] is not None)
        bn = bn.to(x.device, leaves["running_mean"].dtype).eval()
        with torch.no_grad():
            bn.running_mean.copy_(leaves["running_mean"])
            bn.running_var.copy_(leaves["running_var"])
        if case["weight"] is not None:  # the leaves themselves, so their .grad is eager's
            bn.weight, bn.bias = nn.Parameter(leaves["weight"]), nn.Parameter(leaves["bias"])
            leaves["weight"], leaves["bias"] = bn.weight, bn.bias
        y = bn(x)
    else:  # what nn.BatchNorm2d cannot hold (a bias without a weight): the function its eval forward calls
        y = F.batch_norm(x, leaves["running_mean"], leaves["running_var"], leaves["weight"], leaves["bias"],
                         False, 0.0, case["eps"])
    if leaves["residual"] is not None:
        y = y + leaves["residual"]
    return (torch.relu(y) if case["relu"] else y), leaves


def call(case, backend):
    return resfuse.ops.bn_eval_act(case["x"], case["weight"], case["bias"], case["residual"], case["running_mean"],
                                   case["running_var"], case["eps"], case["relu"], backend=backend)


GRAD_NAMES = ("x", "weight", "bias", "residual")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_eval_batchnorm2d(backend, layout, shape, variant):
    """fp32 against nn.BatchNorm2d's eval forward + add + ReLU in float64: output, layout, every gradient."""
    case = make_case(shape, layout, variant, requires_grad=True)
    stats_before = case["running_mean"].clone(), case["running_var"].clone()
    expected, leaves = eager(case)
    out = call(case, backend)

    assert out.dtype == case["x"].dtype and out.shape == case["x"].shape
    fmt = resfuse.layout.memory_format_of(case["x"])
    assert out.is_contiguous(memory_format=fmt)
    assert rel_err(out, expected) < 2e-6
    # eval mode: the running statistics are read, never written
    assert torch.equal(case["running_mean"], stats_before[0]) and torch.equal(case["running_var"], stats_before[1])

    grad = make_input(shape, layout, seed=9)
    out.backward(grad)
    expected.backward(grad.double())
    for name in GRAD_NAMES:
        if case[name] is not None:
            assert case[name].grad is not None, name
            torch.testing.assert_close(case[name].grad.double(), leaves[name].grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_matches_reference(backend, variant):
    """float64 against resfuse.reference.bn_eval_act_ref, the truth, at float64's own tolerance."""
    case = make_case((2, 6, 5, 3), "channels_last", variant, dtype=torch.float64, requires_grad=True)
    out = call(case, backend)
    ref_case = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                for k, v in case.items()}
    expected = bn_eval_act_ref(ref_case["x"], ref_case["weight"], ref_case["bias"], ref_case["residual"],
                               ref_case["running_mean"], ref_case["running_var"], EPS, ref_case["relu"])
    torch.testing.assert_close(out, expected)
    grad = randn(2, 6, 5, 3, dtype=torch.float64, seed=9)
    wanted = [n for n in GRAD_NAMES if case[n] is not None]
    ours = torch.autograd.grad(out, [case[n] for n in wanted], grad)
    theirs = torch.autograd.grad(expected, [ref_case[n] for n in wanted], grad)
    for name, a, e in zip(wanted, ours, theirs):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")


# Which of (x, weight, bias, residual) are given and which require grad: the autograd kernels map each given
# tensor to its gradient, whatever is left out before it (the C++ one counts only the tensors given).
GRAD_PATTERNS = [
    dict(weight=None, bias=True, residual=True, needs=("bias", "residual")),
    dict(weight=True, bias=None, residual=True, needs=("x", "residual")),
    dict(weight=None, bias=None, residual=True, needs=("residual",)),
    dict(weight=True, bias=True, residual=None, needs=("weight",)),
    dict(weight=True, bias=True, residual=True, needs=("bias",)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pattern", GRAD_PATTERNS, ids=lambda p: "needs_" + "_".join(p["needs"]))
def test_gradients_of_partial_inputs(backend, pattern):
    shape, c = (2, 4, 3, 5), 4
    case = make_case(shape, "contiguous", (True, True, True))
    for name in ("weight", "bias", "residual"):
        if pattern[name] is None:
            case[name] = None
    for name in pattern["needs"]:
        case[name].requires_grad_(True)
    out = call(case, backend)
    expected, leaves = eager(case)
    grad = randn(*shape, seed=9)
    ours = torch.autograd.grad(out, [case[n] for n in pattern["needs"]], grad)
    theirs = torch.autograd.grad(expected, [leaves[n] for n in pattern["needs"]], grad.double())
    for name, a, e in zip(pattern["needs"], ours, theirs):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", ["same", "float32"])
def test_half_precision_within_twice_torch_error(backend, dtype, params):
    """Flash-attention's rule, output and every gradient: our error against fp64 is at most 2x PyTorch's own
    error at this dtype, plus a small floor. Parameters and statistics in the activation dtype or fp32."""
    param_dtype = dtype if params == "same" else torch.float32
    case = make_case((4, 6, 5, 7), "channels_last", VARIANTS[0], dtype=dtype, param_dtype=param_dtype,
                     requires_grad=True)
    exact, exact_leaves = eager(case)
    torch_out, torch_leaves = eager(case, dtype=None)  # nn.BatchNorm2d at the case's own dtypes
    ours = call(case, backend)
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= 2 * rel_err(torch_out, exact) + 1e-4
    grad = randn(4, 6, 5, 7, dtype=dtype, seed=9, memory_format=torch.channels_last)
    for out, leaves in ((ours, case), (exact, exact_leaves), (torch_out, torch_leaves)):
        out.backward(grad.to(out.dtype))
    for name in GRAD_NAMES:
        ours_grad, exact_grad, torch_grad = case[name].grad, exact_leaves[name].grad, torch_leaves[name].grad
        assert ours_grad.dtype == case[name].dtype, name
        assert rel_err(ours_grad, exact_grad) <= 2 * rel_err(torch_grad, exact_grad) + 1e-4, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck_and_gradgradcheck_float64(backend, relu):
    """First and second derivatives in float64 (values kept off the ReLU kink by the generous bias)."""
    case = make_case((2, 3, 3, 2), "contiguous", (True, True, relu), dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias, residual):
        return resfuse.ops.bn_eval_act(x, weight, bias, residual, case["running_mean"], case["running_var"], EPS,
                                       relu, backend=backend)

    inputs = tuple(case[n] for n in GRAD_NAMES)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
def test_create_graph_gradients_and_penalty_match_eager(backend, relu):
    """create_graph=True runs the differentiable backward (gradgradcheck only checks it against itself): its
    first-order gradients, and the gradients of a penalty on them, are eager's."""
    case = make_case((2, 3, 4, 3), "channels_last", (True, True, relu), dtype=torch.float64, requires_grad=True)
    out = call(case, backend)
    expected, leaves = eager(case)
    grad = randn(2, 3, 4, 3, dtype=torch.float64, seed=9)
    ours = torch.autograd.grad(out, [case[n] for n in GRAD_NAMES], grad, create_graph=True)
    theirs = torch.autograd.grad(expected, [leaves[n] for n in GRAD_NAMES], grad, create_graph=True)
    for name, a, e in zip(GRAD_NAMES, ours, theirs):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")
    # d/d(x, weight) of the penalty; no ReLU-free path leaves a second derivative in bias or residual
    penalty, eager_penalty = (sum((g * g).sum() for g in grads) for grads in (ours, theirs))
    for name, a, e in zip(("x", "weight"), torch.autograd.grad(penalty, [case["x"], case["weight"]]),
                          torch.autograd.grad(eager_penalty, [leaves["x"], leaves["weight"]])):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradgradcheck_larger_without_affine(backend):
    """A larger Jacobian (fast mode) and no affine parameters: the second derivative through x alone."""
    case = make_case((3, 5, 4, 3), "channels_last", (False, False, True), dtype=torch.float64, requires_grad=True)

    def fn(x):
        return resfuse.ops.bn_eval_act(x, running_mean=case["running_mean"], running_var=case["running_var"],
                                       relu=True, backend=backend) ** 2

    assert gradgradcheck(fn, (case["x"],), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch(backend, layout):
    """N = 0: outputs of the right shape and layout, and zero parameter gradients (nothing flows back)."""
    case = make_case((0, 4, 3, 3), layout, VARIANTS[0], requires_grad=True)
    out = call(case, backend)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert case["x"].grad.shape == case["x"].shape
    torch.testing.assert_close(case["weight"].grad, torch.zeros(4))
    torch.testing.assert_close(case["bias"].grad, torch.zeros(4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate_like_eager(backend, relu, layout):
    """NaN and ±Inf in the input and the residual give what eager's ops give, output and gradients: ReLU keeps
    NaN; an Inf in x leaves grad_input finite; a NaN output passes its gradient on (threshold_backward)."""
    case = make_case((2, 3, 4, 5), layout, (True, True, relu), dtype=torch.float64)
    with torch.no_grad():
        case["x"][0, 0, 1, 1] = float("nan")
        case["x"][0, 1, 2, 2] = float("inf")
        case["x"][1, 2, 0, 3] = -float("inf")
        case["residual"][1, 0, 3, 4] = float("nan")
        case["residual"][0, 2, 0, 0] = float("inf")
    for name in GRAD_NAMES:
        case[name].requires_grad_(True)
    expected, leaves = eager(case)
    out = call(case, backend)
    torch.testing.assert_close(out, expected, equal_nan=True)
    grad = randn(2, 3, 4, 5, dtype=torch.float64, seed=9)
    out.backward(grad)
    expected.backward(grad)
    for name in GRAD_NAMES:
        torch.testing.assert_close(case[name].grad, leaves[name].grad, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_running_statistics_like_eager(backend):
    """A NaN mean, an Inf variance and a negative one normalise as eager's eval BatchNorm does."""
    case = make_case((2, 3, 2, 2), "contiguous", (True, False, False), dtype=torch.float64)
    case["running_mean"][0] = float("nan")
    case["running_var"][1] = float("inf")
    case["running_var"][2] = -1.0
    expected, _ = eager(case)
    torch.testing.assert_close(call(case, backend), expected, equal_nan=True)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])  # the ops, not torch math
def test_running_statistics_are_not_differentiable(backend):
    """As for F.batch_norm: running statistics that require grad are an error, never a silent zero gradient."""
    case = make_case((2, 3, 2, 2), "contiguous", VARIANTS[0], requires_grad=True)
    case["running_mean"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to running_mean"):
        call(case, backend)
    with torch.no_grad():  # nothing to record: fine
        call(case, backend)


def test_argument_errors():
    x = randn(2, 3, 4, 4)
    stats = dict(running_mean=torch.zeros(3), running_var=torch.ones(3))
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        resfuse.ops.bn_eval_act(x)
    with pytest.raises(ValueError, match=r"weight must have shape \[3\]"):
        resfuse.ops.bn_eval_act(x, torch.ones(4), **stats)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        resfuse.ops.bn_eval_act(x, residual=randn(2, 3, 4, 5), **stats)
    with pytest.raises(RuntimeError, match="running_var has dtype torch.float16"):
        resfuse.ops.bn_eval_act(x, running_mean=torch.zeros(3), running_var=torch.ones(3, dtype=torch.float16))


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_cpp_op_checks_its_arguments():
    """The modules call the C++ op without Python checks (run_bn_eval_act): its own messages name the problem."""
    op = torch.ops.resfuse.bn_eval_act
    x = randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"expected running_var of shape \[3\]"):
        op(x, None, None, None, torch.zeros(3), torch.ones(2), EPS, True)
    with pytest.raises(RuntimeError, match="residual must have the same shape as input"):
        op(x, None, None, randn(2, 3, 4, 5), torch.zeros(3), torch.ones(3), EPS, True)
    with pytest.raises(RuntimeError, match="expected input to be a 4-D"):
        op(randn(2, 3, 4), None, None, None, torch.zeros(3), torch.ones(3), EPS, True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_run_bn_eval_act_is_the_same_op(backend):
    """The modules' entry point with the backend resolved gives bn_eval_act's answer."""
    from resfuse.ops.bn_eval_act import run_bn_eval_act

    case = make_case((2, 4, 3, 3), "channels_last", VARIANTS[0])
    expected = call(case, backend)
    out = run_bn_eval_act(case["x"], case["weight"], case["bias"], case["residual"], case["running_mean"],
                          case["running_var"], EPS, True, backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _flavours():
    names = ["bn_eval_act_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("bn_eval_act")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("variant", VARIANTS[:2])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16])
def test_opcheck(name, variant, param_dtype):
    case = make_case((2, 3, 4, 5), "channels_last", variant, dtype=torch.float16, param_dtype=param_dtype,
                     requires_grad=True)
    op = getattr(torch.ops.resfuse, name).default
    args = (case["x"], case["weight"], case["bias"], case["residual"], case["running_mean"], case["running_var"],
            EPS, case["relu"])
    torch.library.opcheck(op, args)
    backward = getattr(torch.ops.resfuse, "_bn_eval_act_backward" + name[len("bn_eval_act"):]).default
    out = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    for mask in ([True, case["weight"] is not None, case["bias"] is not None, case["residual"] is not None],
                 [False, False, case["bias"] is not None, True]):
        torch.library.opcheck(backward, (randn(2, 3, 4, 5, dtype=torch.float16, seed=5), case["x"].detach(),
                                         None if case["weight"] is None else case["weight"].detach(), out,
                                         case["running_mean"], case["running_var"], EPS, case["relu"], mask))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_compile_fullgraph_forward_backward(backend):
    """torch.compile traces the op and its backward op: one graph, the same numbers."""
    torch._dynamo.reset()
    case = make_case((2, 4, 3, 5), "channels_last", VARIANTS[0], requires_grad=True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda *a: resfuse.ops.bn_eval_act(*a, backend=backend), fullgraph=True, backend=capture)
    args = [case[n] for n in ("x", "weight", "bias", "residual", "running_mean", "running_var")]
    out = fn(*args)
    expected, leaves = eager(case)
    assert len(graphs) == 1
    assert any("bn_eval_act" in str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: resfuse.ops.bn_eval_act(*a, backend=backend), fullgraph=True,
                             backend="aot_eager")
    compiled(*args).sum().backward()
    expected.sum().backward()
    for name in GRAD_NAMES:
        torch.testing.assert_close(case[name].grad.double(), leaves[name].grad, rtol=1e-5, atol=1e-5)


# ResNet stage shapes (torchvision's resnet50 at 224 px, N=8), channels_last as the models run.
STAGE_SHAPES = [(8, 64, 56, 56), (8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", STAGE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gpu_stage_shapes(backend, shape, dtype, layout):
    """On the GPU: output and every gradient by the 2x rule against nn.BatchNorm2d (fp32 parameters)."""
    reason = resfuse.ops.backend.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    case = make_case(shape, layout, VARIANTS[0], dtype=dtype, param_dtype=torch.float32, device="cuda",
                     requires_grad=True)
    exact, exact_leaves = eager(case)
    torch_out, torch_leaves = eager(case, dtype=None)
    ours = call(case, backend)
    assert ours.is_contiguous(memory_format=resfuse.layout.memory_format_of(case["x"]))
    assert rel_err(ours, exact) <= 2 * rel_err(torch_out, exact) + 1e-5
    grad = make_input(shape, layout, dtype, seed=9, device="cuda")
    for out in (ours, exact, torch_out):
        out.backward(grad.to(out.dtype))
    for name in GRAD_NAMES:
        assert rel_err(case[name].grad, exact_leaves[name].grad) <= (
            2 * rel_err(torch_leaves[name].grad, exact_leaves[name].grad) + 1e-5), name


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("relu", [True, False])
def test_gpu_nan_and_inf_like_eager(backend, relu):
    reason = resfuse.ops.backend.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    case = make_case((4, 64, 8, 8), "channels_last", (True, True, relu), dtype=torch.float32, device="cuda")
    with torch.no_grad():
        case["x"][0, 0, 1, 1] = float("nan")
        case["x"][0, 1, 2, 2] = float("inf")
        case["x"][1, 2, 0, 3] = -float("inf")
    for name in GRAD_NAMES:
        case[name].requires_grad_(True)
    expected, leaves = eager(case, dtype=torch.float32)
    out = call(case, backend)
    torch.testing.assert_close(out, expected, equal_nan=True)
    grad = randn(4, 64, 8, 8, device="cuda", seed=9)
    out.backward(grad)
    expected.backward(grad)
    for name in GRAD_NAMES:
        torch.testing.assert_close(case[name].grad, leaves[name].grad, equal_nan=True, rtol=1e-4, atol=1e-4)
