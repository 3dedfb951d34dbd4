"""``bn_act`` with its batch statistics synchronised over a torch.distributed process group: nn.SyncBatchNorm in
training + residual + ReLU, fused up to the collectives.

    forward, on every rank of the group:
        local    = _bn_stats(x)                      [mean | M2 | count] of the local batch: 2C + 1 float64
        gathered = all_gather(local)                 the forward's one collective: [world, 2C + 1]
        n = sum n_r,  mean = sum n_r mean_r / n,  M2 = sum (M2_r + n_r (mean_r - mean)^2)      (Chan's merge,
                                                     in float64)
        running_mean, running_var <- updated with the global n (unbiased M2 / (n - 1)), as nn.SyncBatchNorm
        out      = _bn_act_apply(x, mean, 1 / sqrt(M2 / n + eps), weight, bias, residual, relu)
    backward:
        local    = _bn_act_backward_reduce(...)      [sum g | sum g * xhat] of the local batch; grad_bias and
                                                     grad_weight are these local sums, as in nn.SyncBatchNorm
                                                     (DDP all-reduces the parameters' gradients)
        global   = all_reduce(local)                 the backward's one collective, made, as nn.SyncBatchNorm
                                                     makes it, only when the input needs a gradient
        grad_input, grad_residual = _bn_act_backward_elemt(..., global / n)

Why an all-gather of each rank's (count, mean, M2), not an all-reduce of (count, sum x, sum x^2): the variance
from sums, sum x^2 / n - mean^2, cancels catastrophically when |mean| >> std (its error is about
eps * mean^2 / var: fp32 loses every digit at |mean| = 3000 std, float64 loses 1e-9 at |mean| = 300 std), and
shifting the sums needs a shift every rank agrees on before anything is communicated. Each rank's mean and M2
are computed without that cancellation (shifted sums or Welford, as bn_act computes them), and Chan's merge adds
only deviations of the order of the variance. The price is world x (2C + 1) values gathered instead of 2C + 1
reduced, as nn.SyncBatchNorm gathers, latency-bound either way.

The statistics travel and merge in float64 whatever the input: the merge subtracts the ranks' means, and a mean
rounded to fp32 is off by up to half an ulp of |mean|, which is not small next to the deviations n_r (mean_r -
mean)^2 adds up when |mean| >> std (measured with fp32 transport on CPU, 2 ranks, |mean| = 1e4 std: running_var
off by 6e-6 relative, against 2e-8 for nn.BatchNorm2d in fp32). That is 256 KiB at 8 ranks and C = 2048, and a
merge of a few [world, C] float64 ops.

Edge cases as nn.SyncBatchNorm: uneven batches weigh by their counts; a rank with an empty batch sends zeros
(count 0, which weighs nothing: no mask, so nothing is read back to the host) and still joins both collectives;
its output and input gradient are empty, its grad_weight and grad_bias zeros. When every rank is empty the
running statistics are left as they are, as nn.BatchNorm2d leaves them for an empty batch. Nothing here reads a
device value on the host.

The collectives are torch's functional ones (torch.ops._c10d_functional), which torch.compile traces: the
whole forward and backward compile into one graph with them. Second-order gradients are not supported (nor are
they by nn.SyncBatchNorm): differentiating this backward raises.

The passes come from the backend: the C++ ops (resfuse::_bn_stats ...; csrc/cpu/bn_act.cpp, csrc/cuda/bn_act.cu),
their Triton twins (resfuse::_bn_stats_triton ...; triton_kernels/bn_act_passes.py), or resfuse.reference.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _loader
from ..layout import memory_format_of, stats_dtype
from ..reference import bn_act_apply_ref, bn_act_backward_elemt_ref, bn_act_backward_reduce_ref, bn_stats_ref
from . import _autograd
from ._checks import check_activation, check_channel_vector, check_like

_STATS_SCHEMA = "(Tensor input) -> Tensor"
_APPLY_SCHEMA = ("(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
                 "bool relu) -> Tensor")
_REDUCE_SCHEMA = "(Tensor grad_out, Tensor input, Tensor out, Tensor mean, Tensor invstd, bool relu) -> Tensor"
_ELEMT_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor? weight, Tensor out, Tensor mean, Tensor invstd, "
                 "Tensor grad_means, bool relu, bool[2] output_mask) -> (Tensor, Tensor)")


class Passes(NamedTuple):
    """One backend's four passes (signatures: the schemas above)."""
    stats: Callable
    apply: Callable
    backward_reduce: Callable
    backward_elemt: Callable


def _triton(name: str) -> Callable:
    def launch(*args):
        return getattr(_loader.require_triton_kernels(), name)(*args)
    return launch


def _register_fakes(suffix: str) -> None:
    """Fake kernels of one flavour's four pass ops (``suffix``: "" for the C++ ops, "_triton")."""
    lib = _autograd._lib

    @torch.library.register_fake(f"resfuse::_bn_stats{suffix}", lib=lib)
    def _stats(input):
        return input.new_empty((2 * input.shape[1] + 1,), dtype=torch.float64)

    @torch.library.register_fake(f"resfuse::_bn_act_apply{suffix}", lib=lib)
    def _apply(input, mean, invstd, weight, bias, residual, relu):
        return _autograd.empty_activation(input)

    @torch.library.register_fake(f"resfuse::_bn_act_backward_reduce{suffix}", lib=lib)
    def _reduce(grad_out, input, out, mean, invstd, relu):
        return input.new_empty((2 * input.shape[1],), dtype=stats_dtype(input))

    @torch.library.register_fake(f"resfuse::_bn_act_backward_elemt{suffix}", lib=lib)
    def _elemt(grad_out, input, weight, out, mean, invstd, grad_means, relu, output_mask):
        empty = input.new_empty((0,))
        return (_autograd.empty_activation(input) if output_mask[0] else empty,
                _autograd.empty_activation(input) if output_mask[1] else empty.clone())


