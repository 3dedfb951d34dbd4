"""Eval-mode BN folded into the preceding conv: W' = W * gamma/sqrt(var+eps), b' = beta + (b - mean) * ....

The fold is made again on every call, from the tensors the modules hold at that moment: a cached fold can be
made stale by writes no version counter sees (``p.data.mul_()`` in EMA code, running statistics moved under
``torch.inference_mode``), and a drop-in must never return a stale answer. What it costs is kept small
instead: the no-grad path computes it in one launch (``resfuse.ops.fold_bn``), and on CPU the eval path needs
no fold at all (routing.py: ATen's conv on the raw weight, then ``bn_eval_act``).

``fold_bn_differentiable`` is the fold in torch ops: autograd sees it (eval-mode training of the conv, e.g.
detection backbones with frozen BN) and torch.compile traces it (freezing constant-folds it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def gemm_layout(weight: Tensor) -> Tensor:
    """The same [C_out, Cg, KH, KW] weight, stored as the implicit-GEMM B matrix [KH, KW, Cg, C_out] (output
    channels fastest). The Triton conv reads this layout directly; with any other it repacks on every call."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def fold_bn_differentiable(conv: nn.Conv2d, bn: nn.Module, dtype: Optional[torch.dtype] = None
                           ) -> tuple[Tensor, Tensor]:
    """(W', b') with conv(x, W') + b' == bn(conv(x)) under bn's running statistics, in torch ops.

    Computed in fp32 (fp64 for fp64 weights), then cast once to ``dtype`` (autocast) or the conv weight's dtype,
    so half-precision models lose no more than one rounding of W' and b'."""
    weight = conv.weight
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if conv.bias is not None:
        shift = shift + conv.bias.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    out_dtype = dtype if dtype is not None else weight.dtype
    return (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(out_dtype), shift.to(out_dtype)
