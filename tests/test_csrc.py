"""Tests of the C++ kernels of the extension (csrc/), called directly through torch.ops.resfuse.

The CPU kernels are compared with float64 references built on F.batch_norm / F.conv2d and autograd; the CUDA
kernels (marked ``cuda``, skipped without a GPU) are compared with the CPU kernels.
"""
from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("resfuse._C") is None:
    pytest.skip("the resfuse._C extension is not built (RESFUSE_SKIP_CSRC=1?)", allow_module_level=True)

import resfuse._C  # noqa: E402  (registers the C++ kernels)

ops = torch.ops.resfuse

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided", "strided_cl"]
# Odd sizes, 1x1 spatial, a shape large enough to need several parallel chunks (> 32768 elements).
SHAPES = [(3, 5, 9, 11), (2, 3, 1, 1), (4, 8, 6, 6), (8, 16, 16, 18)]
MOMENTUM, EPS = 0.1, 1e-5


# ---------------------------------------------------------------------------------------------------------------
# helpers


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str = "", aten_conv: bool = False) -> None:
    """fp32/fp64: assert_close defaults on actual's dtype; fp16/bf16: relative L2 error <= 1e-2.

    aten_conv: the value went through ATen's fp32 convolution (forward or backward), whose reductions over
    C_in*kH*kW or N*H*W products round more than the defaults allow; fp32 then gets rtol = atol = 1e-4.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype in (torch.float16, torch.bfloat16):
        err = rel_l2(actual, expected)
        assert err <= 1e-2, f"{name}: relative L2 error {err:.3g} > 1e-2"
    else:
        tol = dict(rtol=1e-4, atol=1e-4) if aten_conv and actual.dtype == torch.float32 else {}
        torch.testing.assert_close(actual, expected.to(actual.dtype), msg=lambda m: f"{name}: {m}", **tol)


def activation(shape, dtype, layout="nchw", seed=0, offset=0.5, scale=2.0) -> torch.Tensor:
    """Random activation (never zeros) in a given layout; the 'strided*' layouts are not dense."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":  # every other column: non-contiguous, suggests NCHW
        t = torch.randn(n, c, h, 2 * w, generator=g, dtype=torch.float64)[..., ::2]
    elif layout == "strided_cl":  # every other channel of an NHWC buffer: non-contiguous, suggests channels_last
        t = torch.randn(n, h, w, 2 * c, generator=g, dtype=torch.float64)[..., ::2].permute(0, 3, 1, 2)
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    t = (t * scale + offset).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    assert t.shape == shape
    return t


