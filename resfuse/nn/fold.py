"""Eval-mode BN folded into the preceding conv: W' = W * gamma/sqrt(var+eps), b' = beta + (b - mean) * ....

The folded tensors are cached per BN module and keyed on every tensor they were made from: its version
counter (any in-place change: optimizer steps, load_state_dict, fill_), storage and dtype/device (``.to()``).
A stale fold is therefore never returned. No cache is used while autograd must see the fold (a parameter
requires grad), nor under torch.compile, where the fold is traced (and constant-folded by freezing).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._autograd import grad_needed
from ..reference import fold_bn_ref

_cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fold(conv: nn.Conv2d, bn: nn.Module, dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    weight, bias = fold_bn_ref(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    if dtype is not None:  # autocast: the fold is made in fp32, then rounded once to the autocast dtype
        weight, bias = weight.to(dtype), bias.to(dtype)
    return weight, bias


def gemm_layout(weight: Tensor) -> Tensor:
    """The same [C_out, Cg, KH, KW] weight, stored as the implicit-GEMM B matrix [KH, KW, Cg, C_out] (output
    channels fastest). The Triton conv reads this layout directly; with any other it repacks on every call."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def folded_weight_bias(conv: nn.Conv2d, bn: nn.Module, for_gemm: bool = False,
                       dtype: Optional[torch.dtype] = None,
                       memory_format: torch.memory_format = torch.contiguous_format) -> tuple[Tensor, Tensor]:
    """(W', b') such that conv(x, W') + b' == bn(conv(x)) with bn's running statistics.

    ``for_gemm``: store W' in ``gemm_layout`` (for the Triton conv kernel), else in ``memory_format`` (the
    input's: cuDNN takes its layout from both operands, and a weight in another one is copied on every call);
    ``dtype``: cast W' and b' to it (autocast). All are cached, so they are paid once per weight update, not per
    forward."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.compiler.is_compiling():
        return _fold(conv, bn, dtype)
    if grad_needed(*sources):
        return _fold(conv, bn, dtype)
    try:
        # One comprehension, no call per tensor: this key is rebuilt on every eval forward.
        key = (id(conv), float(bn.eps), torch.is_inference_mode_enabled(), for_gemm, dtype, memory_format,
               [None if t is None else (t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in sources])
    except RuntimeError:  # inference tensors have no version counter: fold every time
        return _fold(conv, bn, dtype)
    hit = _cache.get(bn)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        weight, bias = _fold(conv, bn, dtype)
        weight = gemm_layout(weight) if for_gemm else weight.contiguous(memory_format=memory_format)
    _cache[bn] = (key, weight, bias)
    return weight, bias


def clear_fold_cache() -> None:
    """Drop every cached fold (only needed after editing parameters through ``.data``, which bypasses the
    version counter)."""
    _cache.clear()
