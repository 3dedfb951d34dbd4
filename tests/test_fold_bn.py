"""resfuse.ops.fold_bn (ops resfuse::_fold_bn and _fold_bn_triton): the eval-mode BN fold in one launch.

Against the float64 formula and against its own fp32 arithmetic (W' = conv_weight * scale is one product, so it
must be the correctly rounded value of the fp32 math, bit for bit, on every backend), in every layout and dtype,
with the conv bias and the BN affine present or absent; then conv2d(x, W') + b' against eval BN(conv(x));
opcheck (the fake kernel's strides are the real ones'); and the error when autograd would have to record it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse

CPU_BACKENDS = backends_on("cpu")
LAYOUTS = ["contiguous", "channels_last", "gemm"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = 1e-5


def stored_in(t, layout):
    """Whether ``t`` ([C_out, Cg, KH, KW]) is dense in ``layout``'s storage order."""
    if layout == "gemm":
        return t.permute(2, 3, 1, 0).is_contiguous()
    return t.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                           torch.contiguous_format)


def make_fold(shape=(6, 4, 3, 3), weight_dtype=torch.float32, param_dtype=torch.float32, conv_bias=True,
              affine=True, weight_layout="contiguous", device="cpu"):
    c = shape[0]
    g = torch.Generator().manual_seed(7)
    if weight_layout == "strided":  # a non-contiguous view: every other output channel of a larger weight
        w = randn(2 * shape[0], *shape[1:], dtype=weight_dtype, seed=1, device=device)[::2]
    else:
        fmt = torch.channels_last if weight_layout == "channels_last" else torch.contiguous_format
        w = randn(*shape, dtype=weight_dtype, seed=1, device=device, memory_format=fmt)
    return dict(
        conv_weight=w,
        conv_bias=randn(c, dtype=param_dtype, seed=2, device=device) if conv_bias else None,
        bn_weight=(torch.rand(c, generator=g) + 0.5).to(device, param_dtype) if affine else None,
        bn_bias=randn(c, dtype=param_dtype, seed=3, device=device) if affine else None,
        running_mean=(torch.randn(c, generator=g) * 0.5).to(device, param_dtype),
        running_var=(torch.rand(c, generator=g) * 2 + 0.25).to(device, param_dtype),
        eps=EPS)


def formula(case, acc):
    """The fold computed in torch ops at ``acc`` (float64: the truth; fp32: the kernels' own arithmetic)."""
    c = case["conv_weight"].shape[0]

    def vec(name, fill):
        t = case[name]
        return torch.full((c,), fill, dtype=acc, device=case["conv_weight"].device) if t is None else t.to(acc)

    scale = vec("bn_weight", 1.0) * (1 / torch.sqrt(vec("running_var", 1.0) + case["eps"]))
    weight = case["conv_weight"].to(acc) * scale.view(-1, 1, 1, 1)
    bias = vec("bn_bias", 0.0) + (vec("conv_bias", 0.0) - vec("running_mean", 0.0)) * scale
    return weight, bias


def exact_tolerance(backend, dtype, device="cpu"):
    """rtol of "exactly the rounded value": 0, except that Triton's interpreter converts fp32 to bf16 by truncation
    (a GPU rounds to nearest), up to one bf16 ulp away."""
    interpreted_bf16 = backend == "triton" and dtype == torch.bfloat16 and device == "cpu"
    return torch.finfo(torch.bfloat16).eps if interpreted_bf16 else 0.0


def fold(case, backend, dtype=None, layout="contiguous"):
    return resfuse.ops.fold_bn(case["conv_weight"], case["conv_bias"], case["bn_weight"], case["bn_bias"],
                               case["running_mean"], case["running_var"], case["eps"], dtype, layout, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64, torch.float16])