def per_channel(c, dtype, seed, positive=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if positive else torch.randn(c, generator=g)
    return t.to(dtype)


def suggested_format(t: torch.Tensor) -> torch.memory_format:
    """ATen's Tensor::suggest_memory_format, through public API: empty_like keeps the strides of a dense tensor
    and lays out any other one in its suggested format."""
    e = torch.empty_like(t)
    if e.is_contiguous(memory_format=torch.channels_last) and not e.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def assert_format(t: torch.Tensor, like: torch.Tensor) -> None:
    fmt = suggested_format(like)
    assert t.is_contiguous(memory_format=fmt), f"output strides {t.stride()} are not {fmt} like the input's"


def assert_not_requested(t: torch.Tensor, dtype: torch.dtype) -> None:
    assert t.dim() == 1 and t.numel() == 0 and t.dtype == dtype, (tuple(t.shape), t.dtype)


def bn_double(xd, wd, bd, eps):
    """float64 training-mode batch norm; F.batch_norm refuses a single value per channel, so that case is spelled
    out (it reduces to the bias)."""
    if xd.numel() // xd.shape[1] > 1:
        return F.batch_norm(xd, None, None, wd, bd, training=True, momentum=0.0, eps=eps)
    mean = xd.mean(dim=(0, 2, 3), keepdim=True)
    var = xd.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (xd - mean) * (var + eps).rsqrt()
    return y * wd.view(1, -1, 1, 1) + bd.view(1, -1, 1, 1)


def reference_bn_act(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    """float64 reference: (out, mean, invstd, new_running_mean, new_running_var)."""
    xd = x.double()
    c = x.shape[1]
    wd = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    bd = torch.zeros(c, dtype=torch.float64) if bias is None else bias.double()
    out = bn_double(xd, wd, bd, eps)
    if residual is not None:
        out = out + residual.double()
    if relu:
        out = F.relu(out)
    n = x.numel() // c
    mean = xd.mean(dim=(0, 2, 3))
    var = xd.var(dim=(0, 2, 3), unbiased=False)
    invstd = (var + eps).rsqrt()
    rm = None if running_mean is None else (1 - momentum) * running_mean.double() + momentum * mean
    rv = None if running_var is None else (1 - momentum) * running_var.double() + momentum * var * n / (n - 1)
    return out, mean, invstd, rm, rv


def reference_bn_act_backward(grad_out, x, weight, bias, residual, relu, eps):
    """float64 autograd reference: (grad_input, grad_weight, grad_bias, grad_residual)."""
    c = x.shape[1]
    xd = x.double().requires_grad_()
    wd = (torch.ones(c, dtype=torch.float64) if weight is None else weight.double()).requires_grad_()
    bd = (torch.zeros(c, dtype=torch.float64) if bias is None else bias.double()).requires_grad_()
    rd = (torch.zeros_like(xd) if residual is None else residual.double()).requires_grad_()
    y = bn_double(xd, wd, bd, eps) + rd
    if relu:
        y = F.relu(y)
    y.backward(grad_out.double())
    return xd.grad, wd.grad, bd.grad, rd.grad


def reference_conv(x, weight, bias, residual, stride, padding, dilation, groups, relu, grad_out=None):
    """float64 reference of conv_bn_act; with grad_out also its autograd gradients."""
    xd = x.double().requires_grad_()
    wd = weight.double().requires_grad_()
    bd = (torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()).requires_grad_()
    y = F.conv2d(xd, wd, bd, stride, padding, dilation, groups)
    rd = (torch.zeros_like(y) if residual is None else residual.double()).requires_grad_()
    y = y + rd
    if relu:
        y = F.relu(y)
    if grad_out is None:
        return y.detach()
    y.backward(grad_out.double())
    return y.detach(), xd.grad, wd.grad, bd.grad, rd.grad


def param_dtype_for(x_dtype, mixed):
    """Weights are either the activation dtype or float32 (mixed precision)."""
    return torch.float32 if mixed else x_dtype


# ---------------------------------------------------------------------------------------------------------------
# bn_act forward


def test_extension_build_info():
    assert isinstance(resfuse._C.with_cuda(), bool)
    version = resfuse._C.cuda_version()
    arch = resfuse._C.cuda_arch_list()
    assert isinstance(arch, str)
    if resfuse._C.with_cuda():
        assert isinstance(version, str) and version.count(".") == 1
    else:
        assert version is None and arch == ""


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_forward(dtype, layout, shape):
    c = shape[1]
    mixed = dtype in (torch.float16, torch.bfloat16)
    pdtype = param_dtype_for(dtype, mixed)
    x = activation(shape, dtype, layout, seed=1)
    residual = activation(shape, dtype, "nchw", seed=2)  # deliberately in another layout for channels_last
    w, b = per_channel(c, pdtype, 3, positive=True), per_channel(c, pdtype, 4)
    rm, rv = per_channel(c, pdtype, 5), per_channel(c, pdtype, 6, positive=True)
    rm0, rv0 = rm.clone(), rv.clone()

    out, mean, invstd = ops.bn_act(x, w, b, residual, rm, rv, MOMENTUM, EPS, True)

    ref_out, ref_mean, ref_invstd, ref_rm, ref_rv = reference_bn_act(x, w, b, residual, rm0, rv0, MOMENTUM, EPS, True)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and mean.dtype == stats_dtype and invstd.dtype == stats_dtype
    assert mean.shape == (c,) and invstd.shape == (c,)
    assert_format(out, x)
    assert_matches(out, ref_out, "out")
    assert_matches(mean, ref_mean, "save_mean")
    assert_matches(invstd, ref_invstd, "save_invstd")
    assert rm.dtype == pdtype and rv.dtype == pdtype
    assert_matches(rm, ref_rm, "running_mean")
    assert_matches(rv, ref_rv, "running_var")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "use_weight,use_bias,use_residual,relu,use_running", list(itertools.product([False, True], repeat=5))
)
def test_bn_act_forward_options(use_weight, use_bias, use_residual, relu, use_running, layout):
    shape = (3, 6, 5, 7)
    c = shape[1]
    x = activation(shape, torch.float32, layout, seed=7)
    w = per_channel(c, torch.float32, 8, positive=True) if use_weight else None
    b = per_channel(c, torch.float32, 9) if use_bias else None
    r = activation(shape, torch.float32, layout, seed=10) if use_residual else None
    rm = per_channel(c, torch.float32, 11) if use_running else None
    rv = per_channel(c, torch.float32, 12, positive=True) if use_running else None
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()

    out, mean, invstd = ops.bn_act(x, w, b, r, rm, rv, MOMENTUM, EPS, relu)

    ref_out, ref_mean, ref_invstd, ref_rm, ref_rv = reference_bn_act(x, w, b, r, rm0, rv0, MOMENTUM, EPS, relu)
    assert_matches(out, ref_out, "out")
    assert_matches(mean, ref_mean, "save_mean")
    assert_matches(invstd, ref_invstd, "save_invstd")
    assert_format(out, x)
    if use_running:
        assert_matches(rm, ref_rm, "running_mean")
        assert_matches(rv, ref_rv, "running_var")
    if relu:
        assert (out >= 0).all()


def test_bn_act_only_one_running_stat_and_momentum():
    x = activation((4, 3, 5, 5), torch.float32, seed=13)
    rv = per_channel(3, torch.float32, 14, positive=True)
    rv0 = rv.clone()
    ops.bn_act(x, None, None, None, None, rv, 0.7, EPS, False)
    _, _, _, _, ref_rv = reference_bn_act(x, None, None, None, None, rv0, 0.7, EPS, False)
    assert_matches(rv, ref_rv, "running_var")


def test_bn_act_running_stats_of_another_dtype_and_strided():
    """float64 activations with float32 running stats; a strided running_mean is still updated in place."""
    x = activation((4, 3, 5, 5), torch.float64, seed=15)
    rm_buf = per_channel(6, torch.float32, 16)
    rm = rm_buf[::2]
    rv = per_channel(3, torch.float32, 17, positive=True)
    rm0, rv0 = rm.clone(), rv.clone()
    ops.bn_act(x, None, None, None, rm, rv, MOMENTUM, EPS, True)
    _, _, _, ref_rm, ref_rv = reference_bn_act(x, None, None, None, rm0, rv0, MOMENTUM, EPS, True)
    assert_matches(rm, ref_rm, "running_mean")
    assert_matches(rv, ref_rv, "running_var")


def test_bn_act_single_value_per_channel_without_running_stats():
    x = activation((1, 7, 1, 1), torch.float32, seed=18)
    b = per_channel(7, torch.float32, 19)
    out, mean, invstd = ops.bn_act(x, per_channel(7, torch.float32, 20), b, None, None, None, MOMENTUM, EPS, False)
    torch.testing.assert_close(out, b.view(1, 7, 1, 1))  # x - mean == 0
    torch.testing.assert_close(mean, x.view(7))
    torch.testing.assert_close(invstd, torch.full((7,), EPS).rsqrt())


def test_bn_act_large_mean_is_accurate():
    """|mean| >> std must not lose the variance to cancellation."""
    x = activation((4, 5, 8, 8), torch.float32, "channels_last", seed=21, offset=1000.0, scale=1.0)
    out, mean, invstd = ops.bn_act(x, None, None, None, None, None, MOMENTUM, EPS, False)
    ref_out, ref_mean, ref_invstd, _, _ = reference_bn_act(x, None, None, None, None, None, MOMENTUM, EPS, False)
    assert_matches(mean, ref_mean, "save_mean")
    torch.testing.assert_close(invstd, ref_invstd.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-4)


def test_bn_act_keeps_nan():
    x = activation((2, 3, 4, 4), torch.float32, seed=22)
    r = activation((2, 3, 4, 4), torch.float32, seed=23)
    r[0, 1, 2, 3] = float("nan")
    out, _, _ = ops.bn_act(x, None, None, r, None, None, MOMENTUM, EPS, True)
    assert torch.isnan(out[0, 1, 2, 3]) and torch.isnan(out).sum() == 1


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 5)])
def test_bn_act_empty(shape):
    c = shape[1]
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w, b = per_channel(c, torch.float32, 24), per_channel(c, torch.float32, 25)
    rm, rv = per_channel(c, torch.float32, 26), per_channel(c, torch.float32, 27, positive=True)
    rm0, rv0 = rm.clone(), rv.clone()
    out, mean, invstd = ops.bn_act(x, w, b, torch.randn(shape), rm, rv, MOMENTUM, EPS, True)
    assert out.shape == shape and out.dtype == x.dtype
    assert mean.shape == (c,) and invstd.shape == (c,) and mean.dtype == torch.float32
    torch.testing.assert_close(rm, rm0, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv0, rtol=0, atol=0)

    go = torch.randn(shape)
    gi, gw, gb, gr = ops._bn_act_backward(go, x, w, out, mean, invstd, True, [True] * 4)
    assert gi.shape == shape and gr.shape == shape
    torch.testing.assert_close(gw, torch.zeros(c))
    torch.testing.assert_close(gb, torch.zeros(c))


