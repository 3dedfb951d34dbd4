"""Properties of the C++ CPU kernels (csrc/cpu) that the op-level tests do not pin down.

The loops (csrc/cpu/channel_loops.cpp) take 16 elements per vector step (channels of an NHWC row, positions of
an NCHW plane) and the rest in a scalar loop; the shapes here put channel counts and plane sizes below, at and past
multiples of 16. The backward's first pass writes grad_residual and its second reads it back, or not, depending
on which outputs are asked for. Reductions must give the same bits at any thread count.
"""
from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("resfuse._C") is None:
    pytest.skip("the resfuse._C extension is not built (RESFUSE_SKIP_CSRC=1?)", allow_module_level=True)

import resfuse._C  # noqa: E402,F401  (registers the C++ kernels)

ops = torch.ops.resfuse
MOMENTUM, EPS = 0.1, 1e-5
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SHAPES = [
    (2, 37, 5, 7),  # NHWC rows: 2 vectors + 5 channels; NCHW planes of 35: 2 vectors + 3
    (3, 16, 4, 4),  # exactly one vector either way
    (2, 17, 3, 3),  # NCHW planes of 9: the scalar loop only; NHWC: 1 vector + 1
    (4, 48, 14, 14),  # > 32768 elements: several reduction chunks (NHWC) and channel ranges (NCHW)
]


