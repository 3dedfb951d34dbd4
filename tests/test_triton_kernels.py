"""Triton kernels of resfuse against a float64 PyTorch reference.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (small shapes, so the file stays fast);
the tests marked `cuda` run the ResNet stage shapes on a real GPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # triton reads this when the kernels are decorated, i.e. at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from resfuse.triton_kernels import (  # noqa: E402
    bn_act_bwd,
    bn_act_fwd,
    conv_epilogue_bwd,
)
from resfuse.triton_kernels import INTERPRETING as INTERPRET  # noqa: E402

pytestmark = pytest.mark.triton

DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

SHAPES = [(2, 3, 5, 7), (3, 5, 9, 11), (2, 64, 4, 4), (4, 8, 1, 1), (1, 7, 1, 3)]
LAYOUTS = ["nchw", "channels_last", "strided"]
# Relative L2 error bounds for half types (the reference is float64 and exact by comparison).
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---------------------------------------------------------------------------------------------------- helpers


def make(shape, dtype, layout, device=DEV, scale=1.0, offset=0.0, seed=0):
    """A random activation in the given layout; 'strided' is a non-contiguous view of a bigger tensor."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        n, c, h, w = shape
        base = torch.randn((n, c + 1, h, 2 * w), generator=g, dtype=torch.float64)
        t = (base * scale + offset).to(dtype=dtype, device=device)[:, 1:, :, ::2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        return t
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype=dtype, device=device)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def vec(c, dtype, device=DEV, seed=1, positive=False):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if positive else torch.randn(c, generator=g,
                                                                                         dtype=torch.float64)
    return v.to(dtype=dtype, device=device)