# ---------------------------------------------------------------------------------------------------------------
# _bn_act_backward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_bn_act_backward(dtype, layout, shape, relu):
    c = shape[1]
    mixed = dtype == torch.bfloat16  # fp16 exercises weights of the activation dtype, bf16 float32 weights
    pdtype = param_dtype_for(dtype, mixed)
    x = activation(shape, dtype, layout, seed=31)
    r = activation(shape, dtype, layout, seed=32)
    w = per_channel(c, pdtype, 33, positive=True)
    b = per_channel(c, pdtype, 34)
    out, mean, invstd = ops.bn_act(x, w, b, r, None, None, MOMENTUM, EPS, relu)
    go = activation(shape, dtype, "channels_last" if layout == "nchw" else "nchw", seed=35, offset=0.0, scale=1.0)

    gi, gw, gb, gr = ops._bn_act_backward(go, x, w, out, mean, invstd, relu, [True, True, True, True])

    ref_gi, ref_gw, ref_gb, ref_gr = reference_bn_act_backward(go, x, w, b, r, relu, EPS)
    assert gi.dtype == dtype and gr.dtype == dtype and gw.dtype == pdtype and gb.dtype == pdtype
    assert_format(gi, x)
    assert_format(gr, x)
    assert_matches(gi, ref_gi, "grad_input")
    assert_matches(gw, ref_gw, "grad_weight")
    assert_matches(gb, ref_gb, "grad_bias")
    assert_matches(gr, ref_gr, "grad_residual")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_act_backward_without_weight(layout):
    shape = (3, 5, 6, 7)
    x = activation(shape, torch.float32, layout, seed=41)
    out, mean, invstd = ops.bn_act(x, None, None, None, None, None, MOMENTUM, EPS, True)
    go = activation(shape, torch.float32, layout, seed=42, offset=0.0)
    gi, gw, gb, gr = ops._bn_act_backward(go, x, None, out, mean, invstd, True, [True] * 4)
    ref_gi, ref_gw, ref_gb, ref_gr = reference_bn_act_backward(go, x, None, None, None, True, EPS)
    assert gw.dtype == torch.float32 and gb.dtype == torch.float32
    assert_matches(gi, ref_gi, "grad_input")
    assert_matches(gw, ref_gw, "grad_weight")
    assert_matches(gb, ref_gb, "grad_bias")
    assert_matches(gr, ref_gr, "grad_residual")


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bn_act_backward_output_mask(mask, dtype):
    shape = (2, 4, 5, 3)
    x = activation(shape, dtype, "channels_last", seed=51)
    w = per_channel(4, torch.float32, 52, positive=True)
    out, mean, invstd = ops.bn_act(x, w, None, None, None, None, MOMENTUM, EPS, True)
    go = activation(shape, dtype, seed=53, offset=0.0)
    full = ops._bn_act_backward(go, x, w, out, mean, invstd, True, [True] * 4)
    got = ops._bn_act_backward(go, x, w, out, mean, invstd, True, list(mask))
    dtypes = [dtype, torch.float32, torch.float32, dtype]
    for name, requested, g, f, dt in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), mask, got,
                                         full, dtypes):
        if requested:
            assert g.dtype == dt
            torch.testing.assert_close(g, f, rtol=0, atol=0, msg=name)
        else:
            assert_not_requested(g, dt)


# ---------------------------------------------------------------------------------------------------------------
# conv_bn_act and its backward

CONV_CASES = [
    # shape, out_channels, kernel, stride, padding, dilation, groups
    ((2, 4, 9, 11), 6, 3, (1, 1), (1, 1), (1, 1), 1),
    ((3, 6, 8, 7), 4, 3, (2, 1), (0, 2), (1, 2), 2),
    ((2, 3, 5, 5), 5, 1, (1, 1), (0, 0), (1, 1), 1),
    ((1, 8, 4, 4), 8, 3, (2, 2), (1, 1), (1, 1), 8),  # depthwise
    ((2, 4, 8, 8), 16, 3, (1, 1), (1, 1), (1, 1), 1),  # CUDA: the vector paths (C % 8 == 0, H*W % 8 == 0)
]


