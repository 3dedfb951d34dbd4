"""bn_act's passes one at a time (the ops synchronised BatchNorm is built from), in one process.

Each flavour (the C++ ops, their Triton twins, resfuse.reference) against the float64 math, and then as
synchronised BN runs them: a batch cut into "ranks", each rank's statistics merged (merge_statistics) and the
gradient sums added as an all-gather and an all-reduce would, against nn.BatchNorm2d on the whole batch.
The collectives themselves are tested with real processes in test_distributed_bn_act.py.
"""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, rel_err
from resfuse.ops.sync_bn_act import merge_statistics, passes_of

CPU_BACKENDS = backends_on("cpu")
LAYOUTS = ["contiguous", "channels_last"]


def make(shape, layout, dtype=torch.float64, seed=0, offset=0.0):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return (randn(*shape, dtype=torch.float64, seed=seed) + offset).to(dtype).contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (2, 3, 1, 1), (0, 4, 3, 3)])
def test_stats(backend, layout, shape):
    x = make(shape, layout, offset=3.0)
    packed = passes_of(backend).stats(x)
    c = shape[1]
    assert packed.shape == (2 * c + 1,) and packed.dtype == torch.float64
    if x.numel() == 0:
        assert torch.equal(packed, torch.zeros(2 * c + 1, dtype=torch.float64))
        return
    mean = x.mean((0, 2, 3))
    m2 = (x - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))
    torch.testing.assert_close(packed[:c], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed[c:2 * c], m2, rtol=1e-12, atol=1e-12)
    assert packed[2 * c].item() == x.numel() // c


def _stats_for(x, seed):
    """A mean and an invstd for C channels."""
    c = x.shape[1]
    return randn(c, dtype=x.dtype, seed=seed) * 0.5, randn(c, dtype=x.dtype, seed=seed + 1).abs() + 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine,with_residual,relu", [(True, True, True), (False, False, False)])
def test_apply(backend, layout, affine, with_residual, relu):
    shape = (3, 5, 4, 3)
    x = make(shape, layout)
    mean, invstd = _stats_for(x, 1)
    weight = randn(5, dtype=torch.float64, seed=2) if affine else None
    bias = randn(5, dtype=torch.float64, seed=3) if affine else None
    residual = make(shape, layout, seed=4) if with_residual else None
    out = passes_of(backend).apply(x, mean, invstd, weight, bias, residual, relu)
    expected = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    if affine:
        expected = expected * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    if with_residual:
        expected = expected + residual
    if relu:
        expected = expected.relu()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
def test_backward_passes(backend, layout, relu):
    shape = (3, 5, 4, 3)
    x = make(shape, layout)
    out = make(shape, layout, seed=5)  # a stand-in output: only its sign (the ReLU mask) matters
    grad_out = make(shape, layout, seed=6)
    mean, invstd = _stats_for(x, 7)
    weight = randn(5, dtype=torch.float64, seed=8)
    passes = passes_of(backend)
    g = torch.where(out <= 0, 0.0, grad_out) if relu else grad_out
    xhat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)

    sums = passes.backward_reduce(grad_out, x, out, mean, invstd, relu)
    torch.testing.assert_close(sums, torch.cat([g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))]), rtol=1e-12,
                               atol=1e-12)

    grad_means = randn(10, dtype=torch.float64, seed=9)
    for mask in ([True, True], [True, False], [False, True]):
        grad_input, grad_residual = passes.backward_elemt(grad_out, x, weight, out, mean, invstd, grad_means, relu,
                                                          mask)
        if mask[0]:
            expected = ((g - grad_means[:5].view(1, -1, 1, 1) - xhat * grad_means[5:].view(1, -1, 1, 1))
                        * (invstd * weight).view(1, -1, 1, 1))
            torch.testing.assert_close(grad_input, expected, rtol=1e-12, atol=1e-12)
        else:
            assert grad_input.numel() == 0
        if mask[1]:
            torch.testing.assert_close(grad_residual, g, rtol=0, atol=0)
        else:
            assert grad_residual.numel() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batches", [[3, 5, 4], [3, 0, 4], [1, 1]])