def make(shape, dtype, layout, seed, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return t.to(dtype).contiguous(memory_format=LAYOUTS[layout])


def vector(c, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if positive else torch.randn(c, generator=g,
                                                                                                dtype=torch.float64)


def reference(x, w, b, r, relu, grad_out):
    """float64 autograd through F.batch_norm: (out, mean, invstd, grad_input, grad_weight, grad_bias, grad_residual)."""
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    rd = (torch.zeros_like(xd) if r is None else r.double()).requires_grad_()
    y = F.batch_norm(xd, None, None, wd, bd, training=True, eps=EPS) + rd
    if relu:
        y = F.relu(y)
    y.backward(grad_out.double())
    mean = xd.detach().mean(dim=(0, 2, 3))
    invstd = (xd.detach().var(dim=(0, 2, 3), unbiased=False) + EPS).rsqrt()
    return y.detach(), mean, invstd, xd.grad, wd.grad, bd.grad, (None if r is None else rd.grad)


def run(x, w, b, r, relu, grad_out, mask=(True, True, True, True)):
    out, mean, invstd = ops.bn_act(x, w, b, r, None, None, MOMENTUM, EPS, relu)
    mask = list(mask)
    mask[3] = mask[3] and r is not None
    grads = ops._bn_act_backward(grad_out, x, w, out, mean, invstd, relu, mask)
    return (out, mean, invstd) + tuple(grads)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu,use_residual", [(True, True), (True, False), (False, True)])
def test_vector_steps_and_tails_match_float64(shape, layout, dtype, relu, use_residual):
    c = shape[1]
    x = make(shape, dtype, layout, 1, offset=0.3, scale=2.0)
    r = make(shape, dtype, layout, 2) if use_residual else None
    w, b = vector(c, 3, positive=True).to(dtype), vector(c, 4).to(dtype)
    grad_out = make(shape, dtype, layout, 5)

    got = run(x, w, b, r, relu, grad_out)
    expected = reference(x, w, b, r, relu, grad_out)
    names = ("out", "save_mean", "save_invstd", "grad_input", "grad_weight", "grad_bias", "grad_residual")
    for name, a, e in zip(names, got, expected):
        if e is None:
            continue
        torch.testing.assert_close(a, e.to(a.dtype), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mask", [m for m in itertools.product([False, True], repeat=4) if any(m)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
def test_backward_passes_for_each_output_mask(mask, layout, relu):
    """Whichever outputs are asked for (and so whether the second pass reads g back from grad_residual or masks
    grad_out again), each one has the bits of the all-outputs call."""
    shape = (2, 37, 5, 7)
    x, r = make(shape, torch.float32, layout, 11), make(shape, torch.float32, layout, 12)
    w, b = vector(37, 13, positive=True).float(), vector(37, 14).float()
    grad_out = make(shape, torch.float32, layout, 15)
    full = run(x, w, b, r, relu, grad_out)[3:]
    got = run(x, w, b, r, relu, grad_out, mask)[3:]
    for name, asked, g, f in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), mask, got, full):
        if asked:
            torch.testing.assert_close(g, f, rtol=0, atol=0, msg=name)
        else:
            assert g.numel() == 0, name


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_at_any_thread_count(layout, dtype, restore_threads):
    """Sums are added in an order fixed by the shape: 1, 2 or 3 threads give identical results (a training run
    is reproducible on another machine size)."""
    shape = (8, 48, 20, 20)  # 153600 elements: 5 reduction chunks (NHWC), 48 channels over the threads (NCHW)
    x = make(shape, dtype, layout, 21, offset=1.0, scale=3.0)
    r = make(shape, dtype, layout, 22)
    w, b = vector(48, 23, positive=True).to(dtype), vector(48, 24).to(dtype)
    grad_out = make(shape, dtype, layout, 25)
    conv_w = (vector(48 * 48 * 9, 26) * 0.05).to(dtype).view(48, 48, 3, 3)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        rm, rv = torch.zeros(48, dtype=dtype), torch.ones(48, dtype=dtype)
        out, mean, invstd = ops.bn_act(x, w, b, r, rm, rv, MOMENTUM, EPS, True)
        grads = ops._bn_act_backward(grad_out, x, w, out, mean, invstd, True, [True] * 4)
        conv_out = ops.conv_bn_act(x, conv_w, b, None, [1, 1], [1, 1], [1, 1], 1, True)
        conv_grads = ops._conv_bn_act_backward(grad_out, x, conv_w, conv_out, [1, 1], [1, 1], [1, 1], 1, True,
                                               [False, False, True, False])
        results.append((out, mean, invstd, rm, rv) + tuple(grads) + (conv_grads[2],))
    for threads, other in zip((2, 3), results[1:]):
        for i, (a, b1) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b1), f"output {i} differs between 1 and {threads} threads"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_keeps_the_variance(layout):
    """|mean| / std = 1e6 in float64: E[x^2] - E[x]^2 on raw values would lose 12 of 16 digits; the kernels'
    sums are shifted by a sample of the channel, and keep the float64 tolerance."""
    shape = (4, 32, 6, 6)
    x = make(shape, torch.float64, layout, 31, offset=1e6)
    w, b = vector(32, 32, positive=True), vector(32, 33)
    grad_out = make(shape, torch.float64, layout, 34)
    got = run(x, w, b, None, False, grad_out)
    expected = reference(x, w, b, None, False, grad_out)
    for name, a, e in zip(("out", "save_mean", "save_invstd", "grad_input", "grad_weight"), got, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


def rel_l2(a, e):
    return ((a.double() - e.double()).norm() / e.double().norm()).item()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_float32_within_twice_eager_error(layout):
    """float32 with |mean| / std = 1000: every output within twice eager's own float32 error (plus a floor), and
    the forward's output within 1e-6: the elementwise pass subtracts the mean rounded to float, and its shift
    takes the rounding back in double (eager's output carries it: ~1e-5 here)."""
    shape = (4, 32, 10, 10)
    x = make(shape, torch.float32, layout, 35, offset=1000.0)
    w, b = vector(32, 36, positive=True).float(), vector(32, 37).float()
    grad_out = make(shape, torch.float32, layout, 38)
    got = run(x, w, b, None, True, grad_out)
    expected = reference(x, w, b, None, True, grad_out)
    xe, we, be = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    ye = F.relu(F.batch_norm(xe, None, None, we, be, training=True, eps=EPS))
    ye.backward(grad_out)
    eager = (ye, None, None, xe.grad, we.grad, be.grad)
    for name, a, e, t in zip(("out", "mean", "invstd", "grad_input", "grad_weight", "grad_bias"), got, expected,
                             eager):
        bound = 1e-6 if t is None or name == "out" else 2 * rel_l2(t, e) + 1e-6
        assert rel_l2(a, e) <= bound, f"{name}: {rel_l2(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_where_it_is_in_the_vector_step(layout):
    shape = (2, 32, 4, 4)
    x, r = make(shape, torch.float32, layout, 41), make(shape, torch.float32, layout, 42)
    r[1, 20, 2, 3] = float("nan")
    out, _, _ = ops.bn_act(x, None, None, r, None, None, MOMENTUM, EPS, True)
    assert torch.isnan(out[1, 20, 2, 3]) and torch.isnan(out).sum() == 1


def _special_outputs(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "residual"])
def test_special_values_in_vector_steps_and_tails_as_eager(layout, dtype, value, where):
    """NaN and +-Inf in a vector lane and in a tail element (shape (2, 37, 5, 7): NHWC rows of 2 vectors + 5
    channels, NCHW planes of 2 vectors + 3) come out where eager's BN + add + ReLU puts them, forward and backward:
    the variance keeps NaN, and the backward's ReLU mask is `out <= 0 ? 0 : g` (where out is NaN the gradient
    passes, as in torch's threshold_backward)."""
    import resfuse.ops

    shape = (2, 37, 5, 7)
    x = make(shape, dtype, layout, 51, offset=0.3)
    r = make(shape, dtype, layout, 52)
    poked = x if where == "input" else r
    with torch.no_grad():
        poked[1, 5, 1, 2] = value  # NHWC: channel 5 is in the first vector; NCHW: position 9 of the plane, too
        poked[0, 35, 4, 6] = value  # NHWC: channel 35 is in the tail; NCHW: position 34 of the plane, too
    w, b = vector(37, 53, positive=True).to(dtype), vector(37, 54).to(dtype)
    grad_out = make(shape, dtype, layout, 55)
    ours = _special_outputs(lambda *a: resfuse.ops.bn_act(*a, backend="cuda"), (x, w, b, r), grad_out)
    eager = _special_outputs(lambda x, w, b, r: torch.relu(F.batch_norm(x, None, None, w, b, True, eps=EPS) + r),
                             (x, w, b, r), grad_out)
    for name, a, e in zip(("out", "grad_input", "grad_weight", "grad_bias", "grad_residual"), ours, eager):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(a), kind(e)), f"{name}: {kind.__name__} positions differ from eager"
        finite = torch.isfinite(e)  # compared at the dtype's tolerance
        torch.testing.assert_close(a[finite], e[finite], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_within_twice_eager_error(layout, dtype):
    """float16 and bfloat16 take the loops' scalar steps (odd channel count, odd plane size): every output of the
    forward and backward within twice eager's own error at that dtype against float64 (plus a small floor)."""
    shape = (2, 37, 5, 7)
    x = make(shape, dtype, layout, 61, offset=0.5, scale=2.0)
    r = make(shape, dtype, layout, 62)
    w, b = vector(37, 63, positive=True).to(dtype), vector(37, 64).to(dtype)
    grad_out = make(shape, dtype, layout, 65)
    got = run(x, w, b, r, True, grad_out)
    exact = reference(x, w, b, r, True, grad_out)
    xe, we, be, re = (t.clone().requires_grad_() for t in (x, w, b, r))
    ye = F.relu(F.batch_norm(xe, None, None, we, be, training=True, eps=EPS) + re)
    ye.backward(grad_out)
    eager = (ye, None, None, xe.grad, we.grad, be.grad, re.grad)
    names = ("out", "save_mean", "save_invstd", "grad_input", "grad_weight", "grad_bias", "grad_residual")
    for name, a, e, t in zip(names, got, exact, eager):
        if t is None:  # mean, invstd: float, from double sums
            torch.testing.assert_close(a, e.to(a.dtype), msg=lambda m, name=name: f"{name}: {m}")
            continue
        assert a.dtype == t.dtype, name
        bound = 2 * rel_l2(t, e) + 1e-3
        assert rel_l2(a, e) <= bound, f"{name}: {rel_l2(a, e):.3g} > {bound:.3g} (eager: {rel_l2(t, e):.3g})"