def conv_inputs(case, dtype, layout, seed):
    shape, cout, k, stride, padding, dilation, groups = case
    x = activation(shape, dtype, layout, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(cout, shape[1] // groups, k, k, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    b = per_channel(cout, dtype, seed + 2)
    out_shape = F.conv2d(torch.empty(shape, device="meta"), torch.empty(w.shape, device="meta"), None, stride,
                         padding, dilation, groups).shape
    r = activation(tuple(out_shape), dtype, layout, seed=seed + 3)
    return x, w, b, r, list(stride), list(padding), list(dilation), groups


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_bn_act_forward(dtype, layout, case):
    x, w, b, r, stride, padding, dilation, groups = conv_inputs(case, dtype, layout, seed=61)
    out = ops.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, True)
    ref = reference_conv(x, w, b, r, stride, padding, dilation, groups, True)
    assert out.dtype == dtype
    assert_format(out, x)
    assert_matches(out, ref, "out", aten_conv=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("use_bias,use_residual,relu", list(itertools.product([False, True], repeat=3)))
def test_conv_bn_act_forward_options(use_bias, use_residual, relu, layout):
    x, w, b, r, stride, padding, dilation, groups = conv_inputs(CONV_CASES[0], torch.float64, layout, seed=71)
    b = b if use_bias else None
    r = r if use_residual else None
    out = ops.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, relu)
    assert_format(out, x)
    assert_matches(out, reference_conv(x, w, b, r, stride, padding, dilation, groups, relu), "out", aten_conv=True)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bn_act_backward(dtype, layout, case, relu):
    x, w, b, r, stride, padding, dilation, groups = conv_inputs(case, dtype, layout, seed=81)
    if layout == "strided_cl":
        w = w.contiguous(memory_format=torch.channels_last)  # grad_weight must follow the weight's layout
    out = ops.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, relu)
    go = activation(tuple(out.shape), dtype, "nchw" if layout != "nchw" else "channels_last", seed=85, offset=0.0)

    gi, gw, gb, gr = ops._conv_bn_act_backward(go, x, w, out, stride, padding, dilation, groups, relu, [True] * 4)

    _, ref_gi, ref_gw, ref_gb, ref_gr = reference_conv(x, w, b, r, stride, padding, dilation, groups, relu, go)
    assert gi.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype and gr.dtype == dtype
    assert_format(gi, x)
    assert_format(gw, w)
    assert_format(gr, x)
    assert_matches(gi, ref_gi, "grad_input", aten_conv=True)
    assert_matches(gw, ref_gw, "grad_weight", aten_conv=True)
    assert_matches(gb, ref_gb, "grad_bias")
    assert_matches(gr, ref_gr, "grad_residual")


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bn_act_backward_output_mask(mask, relu):
    x, w, b, r, stride, padding, dilation, groups = conv_inputs(CONV_CASES[1], torch.float32, "channels_last", 91)
    out = ops.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, relu)
    go = activation(tuple(out.shape), torch.float32, "channels_last", seed=92, offset=0.0)
    args = (go, x, w, out, stride, padding, dilation, groups, relu)
    full = ops._conv_bn_act_backward(*args, [True] * 4)
    got = ops._conv_bn_act_backward(*args, list(mask))
    for name, requested, g, f in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), mask, got, full):
        if requested:
            torch.testing.assert_close(g, f, msg=name)
        else:
            assert_not_requested(g, torch.float32)
    if mask[3] and not relu:
        # grad_residual is grad_out's values but must not alias it (op outputs never alias inputs)
        assert got[3].untyped_storage().data_ptr() != go.untyped_storage().data_ptr()


def test_conv_bn_act_empty_batch():
    x = torch.randn(0, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    b = torch.randn(6)
    out = ops.conv_bn_act(x, w, b, None, [1, 1], [1, 1], [1, 1], 1, True)
    assert out.shape == (0, 6, 8, 8)
    go = torch.randn(0, 6, 8, 8)
    gi, gw, gb, gr = ops._conv_bn_act_backward(go, x, w, out, [1, 1], [1, 1], [1, 1], 1, True, [True] * 4)
    assert gi.shape == x.shape and gr.shape == out.shape
    torch.testing.assert_close(gw, torch.zeros_like(w))
    torch.testing.assert_close(gb, torch.zeros(6))


# ---------------------------------------------------------------------------------------------------------------
# argument validation


def _bn(x, weight=None, bias=None, residual=None, running_mean=None, running_var=None):
    return ops.bn_act(x, weight, bias, residual, running_mean, running_var, MOMENTUM, EPS, True)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x: _bn(x[0]), "4-D"),
        (lambda x: _bn(x.to(torch.int32)), "float16, bfloat16, float32 or float64"),
        (lambda x: _bn(x, weight=torch.randn(4)), r"weight of shape \[3\]"),
        (lambda x: _bn(x, bias=torch.randn(3, 1)), r"bias of shape \[3\]"),
        (lambda x: _bn(x, running_mean=torch.randn(2)), r"running_mean of shape \[3\]"),
        (lambda x: _bn(x, residual=torch.randn(2, 3, 4, 4)), "residual must have the same shape"),
        (lambda x: _bn(x, residual=torch.randn(2, 3, 4, 5, dtype=torch.float64)), "residual must have the same dtype"),
        (lambda x: _bn(x[:1, :, :1, :1], running_var=torch.ones(3)), "more than 1 value per channel"),
    ],
)
def test_bn_act_errors(make, match):
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=match):
        make(x)


def test_bn_act_backward_errors():
    x = torch.randn(2, 3, 4, 5)
    out, mean, invstd = ops.bn_act(x, None, None, None, None, None, MOMENTUM, EPS, True)
    with pytest.raises(RuntimeError, match="grad_out must have the same shape"):
        ops._bn_act_backward(torch.randn(2, 3, 4, 4), x, None, out, mean, invstd, True, [True] * 4)
    with pytest.raises(RuntimeError, match=r"save_mean of shape \[3\]"):
        ops._bn_act_backward(torch.randn_like(x), x, None, out, mean[:2], invstd, True, [True] * 4)
    with pytest.raises(RuntimeError, match="out must have the same dtype"):
        ops._bn_act_backward(torch.randn_like(x), x, None, out.double(), mean, invstd, True, [True] * 4)


def test_conv_bn_act_errors():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    conv = [[1, 1], [1, 1], [1, 1], 1]
    with pytest.raises(RuntimeError, match="4-D"):
        ops.conv_bn_act(x[0], w, None, None, *conv, True)
    with pytest.raises(RuntimeError, match="weight must have the same dtype"):
        ops.conv_bn_act(x, w.double(), None, None, *conv, True)
    with pytest.raises(RuntimeError, match=r"bias of shape \[6\]"):
        ops.conv_bn_act(x, w, torch.randn(4), None, *conv, True)
    with pytest.raises(RuntimeError, match="residual must have the same shape"):
        ops.conv_bn_act(x, w, None, torch.randn(2, 6, 7, 7), *conv, True)
    with pytest.raises(RuntimeError, match="groups must be positive"):
        ops.conv_bn_act(x, w, None, None, [1, 1], [1, 1], [1, 1], 0, True)
    out = ops.conv_bn_act(x, w, None, None, *conv, True)
    with pytest.raises(RuntimeError, match="grad_out must have the same shape"):
        ops._conv_bn_act_backward(torch.randn(2, 6, 8, 7), x, w, out, *conv, True, [True] * 4)


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels


def _assert_cuda_matches_cpu(actual, expected, name, n=1):
    """n: values summed into each element (grad_weight/grad_bias): fp32 sums of n terms that cancel (the CPU sums in
    float64) are off by ~eps*sqrt(n)*|term|; 5e-6*sqrt(n) leaves a wide margin above that."""
    assert actual.device.type == "cuda", name
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if actual.numel() == 0:
        return
    if actual.dtype in (torch.float16, torch.bfloat16):
        err = rel_l2(actual, expected)
        assert err <= 1e-2, f"{name}: relative L2 error {err:.3g} > 1e-2"
    elif actual.dtype == torch.float32:
        # fp32 Welford on the GPU vs double sums on the CPU
        atol = max(2e-5, 5e-6 * n**0.5)
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=atol, msg=lambda m: f"{name}: {m}")
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}")


# The CUDA kernels take 16-byte vector paths when C % VEC == 0 (channels_last; (32, 64, 28, 28) spans several
# blocks and partials, C=64 keeps a thread on one channel group, C=24 and C=96 do not) or H*W % VEC == 0 (NCHW:
# (8, 16, 16, 18), (4, 24, 8, 8)), with VEC = 16 bytes / element size; the other shapes run the scalar kernels.
CUDA_SHAPES = SHAPES + [(32, 64, 28, 28), (4, 2048, 7, 7), (1, 7, 3, 1), (4, 24, 8, 8), (8, 96, 10, 10)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_bn_act_matches_cpu(dtype, layout, shape):
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    c = shape[1]
    pdtype = param_dtype_for(dtype, dtype == torch.bfloat16)
    x = activation(shape, dtype, layout, seed=101)
    r = activation(shape, dtype, layout, seed=102)
    w, b = per_channel(c, pdtype, 103, positive=True), per_channel(c, pdtype, 104)
    rm, rv = per_channel(c, pdtype, 105), per_channel(c, pdtype, 106, positive=True)
    use_running = x.numel() // c > 1
    go = activation(shape, dtype, layout, seed=107, offset=0.0)
    rm_c, rv_c = rm.cuda(), rv.cuda()

    cpu = ops.bn_act(x, w, b, r, rm if use_running else None, rv if use_running else None, MOMENTUM, EPS, True)
    gpu = ops.bn_act(x.cuda(), w.cuda(), b.cuda(), r.cuda(), rm_c if use_running else None,
                     rv_c if use_running else None, MOMENTUM, EPS, True)
    for name, g, cpu_t in zip(("out", "save_mean", "save_invstd"), gpu, cpu):
        _assert_cuda_matches_cpu(g, cpu_t, name)
    assert_format(gpu[0], x)
    if use_running:
        _assert_cuda_matches_cpu(rm_c, rm, "running_mean")
        _assert_cuda_matches_cpu(rv_c, rv, "running_var")

    for relu in (False, True):
        out_cpu = ops.bn_act(x, w, b, r, None, None, MOMENTUM, EPS, relu)
        out_gpu = ops.bn_act(x.cuda(), w.cuda(), b.cuda(), r.cuda(), None, None, MOMENTUM, EPS, relu)
        for mask in ([True] * 4, [True, False, False, True], [False, True, True, False]):
            # the CPU kernel is given the GPU forward results, so both see the same ReLU mask
            gpu_grads = ops._bn_act_backward(go.cuda(), x.cuda(), w.cuda(), *out_gpu, relu, mask)
            cpu_grads = ops._bn_act_backward(go, x, w, *(t.cpu() for t in out_gpu), relu, mask)
            for name, g, cpu_t in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), gpu_grads,
                                      cpu_grads):
                n = x.numel() // c if name in ("grad_weight", "grad_bias") else 1
                _assert_cuda_matches_cpu(g, cpu_t, f"{name} relu={relu} mask={mask}", n)
        assert out_cpu[0].shape == out_gpu[0].shape

    # bit-reproducible: the reduction order depends on the shape and the device only
    again = ops.bn_act(x.cuda(), w.cuda(), b.cuda(), r.cuda(), None, None, MOMENTUM, EPS, True)
    first = ops.bn_act(x.cuda(), w.cuda(), b.cuda(), r.cuda(), None, None, MOMENTUM, EPS, True)
    for a, e in zip(again, first):
        assert torch.equal(a, e)


def _on_cuda(t: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """t on the GPU with its strides; misaligned: starting one element past a 16-byte boundary, which sends the
    CUDA kernels to their scalar fallback."""
    if not misaligned:
        return t.cuda()
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    out = flat[1:].as_strided(t.shape, t.stride())
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("use_weight,use_residual,relu", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(16, 64, 28, 28), (4, 7, 9, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bn_act_options_match_cpu(dtype, shape, layout, misaligned, use_weight, use_residual, relu):
    """Every optional input of the forward and backward kernels, on vector-path and fallback views."""
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    c = shape[1]
    x = activation(shape, dtype, layout, seed=121)
    r = activation(shape, dtype, layout, seed=122) if use_residual else None
    w = per_channel(c, torch.float32, 123, positive=True) if use_weight else None
    b = per_channel(c, torch.float32, 124)
    go = activation(shape, dtype, layout, seed=125, offset=0.0)
    xc, goc = _on_cuda(x, misaligned), _on_cuda(go, misaligned)
    rc = None if r is None else _on_cuda(r, misaligned)
    wc = None if w is None else w.cuda()

    gpu = ops.bn_act(xc, wc, b.cuda(), rc, None, None, MOMENTUM, EPS, relu)
    cpu = ops.bn_act(x, w, b, r, None, None, MOMENTUM, EPS, relu)
    for name, g, cpu_t in zip(("out", "save_mean", "save_invstd"), gpu, cpu):
        _assert_cuda_matches_cpu(g, cpu_t, name)
    for mask in ([True] * 4, [True, False, False, False], [False, False, False, True], [False, True, True, False]):
        gpu_grads = ops._bn_act_backward(goc, xc, wc, *gpu, relu, mask)
        cpu_grads = ops._bn_act_backward(go, x, w, *(t.cpu() for t in gpu), relu, mask)
        for name, g, cpu_t in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), gpu_grads, cpu_grads):
            n = x.numel() // c if name in ("grad_weight", "grad_bias") else 1
            _assert_cuda_matches_cpu(g, cpu_t, f"{name} mask={mask}", n)


def _strided_channel_vector(t: torch.Tensor) -> torch.Tensor:
    """t's values as every other element of a larger buffer: a non-contiguous [C] tensor."""
    buf = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)
    buf[::2] = t
    return buf[::2]