def test_passes_as_ranks_equal_batchnorm(backend, layout, batches):
    """The synchronised algorithm with the collectives made by hand: a stack for the all-gather, a sum for the
    all-reduce. Equal to nn.BatchNorm2d (+ residual + ReLU) on the whole batch, running statistics included."""
    c, hw = 5, (4, 3)
    total = sum(batches)
    x = make((total, c, *hw), "contiguous", offset=2.0)
    residual = make((total, c, *hw), "contiguous", seed=1)
    grad = make((total, c, *hw), "contiguous", seed=2)
    weight, bias = randn(c, dtype=torch.float64, seed=3) + 1.5, randn(c, dtype=torch.float64, seed=4)
    rm, rv = randn(c, dtype=torch.float64, seed=5) * 0.1, torch.rand(c, dtype=torch.float64) + 0.5

    ref_x, ref_res = x.clone().requires_grad_(), residual.clone().requires_grad_()
    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ref_rm, ref_rv = rm.clone(), rv.clone()
    expected = (F.batch_norm(ref_x, ref_rm, ref_rv, ref_w, ref_b, True, 0.1, 1e-5) + ref_res).relu()
    expected.backward(grad)

    passes = passes_of(backend)
    chunks = lambda t: [p.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else p
                        for p in torch.split(t, batches)]
    xs, residuals, grads = chunks(x), chunks(residual), chunks(grad)
    gathered = torch.stack([passes.stats(xr) for xr in xs])
    mean, invstd, count = merge_statistics(gathered, rm, rv, 0.1, 1e-5)
    outs = [passes.apply(xr, mean, invstd, weight, bias, rr, True) for xr, rr in zip(xs, residuals)]
    local = [passes.backward_reduce(gr, xr, o, mean, invstd, True) for gr, xr, o in zip(grads, xs, outs)]
    grad_means = sum(local) / count
    grads_in = [passes.backward_elemt(gr, xr, weight, o, mean, invstd, grad_means, True, [True, True])
                for gr, xr, o in zip(grads, xs, outs)]

    assert rel_err(torch.cat(outs), expected) < 1e-12
    assert rel_err(torch.cat([gi for gi, _ in grads_in]), ref_x.grad) < 1e-12
    assert rel_err(torch.cat([gr for _, gr in grads_in]), ref_res.grad) < 1e-12
    assert rel_err(sum(local)[c:], ref_w.grad) < 1e-12
    assert rel_err(sum(local)[:c], ref_b.grad) < 1e-12
    torch.testing.assert_close(rm, ref_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, ref_rv, rtol=1e-12, atol=1e-12)


def test_merge_with_every_rank_empty_keeps_running_statistics():
    gathered = torch.zeros(3, 2 * 4 + 1, dtype=torch.float64)
    rm, rv = randn(4, dtype=torch.float64, seed=1), torch.rand(4, dtype=torch.float64) + 0.5
    before = rm.clone(), rv.clone()
    merge_statistics(gathered, rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def _op_names():
    suffixes = (["_triton"] if "triton" in CPU_BACKENDS else []) + ([""] if "cuda" in CPU_BACKENDS else [])
    return suffixes


@pytest.mark.parametrize("suffix", _op_names())
def test_opcheck(suffix):
    ops = torch.ops.resfuse
    x = make((2, 3, 4, 5), "channels_last", dtype=torch.float32)
    out = make((2, 3, 4, 5), "channels_last", dtype=torch.float32, seed=1)
    grad_out = make((2, 3, 4, 5), "channels_last", dtype=torch.float32, seed=2)
    mean, invstd = torch.zeros(3), torch.ones(3)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    torch.library.opcheck(getattr(ops, "_bn_stats" + suffix).default, (x,))
    torch.library.opcheck(getattr(ops, "_bn_act_apply" + suffix).default, (x, mean, invstd, weight, bias, out, True))
    torch.library.opcheck(getattr(ops, "_bn_act_backward_reduce" + suffix).default,
                          (grad_out, x, out, mean, invstd, True))
    torch.library.opcheck(getattr(ops, "_bn_act_backward_elemt" + suffix).default,
                          (grad_out, x, weight, out, mean, invstd, torch.randn(6), True, [True, True]))