for _name, _schema, _launcher in (("_bn_stats_triton", _STATS_SCHEMA, "bn_stats"),
                                  ("_bn_act_apply_triton", _APPLY_SCHEMA, "bn_act_apply"),
                                  ("_bn_act_backward_reduce_triton", _REDUCE_SCHEMA, "bn_act_backward_reduce"),
                                  ("_bn_act_backward_elemt_triton", _ELEMT_SCHEMA, "bn_act_backward_elemt")):
    _autograd.define_triton_op(_name, _schema, _triton(_launcher))
_register_fakes("_triton")
if _loader.extension is not None:
    _register_fakes("")


def passes_of(impl: str) -> Passes:
    """The passes of backend ``impl`` (cuda, triton or reference), already resolved for the input's device."""
    if impl == "reference":
        return Passes(bn_stats_ref, bn_act_apply_ref, bn_act_backward_reduce_ref, bn_act_backward_elemt_ref)
    ops = torch.ops.resfuse
    if impl == "cuda":
        return Passes(ops._bn_stats.default, ops._bn_act_apply.default, ops._bn_act_backward_reduce.default,
                      ops._bn_act_backward_elemt.default)
    if impl == "triton":
        return Passes(ops._bn_stats_triton.default, ops._bn_act_apply_triton.default,
                      ops._bn_act_backward_reduce_triton.default, ops._bn_act_backward_elemt_triton.default)
    raise ValueError(f"unknown resfuse backend {impl!r}")


def _all_gather(t: Tensor, world_size: int, group_name: str) -> Tensor:
    funcol = torch.ops._c10d_functional
    return funcol.wait_tensor(funcol.all_gather_into_tensor(t, world_size, group_name))


def _all_reduce_sum(t: Tensor, group_name: str) -> Tensor:
    funcol = torch.ops._c10d_functional
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group_name))


def merge_statistics(gathered: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, count) of the global batch from every rank's [mean | M2 | count] (``gathered``:
    [world, 2C + 1]); updates the running statistics in place with the global count. Ranks with count 0 weigh
    nothing; with no value anywhere the running statistics stay as they are."""
    c = (gathered.shape[1] - 1) // 2
    means, m2s, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    # sqrt and division, both correctly rounded, rather than rsqrt (an approximation on GPUs).
    invstd = (m2 / n + eps).sqrt().reciprocal()
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            seen = n > 0
            for running, batch in ((running_mean, mean), (running_var, m2 / (n - 1))):
                updated = running.to(batch.dtype) * (1.0 - momentum) + batch * momentum
                running.copy_(torch.where(seen, updated, running.to(batch.dtype)))
    return mean, invstd, n


class _SyncBnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, impl, group_name,
                world_size):
        passes = passes_of(impl)
        c = x.shape[1]
        gathered = _all_gather(passes.stats(x), world_size, group_name).view(world_size, 2 * c + 1)
        mean, invstd, count = merge_statistics(gathered, running_mean, running_var, momentum, eps)
        out = passes.apply(x, mean, invstd, weight, bias, residual, relu)
        ctx.save_for_backward(x, weight, out, mean, invstd, count)
        ctx.relu, ctx.impl, ctx.group_name = relu, impl, group_name
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, out, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        passes = passes_of(ctx.impl)
        c = x.shape[1]
        g = grad_out.contiguous(memory_format=memory_format_of(out))
        grads = [None] * 12
        local = None
        if need_x or need_w or need_b:
            local = passes.backward_reduce(g, x, out, mean, invstd, ctx.relu)
            if need_w:
                grads[1] = local[c:].to(weight.dtype)
            if need_b:
                grads[2] = local[:c].to(ctx.bias_dtype)
        if need_x or need_r:
            # Without an input gradient there is nothing to synchronise (nn.SyncBatchNorm skips it too).
            grad_means = _all_reduce_sum(local, ctx.group_name) / count if need_x else mean.new_zeros(2 * c)
            grad_input, grad_residual = passes.backward_elemt(g, x, weight, out, mean, invstd, grad_means,
                                                              ctx.relu, [need_x, need_r])
            grads[0] = grad_input if need_x else None
            grads[3] = grad_residual if need_r else None
        return tuple(grads)


def check_sync_args(x, weight, bias, residual, running_mean, running_var) -> None:
    """bn_act's argument rules, without its 'more than one value per channel': that applies to the global batch,
    which no rank sees (nn.SyncBatchNorm lets a rank hold a single value)."""
    check_activation(x)
    check_like(x, residual, "residual")
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_channel_vector(x, v, name)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")


def group_size(process_group: dist.ProcessGroup) -> int:
    return dist.get_world_size(process_group)


def sync_bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                relu: bool, process_group: dist.ProcessGroup, impl: str) -> Tensor:
    """``bn_act`` with the statistics of the batch of every rank of ``process_group`` (which must have two or
    more ranks: with one, bn_act is the same), on backend ``impl`` (cuda, triton or reference) already resolved.
    Every rank of the group must call it, in the same order as its other collectives."""
    check_sync_args(x, weight, bias, residual, running_mean, running_var)
    return _SyncBnAct.apply(x, weight, bias, residual, running_mean, running_var, float(momentum), float(eps),
                            bool(relu), impl, process_group.group_name, group_size(process_group))