# (activation dtype, parameter dtype, strided parameters, with weight). The CUDA kernels read and update the
# per-channel tensors in place when they are contiguous and in the activation's or the accumulation dtype;
# the other cases go through accumulation-dtype copies. Each path once, on the vector kernels' shape.
PARAM_CASES = [
    (torch.bfloat16, torch.bfloat16, False, True),  # a model cast to bf16: in place, bf16
    (torch.bfloat16, torch.float32, False, True),  # fp32 master parameters: in place, fp32
    (torch.float16, torch.bfloat16, False, True),  # neither dtype: copies
    (torch.float32, torch.float32, True, True),  # strided: copies
    (torch.float64, torch.float32, False, False),  # no weight: grad_weight in fp32, accumulated in fp64
]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("case", PARAM_CASES, ids=str)
def test_cuda_bn_act_parameter_dtypes_match_cpu(case, layout):
    """Weight, bias and running statistics in each dtype and layout the kernels take: outputs, updated running
    statistics, and grad_weight / grad_bias in the parameters' dtype."""
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    dtype, pdtype, strided, use_weight = case
    shape = (16, 64, 14, 14)
    c = shape[1]
    x = activation(shape, dtype, layout, seed=141)
    r = activation(shape, dtype, layout, seed=142)
    go = activation(shape, dtype, layout, seed=143, offset=0.0)
    w = per_channel(c, pdtype, 144, positive=True) if use_weight else None
    b = per_channel(c, pdtype, 145) if use_weight else None
    rm, rv = per_channel(c, pdtype, 146), per_channel(c, pdtype, 147, positive=True)
    on_gpu = _strided_channel_vector if strided else (lambda t: t)
    wc, bc = (None, None) if w is None else (on_gpu(w.cuda()), on_gpu(b.cuda()))
    rm_c, rv_c = on_gpu(rm.cuda()), on_gpu(rv.cuda())
    assert rm_c.is_contiguous() != strided

    gpu = ops.bn_act(x.cuda(), wc, bc, r.cuda(), rm_c, rv_c, MOMENTUM, EPS, True)
    cpu = ops.bn_act(x, w, b, r, rm, rv, MOMENTUM, EPS, True)
    for name, g, cpu_t in zip(("out", "save_mean", "save_invstd"), gpu, cpu):
        _assert_cuda_matches_cpu(g, cpu_t, name)
    _assert_cuda_matches_cpu(rm_c, rm, "running_mean")
    _assert_cuda_matches_cpu(rv_c, rv, "running_var")
    assert rm_c.dtype == pdtype and rm_c.is_contiguous() != strided  # updated where it lives

    gpu_grads = ops._bn_act_backward(go.cuda(), x.cuda(), wc, *gpu, True, [True] * 4)
    cpu_grads = ops._bn_act_backward(go, x, w, *(t.cpu() for t in gpu), True, [True] * 4)
    for name, g, cpu_t in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), gpu_grads, cpu_grads):
        n = x.numel() // c if name in ("grad_weight", "grad_bias") else 1
        _assert_cuda_matches_cpu(g, cpu_t, name, n)
    expected = pdtype if use_weight else torch.float32
    assert gpu_grads[1].dtype == gpu_grads[2].dtype == expected


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bn_act_large_mean_is_accurate(dtype, layout):
    """Mean 100, std 1, 4M values per channel: fp32 statistics stay within ~1e-5 of float64 (no cancellation)."""
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    g = torch.Generator(device="cuda").manual_seed(131)
    x = (torch.randn((64, 8, 256, 256), generator=g, device="cuda") + 100.0).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, invstd = ops.bn_act(x, None, None, None, None, None, MOMENTUM, EPS, False)
    xd = x.double()
    mean_ref = xd.mean(dim=(0, 2, 3))
    var_ref = xd.var(dim=(0, 2, 3), unbiased=False)
    del xd
    var = invstd.double().pow(-2) - EPS
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(var, var_ref, rtol=1e-5, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_cuda_conv_bn_act_matches_cpu(dtype, layout, case, relu):
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    x, w, b, r, stride, padding, dilation, groups = conv_inputs(case, dtype, layout, seed=111)
    conv = (stride, padding, dilation, groups)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions in full fp32
        _check_cuda_conv(dtype, layout, relu, x, w, b, r, conv)


def _check_cuda_conv(dtype, layout, relu, x, w, b, r, conv):
    out_gpu = ops.conv_bn_act(x.cuda(), w.cuda(), b.cuda(), r.cuda(), *conv, relu)
    assert_format(out_gpu, x)
    # Against the float64 reference: cuDNN and the CPU convolution differ too much in low precision to
    # compare them with each other tightly.
    assert_matches(out_gpu.cpu(), reference_conv(x, w, b, r, *conv, relu), "out", aten_conv=True)
    go = activation(tuple(out_gpu.shape), dtype, layout, seed=112, offset=0.0)
    for mask in ([True] * 4, [False, False, True, True], [True, True, False, False]):
        gpu_grads = ops._conv_bn_act_backward(go.cuda(), x.cuda(), w.cuda(), out_gpu, *conv, relu, mask)
        cpu_grads = ops._conv_bn_act_backward(go, x, w, out_gpu.cpu(), *conv, relu, mask)
        for name, g, cpu_t in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), gpu_grads,
                                  cpu_grads):
            assert g.device.type == "cuda"
            if cpu_t.numel() == 0:
                assert g.numel() == 0 and g.dtype == cpu_t.dtype, name
            elif name in ("grad_bias", "grad_residual"):
                _assert_cuda_matches_cpu(g, cpu_t, name)
            else:  # convolution backward itself: cuDNN vs CPU
                assert rel_l2(g.cpu(), cpu_t) <= (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4), name