def test_matches_formula(backend, layout, dtype, weight_dtype):
    """Both outputs in the requested dtype and W' in the requested layout; W' is the fp32 (fp64 for fp64 weights)
    product rounded once to dtype, exactly, and b' within a rounding of it; both near the float64 truth."""
    case = make_fold(weight_dtype=weight_dtype, param_dtype=torch.float32)
    weight, bias = fold(case, backend, dtype, layout)
    assert weight.dtype == dtype and bias.dtype == dtype
    assert weight.shape == case["conv_weight"].shape and bias.shape == (6,)
    assert stored_in(weight, layout), weight.stride()
    acc = torch.float64 if weight_dtype == torch.float64 else torch.float32
    own_weight, own_bias = formula(case, acc)
    torch.testing.assert_close(weight, own_weight.to(dtype), rtol=exact_tolerance(backend, dtype), atol=0)
    tiny = torch.finfo(acc).eps
    torch.testing.assert_close(bias.double(), own_bias.to(dtype).double(), rtol=4 * tiny + torch.finfo(dtype).eps,
                               atol=4 * tiny)
    exact_weight, exact_bias = formula(case, torch.float64)
    limit = torch.finfo(dtype).eps + 8 * torch.finfo(acc).eps
    assert rel_err(weight, exact_weight) <= limit and rel_err(bias, exact_bias) <= limit


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_with_fold_equals_eval_bn_of_conv(backend, layout, conv_bias, affine):
    """float64: conv2d(x, W') + b' is nn.BatchNorm2d-in-eval(nn.Conv2d(x)), with or without the conv's bias and
    BN's affine parameters."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias).double()
    bn = randomize_bn_(nn.BatchNorm2d(6, affine=affine)).double().eval()
    x = randn(2, 4, 7, 5, dtype=torch.float64, seed=4)
    with torch.no_grad():
        weight, bias = resfuse.ops.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                           bn.running_var, bn.eps, None, layout, backend)
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_layout", ["channels_last", "strided"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_input_layout(backend, weight_layout, layout):
    """The conv weight is read through its strides: a channels_last or non-contiguous weight folds the same."""
    case = make_fold(weight_layout=weight_layout, param_dtype=torch.float64, weight_dtype=torch.float64)
    weight, bias = fold(case, backend, None, layout)
    expected_weight, expected_bias = formula(case, torch.float64)
    assert stored_in(weight, layout)
    torch.testing.assert_close(weight, expected_weight)
    torch.testing.assert_close(bias, expected_bias)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_parameters_in_any_float_dtype(backend, param_dtype):
    """BN parameters and statistics are read in their own dtype (a half-precision model, or fp64 buffers)."""
    case = make_fold(weight_dtype=torch.float16, param_dtype=param_dtype, shape=(8, 3, 1, 1))
    weight, bias = fold(case, backend, torch.float16, "gemm")
    own_weight, own_bias = formula(case, torch.float32)
    torch.testing.assert_close(weight, own_weight.half(), rtol=0, atol=0)
    torch.testing.assert_close(bias, own_bias.half())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_eps_at_double_precision(backend):
    """With running_var ~ 0 the fold is 1/sqrt(eps): fp64 weights must see eps at double precision."""
    case = make_fold(weight_dtype=torch.float64, param_dtype=torch.float64, affine=False)
    case["running_var"].zero_()
    case["eps"] = 1e-3 / 3  # not exact in fp32
    weight, bias = fold(case, backend)
    expected_weight, expected_bias = formula(case, torch.float64)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-13, atol=0)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_statistics_like_the_formula(backend):
    """NaN and Inf in the statistics fold as the formula's torch ops do (no silently finite W')."""
    case = make_fold(weight_dtype=torch.float64, param_dtype=torch.float64)
    case["running_mean"][0] = float("nan")
    case["running_var"][1] = float("inf")
    case["running_var"][2] = -1.0
    weight, bias = fold(case, backend)
    expected_weight, expected_bias = formula(case, torch.float64)
    torch.testing.assert_close(weight, expected_weight, equal_nan=True)
    torch.testing.assert_close(bias, expected_bias, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_refuses_inputs_autograd_would_record(backend):
    """A fold for no-grad calls only: parameters that require grad in grad mode are an error, never a W'
    without a gradient; under no_grad / inference_mode they fold."""
    case = make_fold()
    case["bn_weight"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        fold(case, backend)
    with torch.no_grad():
        fold(case, backend)
    with torch.inference_mode():
        fold(case, backend)


@pytest.mark.parametrize("name", ["_fold_bn", "_fold_bn_triton"])
def test_op_refuses_inputs_autograd_would_record(name):
    """The registered ops themselves (their Autograd kernel), not only the Python face."""
    if (name == "_fold_bn") != ("cuda" in CPU_BACKENDS) and name == "_fold_bn":
        pytest.skip("the C++ extension is not built")
    if name == "_fold_bn_triton" and "triton" not in CPU_BACKENDS:
        pytest.skip("triton cannot run on CPU here")
    case = make_fold()
    case["conv_weight"].requires_grad_(True)
    op = getattr(torch.ops.resfuse, name)
    args = (case["conv_weight"], case["conv_bias"], case["bn_weight"], case["bn_bias"], case["running_mean"],
            case["running_var"], EPS, torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match="conv_weight requires grad"):
        op(*args)
    with torch.no_grad():
        op(*args)


def test_argument_errors():
    case = make_fold()
    with pytest.raises(ValueError, match="layout must be one of"):
        fold(case, "reference", None, "nhwc")
    with pytest.raises(ValueError, match=r"running_var must have shape \[6\]"):
        fold({**case, "running_var": torch.ones(5)}, "reference")
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        fold({**case, "running_mean": None}, "reference")
    with pytest.raises(ValueError, match="dtype must be float16"):
        fold(case, "reference", torch.int32)


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_cpp_op_checks_its_arguments():
    case = make_fold()
    op = torch.ops.resfuse._fold_bn
    args = [case["conv_weight"], case["conv_bias"], case["bn_weight"], case["bn_bias"], case["running_mean"],
            case["running_var"], EPS, torch.float32, "contiguous"]
    with pytest.raises(RuntimeError, match="layout must be 'contiguous', 'channels_last' or 'gemm'"):
        op(*args[:-1], "nhwc")
    with pytest.raises(RuntimeError, match=r"expected running_mean of shape \[6\]"):
        op(*args[:4], torch.zeros(5), *args[5:])
    with pytest.raises(RuntimeError, match="dtype must be float16"):
        op(*args[:7], torch.int32, "gemm")
    with pytest.raises(RuntimeError, match="expected conv_weight to be a 4-D"):
        op(case["conv_weight"][0], *args[1:])


def _flavours():
    names = ["_fold_bn_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("_fold_bn")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("present", [True, False])
def test_opcheck(name, layout, present):
    case = make_fold(weight_dtype=torch.float16, conv_bias=present, affine=present)
    op = getattr(torch.ops.resfuse, name).default
    torch.library.opcheck(op, (case["conv_weight"], case["conv_bias"], case["bn_weight"], case["bn_bias"],
                               case["running_mean"], case["running_var"], EPS, torch.bfloat16, layout))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_compile_fullgraph(backend):
    """torch.compile traces the op under no_grad: one graph, the same W' and b'."""
    torch._dynamo.reset()
    case = make_fold(weight_dtype=torch.float32)
    args = [case[n] for n in ("conv_weight", "conv_bias", "bn_weight", "bn_bias", "running_mean", "running_var")]
    fn = torch.compile(lambda *a: resfuse.ops.fold_bn(*a, EPS, torch.float16, "gemm", backend), fullgraph=True,
                       backend="aot_eager")
    with torch.no_grad():
        weight, bias = fn(*args)
    expected_weight, expected_bias = fold(case, backend, torch.float16, "gemm")
    assert stored_in(weight, "gemm")
    torch.testing.assert_close(weight, expected_weight, rtol=0, atol=0)
    torch.testing.assert_close(bias, expected_bias, rtol=0, atol=0)


# Conv weights of torchvision's resnet50 (and a 7x7 stem), as the GPU eval path folds them on every call.
STAGE_WEIGHTS = [(64, 3, 7, 7), (64, 64, 3, 3), (256, 64, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", STAGE_WEIGHTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_stage_weights(backend, shape, layout, dtype):
    """On the GPU: W' exactly the fp32 product rounded to dtype, b' within a rounding, in the layout asked."""
    reason = resfuse.ops.backend.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    case = make_fold(shape=shape, weight_dtype=torch.float32, param_dtype=torch.float32, device="cuda")
    weight, bias = fold(case, backend, dtype, layout)
    assert stored_in(weight, layout)
    own_weight, own_bias = formula(case, torch.float32)
    torch.testing.assert_close(weight, own_weight.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(bias.double(), own_bias.to(dtype).double(),
                               rtol=4e-7 + torch.finfo(dtype).eps, atol=4e-7)