def expected_format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check(actual, expected, dtype=None):
    """fp32/fp64: assert_close defaults; half types: relative L2 error."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape
    if dtype in HALF_TOL:
        a, e = actual.double(), expected.double()
        err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert err <= HALF_TOL[dtype], f"relative L2 error {err:.3e} > {HALF_TOL[dtype]:.1e}"
    else:
        torch.testing.assert_close(actual, expected.to(actual.dtype))


def reference(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    """float64 reference via F.batch_norm in training mode; returns (out, xd, wd, bd, rd, rm, rv) with leaves."""
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_() if weight is not None else None
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    rd = residual.detach().double().requires_grad_() if residual is not None else None
    rm = running_mean.detach().double().clone() if running_mean is not None else None
    rv = running_var.detach().double().clone() if running_var is not None else None
    y = F.batch_norm(xd, rm, rv, wd, bd, True, momentum, eps)
    if rd is not None:
        y = y + rd
    if relu:
        y = F.relu(y)
    return y, xd, wd, bd, rd, rm, rv


def run_bn(shape, dtype, layout, *, affine=True, residual=True, relu=True, running=True, param_dtype=None,
           mask=(True, True, True, True), device=DEV, momentum=0.1, eps=1e-5, offset=0.5, scale=2.0):
    """Forward + backward of the Triton op against the float64 reference."""
    C = shape[1]
    param_dtype = param_dtype or dtype
    x = make(shape, dtype, layout, device, scale=scale, offset=offset, seed=0)
    w = vec(C, param_dtype, device, seed=1) if affine else None
    b = vec(C, param_dtype, device, seed=2) if affine else None
    r = make(shape, dtype, layout, device, seed=3) if residual else None
    stat_dtype = param_dtype if param_dtype != dtype or dtype == torch.float64 else torch.float32
    rm = vec(C, stat_dtype, device, seed=4) if running else None
    rv = vec(C, stat_dtype, device, seed=5, positive=True) if running else None
    ref, xd, wd, bd, rd, rm_ref, rv_ref = reference(x, w, b, r, rm, rv, momentum, eps, relu)

    out, save_mean, save_invstd = bn_act_fwd(x, w, b, r, rm, rv, momentum, eps, relu)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=expected_format(x))
    assert save_mean.dtype == acc and save_invstd.dtype == acc and save_mean.shape == (C,)
    check(out, ref, dtype)
    xs = x.double()
    mean = xs.mean(dim=(0, 2, 3))
    var = xs.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(save_mean, mean.to(acc))
    torch.testing.assert_close(save_invstd, (1.0 / torch.sqrt(var + eps)).to(acc))
    if running:
        assert rm.dtype == stat_dtype and rv.dtype == stat_dtype
        check(rm, rm_ref, rm.dtype)
        check(rv, rv_ref, rv.dtype)

    go = make(shape, dtype, layout, device, seed=6)
    ref.backward(go.double())
    grads = bn_act_bwd(go, x, w, out, save_mean, save_invstd, relu, list(mask))
    g = go.double() * (ref.detach() > 0) if relu else go.double()
    xhat = (xs - mean[None, :, None, None]) * torch.rsqrt(var + eps)[None, :, None, None]
    ref_grads = [
        xd.grad,
        wd.grad if wd is not None else (g * xhat).sum(dim=(0, 2, 3)),  # implicit w = 1
        bd.grad if bd is not None else g.sum(dim=(0, 2, 3)),  # implicit b = 0
        rd.grad if rd is not None else g,
    ]
    gdt = [dtype, w.dtype if w is not None else torch.float32, w.dtype if w is not None else torch.float32, dtype]
    for k in range(4):
        assert grads[k].dtype == gdt[k], (k, grads[k].dtype, gdt[k])
        if not mask[k]:
            assert grads[k].numel() == 0
            continue
        if k in (0, 3):
            assert grads[k].is_contiguous(memory_format=expected_format(x))
        check(grads[k], ref_grads[k], grads[k].dtype)
    return out


# ---------------------------------------------------------------------------------------------------- bn_act


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_act_fp32_shapes_layouts(shape, layout):
    run_bn(shape, torch.float32, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (2, 64, 4, 4)])
def test_bn_act_dtypes(shape, dtype, layout):
    run_bn(shape, dtype, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine,residual,relu,running", [
    (False, False, False, False),
    (True, False, True, False),
    (False, True, False, True),
    (True, True, False, False),
    (False, False, True, True),
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_act_flags(affine, residual, relu, running, dtype, layout):
    run_bn((2, 3, 5, 7), dtype, layout, affine=affine, residual=residual, relu=relu, running=running)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_act_half_input_fp32_params(dtype):
    """Mixed precision: half activations, float32 weight/bias/running stats (the usual AMP setup)."""
    run_bn((2, 6, 5, 5), dtype, "channels_last", param_dtype=torch.float32)


@pytest.mark.parametrize("mask", [
    (True, False, False, False),
    (False, True, True, False),
    (False, False, False, True),
    (False, True, False, False),
    (False, False, True, True),
    (True, False, True, True),
    (False, False, False, False),
])
def test_bn_act_output_mask(mask):
    run_bn((2, 3, 5, 7), torch.float32, "nchw", mask=mask)
    run_bn((2, 3, 5, 7), torch.float64, "channels_last", mask=mask, affine=False)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_act_large_mean_fp32(layout):
    """|mean| >> std: a naive E[x^2] - E[x]^2 in fp32 would lose every digit of the variance."""
    x = make((4, 5, 12, 12), torch.float32, layout, scale=1.0, offset=3000.0)
    out, mean, invstd = bn_act_fwd(x, None, None, None, None, None, 0.1, 1e-5, False)
    xs = x.double()
    var = xs.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, xs.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(invstd, (1 / torch.sqrt(var + 1e-5)).float(), rtol=1e-4, atol=0)
    ref = F.batch_norm(xs, None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(out, ref.float(), rtol=1e-3, atol=1e-3)


def test_bn_act_strided_running_stats_and_momentum():
    """Running stats as strided views are updated in place, through their strides."""
    x = make((3, 4, 3, 5), torch.float32, "nchw")
    buf_m, buf_v = torch.zeros(8, device=DEV), torch.ones(8, device=DEV)
    rm, rv = buf_m[::2], buf_v[1::2]
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    bn_act_fwd(x, None, None, None, rm, rv, 0.3, 1e-3, True)
    F.batch_norm(x.double(), rm_ref, rv_ref, None, None, True, 0.3, 1e-3)
    torch.testing.assert_close(rm, rm_ref.float())
    torch.testing.assert_close(rv, rv_ref.float())
    torch.testing.assert_close(buf_m[1::2], torch.zeros(4, device=DEV))  # untouched
    torch.testing.assert_close(buf_v[::2], torch.ones(4, device=DEV))


def test_bn_act_single_value_per_channel():
    x = make((1, 3, 1, 1), torch.float32, "nchw")
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        bn_act_fwd(x, None, None, None, torch.zeros(3, device=DEV), torch.ones(3, device=DEV), 0.1, 1e-5, False)
    # Without running_var it is allowed: var = 0, out = shift.
    out, mean, invstd = bn_act_fwd(x, None, None, None, None, None, 0.1, 1e-5, False)
    torch.testing.assert_close(mean, x.reshape(3))
    torch.testing.assert_close(out, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 3, 3), (2, 3, 0, 5)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_act_empty(shape, layout):
    x = torch.empty(shape, device=DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    rm, rv = torch.full((C,), 2.0, device=DEV), torch.full((C,), 3.0, device=DEV)
    out, mean, invstd = bn_act_fwd(x, torch.ones(C, device=DEV), torch.zeros(C, device=DEV), torch.empty_like(x), rm, rv, 0.1, 1e-5, True)
    assert out.shape == x.shape and mean.shape == (C,) and invstd.shape == (C,)
    assert torch.all(rm == 2.0) and torch.all(rv == 3.0)
    gi, gw, gb, gr = bn_act_bwd(torch.empty_like(x), x, torch.ones(C, device=DEV), out, mean, invstd, True, [True] * 4)
    assert gi.shape == x.shape and gr.shape == x.shape
    assert gw.shape == (C,) and gb.shape == (C,) and torch.all(gw == 0) and torch.all(gb == 0)
    gi, gw, gb, gr = bn_act_bwd(torch.empty_like(x), x, None, out, mean, invstd, False, [False] * 4)
    assert all(t.numel() == 0 for t in (gi, gw, gb, gr)) and gw.dtype == torch.float32


def test_bn_act_deterministic():
    x = make((3, 5, 9, 11), torch.float32, "channels_last")
    a = bn_act_fwd(x, None, None, None, None, None, 0.1, 1e-5, True)
    b = bn_act_fwd(x, None, None, None, None, None, 0.1, 1e-5, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _launches(fn, monkeypatch) -> list[str]:
    """Names of the Triton kernels one call of fn launches (the interpreter's runs, or the GPU's kernels)."""
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        names = []
        run = InterpretedFunction.run

        def counting_run(self, *args, **kwargs):
            names.append(self.fn.__name__)
            return run(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counting_run)
        fn()
        monkeypatch.setattr(InterpretedFunction, "run", run)
        return names
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_act_two_launches_each_way(layout, monkeypatch):
    """Statistics + apply forward, sums + dx backward: each channel block's last program merges the partials."""
    shape = (3, 5, 9, 11)
    x, r, go = make(shape, torch.float32, layout), make(shape, torch.float32, layout, seed=3), make(shape, torch.float32, layout, seed=4)
    w, b = vec(5, torch.float32, positive=True), vec(5, torch.float32, seed=2)
    rm, rv = vec(5, torch.float32, seed=5), vec(5, torch.float32, seed=6, positive=True)
    saved = bn_act_fwd(x, w, b, r, rm, rv, 0.1, 1e-5, True)  # the first call on a stream zeroes its counters
    assert len(_launches(lambda: bn_act_fwd(x, w, b, r, rm, rv, 0.1, 1e-5, True), monkeypatch)) == 2
    assert len(_launches(lambda: bn_act_bwd(go, x, w, *saved, True, [True] * 4), monkeypatch)) == 2