def _cuda_kernels(fn) -> list[str]:
    """Names of the GPU kernels one call of fn launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_cuda_bn_act_two_launches_each_way(layout):
    """Statistics + apply forward, sums + dx backward: the per-channel merge runs in the reduction's last block."""
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    shape, c = (8, 64, 14, 14), 64
    x, r = activation(shape, torch.bfloat16, layout, seed=151).cuda(), activation(shape, torch.bfloat16, layout, seed=152).cuda()
    go = activation(shape, torch.bfloat16, layout, seed=153, offset=0.0).cuda()
    w, b = per_channel(c, torch.bfloat16, 154, positive=True).cuda(), per_channel(c, torch.bfloat16, 155).cuda()
    rm, rv = per_channel(c, torch.bfloat16, 156).cuda(), per_channel(c, torch.bfloat16, 157, positive=True).cuda()
    fwd = lambda: ops.bn_act(x, w, b, r, rm, rv, MOMENTUM, EPS, True)  # noqa: E731
    saved = fwd()  # the first call on a stream also zeroes its arrival counters
    assert len(_cuda_kernels(fwd)) == 2
    bwd = lambda: ops._bn_act_backward(go, x, w, *saved, True, [True] * 4)  # noqa: E731
    bwd()
    assert len(_cuda_kernels(bwd)) == 2


@pytest.mark.cuda
def test_cuda_bn_act_in_a_cuda_graph():
    """Captured once and replayed: every replay sees zeroed arrival counters, on the capture's private stream
    as well as after eager calls on the default one."""
    assert resfuse._C.with_cuda(), "the extension was built without its CUDA kernels"
    shape = (16, 32, 12, 12)
    x = activation(shape, torch.float32, "channels_last", seed=161).cuda()
    expected = ops.bn_act(x, None, None, None, None, None, MOMENTUM, EPS, True)
    static_x = torch.empty_like(x).copy_(x)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.bn_act(static_x, None, None, None, None, None, MOMENTUM, EPS, True)  # warm-up, as graphs ask
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = ops.bn_act(static_x, None, None, None, None, None, MOMENTUM, EPS, True)
    for _ in range(3):
        static_x.copy_(x)
        graph.replay()
        ops.bn_act(x * 2, None, None, None, None, None, MOMENTUM, EPS, True)  # eager calls in between
        torch.cuda.synchronize()
        for name, got, want in zip(("out", "save_mean", "save_invstd"), captured, expected):
            torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# resfuse::conv_bn_act_igemm: our implicit-GEMM tensor-core conv (CUDA; fp16/bf16, channels_last, groups 1,
# channel counts multiples of 8). (C_in, C_out, kernel, stride, H=W, dilation): every such conv of
# ResNet-18/34/50 at its stage size, then odd ones (few channels, odd sizes, 5x5, dilation 2).
IGEMM_CASES = [
    (64, 64, 3, 1, 56, 1), (64, 128, 3, 2, 56, 1), (64, 128, 1, 2, 56, 1), (128, 128, 3, 1, 28, 1),
    (128, 256, 3, 2, 28, 1), (128, 256, 1, 2, 28, 1), (256, 256, 3, 1, 14, 1), (256, 512, 3, 2, 14, 1),
    (512, 512, 3, 1, 7, 1), (64, 256, 1, 1, 56, 1), (256, 64, 1, 1, 56, 1), (256, 128, 1, 1, 56, 1),
    (256, 512, 1, 2, 56, 1), (128, 512, 1, 1, 28, 1), (512, 128, 1, 1, 28, 1), (512, 1024, 1, 2, 28, 1),
    (1024, 256, 1, 1, 14, 1), (256, 1024, 1, 1, 14, 1), (1024, 2048, 1, 2, 14, 1), (2048, 512, 1, 1, 7, 1),
    (512, 2048, 1, 1, 7, 1),
    (8, 24, 3, 1, 13, 1), (24, 40, 5, 2, 9, 1), (16, 8, 3, 1, 11, 2), (40, 72, 3, 2, 15, 2),
    (128, 264, 3, 1, 9, 1),  # the sm90 kernel's paired 128-wide N tiles with an odd count of them
]


@pytest.fixture(params=["igemm", "sm90"])
def igemm_op(request):
    """Each implicit-GEMM kernel with the epilogue inside: our WMMA one (sm_80+) and the CUTLASS Hopper one
    (sm_90, builds with CUTLASS's headers and sm_90a; skipped elsewhere, with the reason)."""
    if request.param == "sm90":
        reason = _sm90_reason()
        if reason is not None:
            pytest.skip(reason)
    return getattr(ops, "conv_bn_act_" + request.param)


def _sm90_reason():
    """Why resfuse::conv_bn_act_sm90 cannot run on this machine and build (None: it can)."""
    import resfuse

    if torch.cuda.get_device_capability() != (9, 0):
        return "resfuse::conv_bn_act_sm90 runs on sm_90 GPUs only"
    reason = resfuse._loader.extension.sm90_build_reason()
    return None if reason is None else f"resfuse::conv_bn_act_sm90 is not in {reason}"


