"""The end of a residual block with a squeeze-excitation gate and/or stochastic depth, fused:

    out = act(bn(y) * gate(mean_hw(bn(y)))[n, c] * keep[n] + shortcut)

as timm's ResNet blocks compute it (``attn_layer`` SE / ECA, then ``drop_path``, then ``+= shortcut`` and
``act3``). ``gate`` is the SE module's MLP or the ECA module's 1-D conv with their sigmoid, as ordinary torch ops
on the [N, C] squeeze; ``keep`` is timm's drop_path factor, drawn by ``drop_path_mask`` with torch's RNG exactly
as ``timm.layers.drop_path`` draws it.

Training (batch statistics):
    1. ``bn_squeeze``: one reduction over y gives BN's statistics (running ones updated) and the per-sample
       squeeze of the normalised y; bn(y) itself is never written.
    2. torch ops on [N, C]: squeeze * weight + bias (eager's ``bn(y).mean((2, 3))``), the gate, times keep.
    3. ``bn_scale_act``: one pass reads y and the shortcut, applies BN, the factor, the add and ReLU.
   Backward: bn_scale_act's one pass (the per-(n, c) sums for the gate's gradient, grad_y's direct term and the
   shortcut's gradient); the gate's backward in torch on [N, C]; bn_squeeze's one elementwise pass (what flows
   through the squeeze and the statistics); autograd adds the two gradients of y.
Eval: BN from the running statistics or already folded into the conv (pass no BN at all); a reduction over y
(torch's mean) gives the squeeze, and one bn_scale_act pass does the rest.

Passes over an activation-sized tensor (each read or write counts once) from the conv's output y to the
block's output, against timm's eager sequence (bn3, SE's mean, x * gate, [x * keep], x += shortcut, ReLU).
Written down before the kernels were built; unmeasured (no GPU has run it):

                                      eager          fused        saved
    train forward, SE                  11              4             7
    train backward, SE                 16             10             6
    train forward, SE + drop_path      13              4             9
    train backward, SE + drop_path     18             10             8
    eval, SE (running statistics)      10              4             6

Eager, forward: BN 3 (statistics read y; apply reads y, writes), mean 1, x * gate 2, x * keep 2, += shortcut 3,
ReLU 2. Backward: ReLU 3 (reads grad and out, writes), x * keep 2, x * gate 6 (grad * gate: read, write;
grad * x: 2 reads, a write, then the sum reads it), the squeeze's gradient added to x's 2, BN 5 (reduction reads
grad and y; grad_y reads both, writes). Eval: BN apply 2, mean 1, x * gate 2, += shortcut 3, ReLU 2.
Fused, forward: bn_squeeze 1, bn_scale_act 3 (reads y and the shortcut, writes). Backward: bn_scale_act 5 (reads
grad, out, y; writes grad_y's direct term and the shortcut's gradient), bn_squeeze 2 (reads y, writes), autograd's
sum of y's two gradients 3. Eval: the squeeze's mean 1, bn_scale_act 3. resfuse/bench/counting.py
(``TAIL_PASSES``, ``block_tail_bytes``) counts the same passes. The backward's last 3 could go by having
bn_squeeze's backward add bn_scale_act's grad_y as it writes (not done yet).

Without gate and keep, training is ``bn_act`` (statistics + one apply pass), and eval ``bn_scale_act`` without a
scale.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..layout import stats_dtype
from ._checks import check_activation, check_like
from .bn_act import bn_act
from .bn_scale_act import check_bn_scale_act_args, run_bn_scale_act
from .bn_squeeze import check_bn_squeeze_args, run_bn_squeeze
from .backend import requested_backend, resolve_backend

Gate = Callable[[Tensor], Tensor]


def drop_path_mask(x: Tensor, drop_prob: float, training: bool, scale_by_keep: bool = True) -> Optional[Tensor]:
    """timm's drop_path factor for x, [N, 1, 1, 1]: each sample kept with probability 1 - drop_prob (and then
    divided by it when scale_by_keep), or None where timm's drop_path is the identity. The draw is the one
    ``timm.layers.drop_path`` makes (a Bernoulli fill of a tensor of x's dtype and device), so a seeded run drops
    the same samples as timm."""
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return mask


def block_tail(
    y: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    training: bool = True,
    gate: Optional[Gate] = None,
    keep: Optional[Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(bn(y) * gate(squeeze)[n, c] * keep[n] + residual)``, as the module doc says.

    ``training``: BN normalises with batch statistics and updates ``running_mean``/``running_var`` in place
    (``momentum`` as in bn_act). Otherwise it uses the running statistics, or, when none are given, y is taken
    as already normalised (BN folded into the conv; weight and bias must then be None too).
    ``gate``: maps the squeeze, [N, C] in y's dtype (eager's ``bn(y).mean((2, 3))``), to the factor, [N, C].
    ``keep``: a per-sample factor ([N] or [N, 1, 1, 1]; ``drop_path_mask``'s).
    """
    check_activation(y)
    check_like(y, residual, "residual")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None and (weight is not None or bias is not None):
        raise ValueError("eval without running statistics means BN is folded into the conv: pass no weight or "
                         "bias either")
    impl = resolve_backend(requested_backend(backend), y.device)
    acc = stats_dtype(y)
    n, c = y.shape[:2]
    keep_nc = None if keep is None else keep.reshape(n, 1).to(acc).expand(n, c)
    if training:
        if gate is None and keep is None:
            return bn_act(y, weight, bias, residual, running_mean, running_var, momentum, eps, relu, backend=backend)
        check_bn_squeeze_args(y, running_mean, running_var)
        squeeze, mean, invstd = run_bn_squeeze(y, running_mean, running_var, momentum, eps, impl)
    else:
        mean = running_mean
        invstd = None if running_var is None else torch.rsqrt(running_var.to(acc) + eps)
        squeeze = None
        if gate is not None:
            squeeze = y.mean((2, 3), dtype=acc)
            if mean is not None:
                squeeze = (squeeze - mean.to(acc)) * invstd
    scale = keep_nc
    if gate is not None:
        if weight is not None:
            squeeze = squeeze * weight.to(acc)
        if bias is not None:
            squeeze = squeeze + bias.to(acc)
        scale = gate(squeeze.to(y.dtype))
        if tuple(scale.shape) != (n, c):
            raise ValueError(f"gate must map the squeeze [N, C] = {[n, c]} to a factor of the same shape, got "
                             f"{tuple(scale.shape)}")
        scale = scale if keep_nc is None else scale.to(acc) * keep_nc
    if scale is not None and scale.dtype not in (y.dtype, acc):
        scale = scale.to(acc)
    check_bn_scale_act_args(y, weight, bias, mean, invstd, scale, residual)
    return run_bn_scale_act(y, weight, bias, mean, invstd, scale, residual, relu, impl)
