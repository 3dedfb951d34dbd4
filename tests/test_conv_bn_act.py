"""resfuse.ops.conv_bn_act (eval-mode conv + folded BN + residual + ReLU) against F.conv2d, every backend."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, rel_err, resfuse, skip_bf16_dot_under_interpreter

CPU_BACKENDS = backends_on("cpu")
# (input shape, weight shape, stride, padding, dilation, groups)
CONVS = [
    ((2, 5, 9, 11), (7, 5, 3, 3), 1, 1, 1, 1),
    ((2, 6, 9, 9), (8, 6, 3, 3), 2, 1, 1, 1),
    ((3, 4, 5, 5), (6, 4, 1, 1), 1, 0, 1, 1),
    ((2, 4, 7, 7), (4, 4, 1, 1), 2, 0, 1, 1),
    ((2, 8, 9, 9), (8, 2, 3, 3), 1, 2, 2, 4),
    ((1, 3, 15, 13), (5, 3, 7, 7), 2, 3, 1, 1),
    ((2, 3, 1, 1), (4, 3, 1, 1), 1, 0, 1, 1),
]


def out_shape(x_shape, w_shape, stride, padding, dilation):
    n, _, h, w = x_shape
    k = w_shape[2]
    size = lambda s: (s + 2 * padding - dilation * (k - 1) - 1) // stride + 1  # noqa: E731
    return (n, w_shape[0], size(h), size(w))


def reference(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding,
                 dilation, groups)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def make_case(conv, layout, with_bias, with_residual, relu, dtype=torch.float32):
    x_shape, w_shape, stride, padding, dilation, groups = conv
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(*x_shape, dtype=dtype, seed=1, memory_format=fmt)
    if layout == "strided":
        x = randn(*x_shape[:3], 2 * x_shape[3], dtype=dtype, seed=1)[..., ::2]
    weight = randn(*w_shape, dtype=dtype, seed=2) * 0.3
    bias = randn(w_shape[0], dtype=dtype, seed=3) if with_bias else None
    o_shape = out_shape(x_shape, w_shape, stride, padding, dilation)
    residual = randn(*o_shape, dtype=dtype, seed=4, memory_format=fmt) if with_residual else None
    return dict(x=x, weight=weight, bias=bias, residual=residual, stride=stride, padding=padding,
                dilation=dilation, groups=groups, relu=relu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("with_bias,with_residual,relu", [(True, True, True), (False, False, False),
                                                          (True, False, True)])
def test_forward_backward(backend, layout, conv, with_bias, with_residual, relu):
    case = make_case(conv, layout, with_bias, with_residual, relu)
    for name in ("x", "weight", "bias", "residual"):
        if case[name] is not None:
            case[name].requires_grad_(True)
    ref_case = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
                for k, v in case.items()}
    expected = reference(**ref_case)
    out = resfuse.ops.conv_bn_act(**case, backend=backend)
    assert out.shape == expected.shape and out.dtype == case["x"].dtype
    if layout == "channels_last" and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < 1e-5

    grad = randn(*out.shape, seed=7)
    out.backward(grad)
    expected.backward(grad.double())
    for name in ("x", "weight", "bias", "residual"):
        if case[name] is not None:
            torch.testing.assert_close(case[name].grad.double(), ref_case[name].grad.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(backend, dtype):
    skip_bf16_dot_under_interpreter(backend, dtype)
    case = make_case(CONVS[0], "channels_last", True, True, True, dtype=dtype)
    exact = reference(**case)
    ours = resfuse.ops.conv_bn_act(**case, backend=backend)
    torch_out = torch.relu(F.conv2d(case["x"], case["weight"], case["bias"], 1, 1) + case["residual"])
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= 2 * rel_err(torch_out, exact) + 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    # small: gradcheck runs the op twice per input element, and the Triton interpreter is slow
    case = make_case(((1, 2, 5, 5), (3, 2, 3, 3), 2, 1, 1, 1), "contiguous", True, True, True,
                     dtype=torch.float64)
    tensors = [case[k].requires_grad_(True) for k in ("x", "weight", "bias", "residual")]

    def fn(x, weight, bias, residual):
        return resfuse.ops.conv_bn_act(x, weight, bias, residual, 2, 1, 1, 1, True, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors)


def _flavours():
    names = ["conv_bn_act_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("conv_bn_act")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[4]])
@pytest.mark.parametrize("with_extras", [True, False])
def test_opcheck(name, conv, with_extras):
    case = make_case(conv, "channels_last", with_extras, with_extras, with_extras)
    for k in ("x", "weight", "bias", "residual"):
        if case[k] is not None:
            case[k].requires_grad_(True)
    op = getattr(torch.ops.resfuse, name).default
    conv_args = ([case["stride"]] * 2, [case["padding"]] * 2, [case["dilation"]] * 2, case["groups"])
    args = (case["x"], case["weight"], case["bias"], case["residual"], *conv_args, case["relu"])
    torch.library.opcheck(op, args)
    out = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    backward = getattr(torch.ops.resfuse, "_conv_bn_act_backward" + name[len("conv_bn_act"):]).default
    mask = [True, True, with_extras, with_extras]
    torch.library.opcheck(backward, (randn(*out.shape, seed=8).contiguous(memory_format=torch.channels_last),
                                     case["x"].detach(), case["weight"].detach(), out, *conv_args,
                                     case["relu"], mask))