def _igemm_problem(case, dtype, seed, batch=4):
    cin, cout, k, stride, size, dil = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, size, size, generator=g).to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype).cuda()
    w = w.contiguous(memory_format=torch.channels_last)
    b = (torch.randn(cout, generator=g) * 0.1).to(dtype).cuda()
    conv = dict(stride=[stride] * 2, padding=[k // 2 * dil] * 2, dilation=[dil] * 2)
    out_shape = F.conv2d(x[:1].float(), w.float(), None, **conv).shape[1:]
    r = torch.randn(batch, *out_shape, generator=g).to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    return x, w, b, r, conv


def _conv_epilogue(x, w, b, r, conv, relu):
    y = F.conv2d(x, w, None, **conv)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", IGEMM_CASES, ids=str)
def test_cuda_conv_bn_act_igemm_within_twice_torch_error(igemm_op, case, dtype):
    """Against a float64 reference: no more than twice the error of PyTorch's own conv + epilogue in dtype."""
    x, w, b, r, conv = _igemm_problem(case, dtype, seed=sum(case))
    ours = igemm_op(x, w, b, r, conv["stride"], conv["padding"], conv["dilation"], 1, True)
    assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == dtype
    ref = _conv_epilogue(x.double(), w.double(), b.double(), r.double(), conv, True)
    torch_err = rel_l2(_conv_epilogue(x, w, b, r, conv, True), ref)
    err = rel_l2(ours, ref)
    assert err <= 2 * torch_err, f"relative L2 error {err:.3g} > 2 x torch's {torch_err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("use_bias,use_residual,relu", list(itertools.product([False, True], repeat=3)))
def test_cuda_conv_bn_act_igemm_epilogue_options(igemm_op, use_bias, use_residual, relu):
    x, w, b, r, conv = _igemm_problem((24, 40, 3, 2, 9, 1), torch.bfloat16, seed=171)
    b, r = (b if use_bias else None), (r if use_residual else None)
    ours = igemm_op(x, w, b, r, conv["stride"], conv["padding"], conv["dilation"], 1, relu)
    ref = _conv_epilogue(x.double(), w.double(), None if b is None else b.double(), None if r is None else r.double(),
                         conv, relu)
    assert rel_l2(ours, ref) <= 1e-2


@pytest.mark.cuda
def test_cuda_conv_bn_act_igemm_refuses_what_it_does_not_take(igemm_op):
    x, w, b, r, conv = _igemm_problem((24, 40, 3, 1, 9, 1), torch.bfloat16, seed=172)
    args = (conv["stride"], conv["padding"], conv["dilation"])
    with pytest.raises(RuntimeError, match="does not take"):
        igemm_op(x[:, :3].contiguous(memory_format=torch.channels_last), w[:, :3], b, None, *args, 1, True)
    with pytest.raises(RuntimeError, match="does not take"):
        igemm_op(x.float(), w.float(), b.float(), None, *args, 1, True)
    with pytest.raises(RuntimeError, match="does not take"):
        igemm_op(x.contiguous(), w, b, None, *args, 1, True)


@pytest.mark.cuda
def test_cuda_conv_bn_act_igemm_opcheck_and_gradients(igemm_op):
    x, w, b, r, conv = _igemm_problem((16, 24, 3, 1, 10, 1), torch.bfloat16, seed=173, batch=2)
    args = (x, w, b, r, conv["stride"], conv["padding"], conv["dilation"], 1, True)
    torch.library.opcheck(igemm_op.default, args)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, r)]
    ours = igemm_op(*leaves, *args[4:])
    go = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, leaves, go)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    ref = _conv_epilogue(*ref_leaves, conv, True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for name, g, e in zip(("x", "weight", "bias", "residual"), grads, ref_grads):
        assert rel_l2(g, e) <= 2e-2, name


@pytest.mark.cuda
def test_cuda_backend_takes_igemm_when_asked(monkeypatch):
    """RESFUSE_CUDA_CONV=igemm sends the cuda backend's eval convs to the kernel (one launch), =aten to cuDNN."""
    import resfuse

    x, w, b, r, conv = _igemm_problem((64, 64, 3, 1, 14, 1), torch.bfloat16, seed=174)
    run = lambda: resfuse.ops.conv_bn_act(x, w, b, r, 1, 1, 1, 1, True, backend="cuda")  # noqa: E731
    monkeypatch.setenv("RESFUSE_CUDA_CONV", "igemm")
    run()
    kernels = _cuda_kernels(run)
    assert len(kernels) == 1 and "conv_igemm_kernel" in kernels[0], kernels
    monkeypatch.setenv("RESFUSE_CUDA_CONV", "aten")
    assert not any("conv_igemm_kernel" in k for k in _cuda_kernels(run))


@pytest.mark.cuda
def test_cuda_backend_takes_sm90_when_asked(monkeypatch):
    """RESFUSE_CUDA_CONV=sm90 sends the cuda backend's eval convs to the CUTLASS Hopper kernel (one launch)."""
    import resfuse

    x, w, b, r, conv = _igemm_problem((64, 64, 3, 1, 14, 1), torch.bfloat16, seed=175)
    reason = _sm90_reason()
    if reason is not None:
        pytest.skip(reason)
    run = lambda: resfuse.ops.conv_bn_act(x, w, b, r, 1, 1, 1, 1, True, backend="cuda")  # noqa: E731
    monkeypatch.setenv("RESFUSE_CUDA_CONV", "sm90")
    out = run()
    kernels = _cuda_kernels(run)
    assert len(kernels) == 1 and "ConvUniversal" in kernels[0], kernels
    ref = _conv_epilogue(x.double(), w.double(), b.double(), r.double(), conv, True)
    assert rel_l2(out, ref) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["igemm", "sm90"])
def test_a_named_kernel_that_cannot_run_says_why(monkeypatch, kernel):
    """RESFUSE_CUDA_CONV=<kernel> never runs another implementation: a call the kernel does not take (fp32,
    NCHW, grouped) raises, naming the variable and the reason."""
    import resfuse

    x, w, b, r, conv = _igemm_problem((24, 40, 3, 1, 9, 1), torch.bfloat16, seed=176)
    monkeypatch.setenv("RESFUSE_CUDA_CONV", kernel)
    with pytest.raises(RuntimeError, match=f"RESFUSE_CUDA_CONV={kernel}: .*does not take this call"):
        resfuse.ops.conv_bn_act(x.float(), w.float(), b.float(), None, 1, 1, 1, 1, True, backend="cuda")


@pytest.mark.cuda
def test_the_default_cuda_conv_takes_a_correct_path_for_every_call(monkeypatch):
    """Unset RESFUSE_CUDA_CONV: the cuda backend runs the Hopper kernel where it takes the call and ATen's conv
    everywhere else, including what only CUTLASS or the 2^31 limit refuses, and never raises for a valid conv."""
    import resfuse

    monkeypatch.delenv("RESFUSE_CUDA_CONV", raising=False)
    for case, dtype, layout in (((24, 40, 3, 1, 9, 1), torch.bfloat16, torch.channels_last),
                                ((24, 40, 3, 1, 9, 1), torch.float32, torch.contiguous_format),
                                ((6, 10, 3, 2, 9, 1), torch.float16, torch.channels_last)):
        x, w, b, r, conv = _igemm_problem(case, dtype, seed=177)
        x, r = x.contiguous(memory_format=layout), r.contiguous(memory_format=layout)
        out = resfuse.ops.conv_bn_act(x, w, b, r, conv["stride"], conv["padding"], conv["dilation"], 1, True,
                                      backend="cuda")
        ref = _conv_epilogue(x.double(), w.double(), b.double(), r.double(), conv, True)
        assert rel_l2(out, ref) <= 1e-2, (case, dtype)