def test_bn_act_more_channel_blocks_than_counters():
    """Enough channel blocks to outgrow the cached arrival counters: the statistics stay right before, across
    and after the growth."""
    from resfuse.triton_kernels import bn_act as bn_mod

    bn_mod._counters.clear()
    for c in (3, 2100, 5):  # 2100 channels: hundreds of channel blocks
        x = make((2, c, 1, 3), torch.float32, "nchw", seed=c)
        out, mean, invstd = bn_act_fwd(x, None, None, None, None, None, 0.1, 1e-5, False)
        xd = x.double()
        torch.testing.assert_close(mean.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        var = xd.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("C,H", [(64, 112), (64, 56), (128, 28), (256, 14), (512, 7), (1024, 14), (2048, 7)])
def test_launch_configs_for_resnet_widths_on_an_h100(C, H, monkeypatch):
    """The GPU tiling rules, computed without a GPU for an H100's 132 SMs (NHWC, N=128): tiles of at most 2K
    elements, elementwise rows of 64 channels, and reductions whose last program merges its channel block's
    partials in at most 5 steps (triton_kernels/bn_act.py, _launch_config)."""
    from resfuse.triton_kernels import bn_act as bn_mod

    monkeypatch.setattr(bn_mod, "_sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)  # only its type is read
    elementwise = bn_mod._launch_config(128 * H * H, C, 1, gpu, False, False)
    reduction = bn_mod._launch_config(128 * H * H, C, 1, gpu, False, True)
    for cfg in (elementwise, reduction):
        assert cfg.channels_last and cfg.BLOCK_R * cfg.BLOCK_C <= 2048 and cfg.BLOCK_P * cfg.BLOCK_C <= 2048
        assert cfg.n_parts * cfg.c_blocks <= 4 * 132  # one wave of 4 programs per SM
    assert elementwise.BLOCK_C == 64
    assert -(-reduction.n_parts // reduction.BLOCK_P) <= 5, reduction


# ---------------------------------------------------------------------------------------------------- epilogue


def epilogue_reference(conv_out, bias, residual, relu):
    y = conv_out.double()
    if bias is not None:
        y = y + bias.double()[None, :, None, None]
    if residual is not None:
        y = y + residual.double()
    return F.relu(y) if relu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("has_bias,has_res,relu", [(True, True, True), (True, False, False), (False, True, True),
                                                   (False, False, False)])
def test_conv_epilogue_backward(dtype, layout, has_bias, has_res, relu):
    shape = (2, 5, 4, 6)
    y = make(shape, dtype, layout, seed=0)
    bias = vec(5, dtype, seed=1) if has_bias else None
    res = make(shape, dtype, layout, seed=2) if has_res else None
    # the forward epilogue's output (computed inside the conv kernel), here from the reference, in y's layout
    out = epilogue_reference(y, bias, res, relu).to(dtype).contiguous(memory_format=expected_format(y))

    go = make(shape, dtype, layout, seed=3)
    g_ref = go.double() * (out.double() > 0) if relu else go.double()
    for bias_dtype in (torch.float32, dtype):
        g, gb = conv_epilogue_bwd(go, out, relu, True, bias_dtype=bias_dtype)
        assert g.dtype == dtype and g.is_contiguous(memory_format=expected_format(out))
        assert gb.dtype == bias_dtype and gb.shape == (5,)
        check(g, g_ref, dtype)
        check(gb, g_ref.sum(dim=(0, 2, 3)), bias_dtype if bias_dtype in HALF_TOL else dtype)
    g, gb = conv_epilogue_bwd(go, out, relu, False, bias_dtype=torch.float16)
    assert gb.numel() == 0 and gb.dtype == torch.float16
    check(g, g_ref, dtype)


def test_conv_epilogue_backward_empty():
    y = torch.empty(0, 4, 3, 3, device=DEV)
    g, gb = conv_epilogue_bwd(torch.empty_like(y), y, True, True)
    assert g.shape == y.shape and gb.shape == (4,) and torch.all(gb == 0)


# ---------------------------------------------------------------------------------------------------- GPU

RESNET_STAGES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _gpu_check(actual, expected, dtype):
    # Over a million elements fp32 rounding (and the reduction order vs cuDNN's) is not assert_close-tight
    # elementwise; relative L2 is the meaningful measure at this size.
    tol = HALF_TOL.get(dtype, 1e-5)
    err = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= tol, f"relative L2 error {err:.3e} > {tol:.1e}"


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", RESNET_STAGES)
def test_gpu_bn_act_resnet_stages(shape, dtype, layout):
    C = shape[1]
    x = make(shape, dtype, layout, "cuda", scale=2.0, offset=0.5)
    r = make(shape, dtype, layout, "cuda", seed=3)
    w = vec(C, torch.float32, "cuda", seed=1)
    b = vec(C, torch.float32, "cuda", seed=2)
    rm, rv = vec(C, torch.float32, "cuda", seed=4), vec(C, torch.float32, "cuda", seed=5, positive=True)
    ref, xd, wd, bd, rd, rm_ref, rv_ref = reference(x, w, b, r, rm, rv, 0.1, 1e-5, True)
    out, mean, invstd = bn_act_fwd(x, w, b, r, rm, rv, 0.1, 1e-5, True)
    assert out.is_contiguous(memory_format=expected_format(x))
    _gpu_check(out, ref, dtype)
    xs = x.double()
    torch.testing.assert_close(mean, xs.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(invstd, (1 / torch.sqrt(xs.var(dim=(0, 2, 3), unbiased=False) + 1e-5)).float())
    torch.testing.assert_close(rm, rm_ref.float())
    torch.testing.assert_close(rv, rv_ref.float())
    go = make(shape, dtype, layout, "cuda", seed=6)
    ref.backward(go.double())
    gi, gw, gb, gr = bn_act_bwd(go, x, w, out, mean, invstd, True, [True] * 4)
    _gpu_check(gi, xd.grad, dtype)
    _gpu_check(gw, wd.grad, torch.float32 if dtype == torch.float32 else dtype)
    _gpu_check(gb, bd.grad, torch.float32 if dtype == torch.float32 else dtype)
    _gpu_check(gr, rd.grad, dtype)
    # Deterministic: same bits on a second run.
    out2, mean2, invstd2 = bn_act_fwd(x, w, b, r, None, None, 0.1, 1e-5, True)
    assert torch.equal(out, out2) and torch.equal(mean, mean2) and torch.equal(invstd, invstd2)
    assert all(torch.equal(u, v) for u, v in zip((gi, gw, gb, gr),
                                                  bn_act_bwd(go, x, w, out, mean, invstd, True, [True] * 4)))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", RESNET_STAGES)
def test_gpu_conv_epilogue_backward_resnet_stages(shape, dtype, layout):
    C = shape[1]
    y = make(shape, dtype, layout, "cuda")
    res = make(shape, dtype, layout, "cuda", seed=2)
    bias = vec(C, dtype, "cuda", seed=1)
    out = epilogue_reference(y, bias, res, True).to(dtype).contiguous(memory_format=expected_format(y))
    go = make(shape, dtype, layout, "cuda", seed=3)
    g, gb = conv_epilogue_bwd(go, out, True, True, bias_dtype=dtype)
    g_ref = go.double() * (out.double() > 0)
    _gpu_check(g, g_ref, dtype)
    _gpu_check(gb, g_ref.sum(dim=(0, 2, 3)), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("shape,layout", [((64, 4, 640, 640), "nchw"), ((64, 64, 160, 160), "channels_last")])
def test_gpu_bn_act_statistics_100m_elements(shape, layout):
    """~100M elements per call, mean far from zero: the shifted sums and the merges must keep fp32 statistics
    accurate (NHWC at C = 64: the reductions' 32-channel tiles, two channel blocks)."""
    x = (torch.randn(shape, device="cuda") * 0.5 + 20.0).to(torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    _, mean, invstd = bn_act_fwd(x, None, None, None, rm, rv, 1.0, 1e-5, False)
    xs = x.double()
    m = xs.mean(dim=(0, 2, 3))
    v = xs.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, m.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd, (1 / torch.sqrt(v + 1e-5)).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(rv, (v * x[:, 0].numel() / (x[:, 0].numel() - 1)).float(), rtol=1e-5, atol=0)
