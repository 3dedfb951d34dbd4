"""bn_act's passes one at a time, for BatchNorm synchronised over a process group (ops _bn_stats_triton,
_bn_act_apply_triton, _bn_act_backward_reduce_triton, _bn_act_backward_elemt_triton; the collectives run
between them, in resfuse/ops/sync_bn_act.py).

The kernels are bn_act.py's; these launchers run them with other arguments, so the math and the layouts are
that file's:
    bn_stats                 _bn_stats_partial_kernel with STORE_M2: [mean | M2 | count] of the local batch
    bn_act_apply             _bn_act_fwd_kernel with the (global) mean and invstd given
    bn_act_backward_reduce   _bn_act_bwd_reduce_kernel: [sum g | sum g * xhat] of the local batch
    bn_act_backward_elemt    _bn_act_bwd_dx_kernel with the global sums already divided by the global count
                             (n = 1 in the kernel): the count lives on the device, and reading it would stall
                             the host
Packed statistics are float64 (the kernel's fp32 results, widened: see the op's schema in csrc/resfuse.cpp), packed
sums in the accumulation dtype (fp32, fp64 for float64 input).
"""
from typing import Optional

import torch

from ._device import on_tensor_device
from .bn_act import (
    _acc_dtypes,
    _apply,
    _bn_act_bwd_dx_kernel,
    _bn_stats_partial_kernel,
    _channel_vec,
    _check_activation,
    _column_counters,
    _configs,
    _grad_reduce,
    _layout,
    _like,
    _same_layout,
)


@on_tensor_device
def bn_stats(x: torch.Tensor) -> torch.Tensor:
    """Op _bn_stats: [mean | M2 | count] (2C + 1 float64 values); zeros for an empty batch."""
    _check_activation("input", x)
    lay = _layout(x)
    C = lay.C
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    n = lay.outer * lay.inner
    if x.numel() == 0:
        return torch.zeros(2 * C + 1, dtype=torch.float64, device=x.device)
    packed = torch.empty(2 * C + 1, dtype=torch.float64, device=x.device)
    packed[2 * C:].fill_(n)
    xc = x.contiguous(memory_format=lay.fmt)
    rcfg = _configs(lay.outer, C, lay.inner, x.device)[1]
    P = rcfg.n_parts
    pcnt, pmean, pm2 = torch.empty((3, P, C), dtype=acc_t, device=x.device).unbind(0)
    mean, m2 = packed[:C], packed[C:2 * C]
    _bn_stats_partial_kernel[(P, rcfg.c_blocks)](
        xc, pcnt, pmean, pm2, _column_counters(rcfg.c_blocks, x.device),
        C, lay.inner, n, rcfg.n_itiles, rcfg.n_tiles, rcfg.tiles_per_prog,
        1.0, 0.0, 0.0, 0.0, mean, m2, mean, mean, 1, 1,  # eps = 1: the invstd it computes (unused) stays finite
        HAS_RM=False, HAS_RV=False, CHANNELS_LAST=rcfg.channels_last, ACC=acc_tl,
        BLOCK_R=rcfg.BLOCK_R, BLOCK_C=rcfg.BLOCK_C, BLOCK_P=rcfg.BLOCK_P, num_warps=rcfg.num_warps, STORE_M2=True)
    return packed


@on_tensor_device
def bn_act_apply(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Op _bn_act_apply: act((x - mean) * invstd * weight + bias [+ residual])."""
    _check_activation("input", x)
    lay = _layout(x)
    C = lay.C
    out = _like(x, lay)
    if x.numel() == 0:
        return out
    acc_tl = _acc_dtypes(x.dtype)[1]
    xc = x.contiguous(memory_format=lay.fmt)
    res = _same_layout("residual", residual, x, lay) if residual is not None else None
    _apply(xc, out, lay, _configs(lay.outer, C, lay.inner, x.device)[0], acc_tl,
           mean=_channel_vec("mean", mean, C), invstd=_channel_vec("invstd", invstd, C),
           weight=_channel_vec("weight", weight, C), bias=_channel_vec("bias", bias, C), residual=res, relu=relu)
    return out


@on_tensor_device
def bn_act_backward_reduce(grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor,
                           invstd: torch.Tensor, relu: bool) -> torch.Tensor:
    """Op _bn_act_backward_reduce: [sum g | sum g * xhat] (2C values); zeros for an empty batch."""
    _check_activation("input", x)
    lay = _layout(x)
    C = lay.C
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    if x.numel() == 0:
        return torch.zeros(2 * C, dtype=acc_t, device=x.device)
    sums = torch.empty(2 * C, dtype=acc_t, device=x.device)
    go = _same_layout("grad_out", grad_out, x, lay)
    o = _same_layout("out", out, x, lay) if relu else None
    xc = x.contiguous(memory_format=lay.fmt)
    _grad_reduce(go, o, xc, _channel_vec("mean", mean, C), _channel_vec("invstd", invstd, C), None, lay,
                 _configs(lay.outer, C, lay.inner, x.device)[1], acc_t, acc_tl, relu=relu, has_x=True,
                 sums=(sums[:C], sums[C:]))
    return sums


@on_tensor_device
def bn_act_backward_elemt(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                          out: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, grad_means: torch.Tensor,
                          relu: bool, output_mask):
    """Op _bn_act_backward_elemt: (grad_input, grad_residual), empty where output_mask does not ask."""
    _check_activation("input", x)
    mask = [bool(m) for m in output_mask]
    lay = _layout(x)
    C = lay.C
    dev = x.device
    grad_input = _like(x, lay) if mask[0] else torch.empty(0, dtype=x.dtype, device=dev)
    grad_residual = _like(x, lay) if mask[1] else torch.empty(0, dtype=x.dtype, device=dev)
    if x.numel() == 0 or not any(mask):
        return grad_input, grad_residual
    if grad_means.numel() != 2 * C:
        raise RuntimeError(f"resfuse triton: grad_means must have 2C={2 * C} elements, got {grad_means.numel()}")
    acc_tl = _acc_dtypes(x.dtype)[1]
    go = _same_layout("grad_out", grad_out, x, lay)
    o = _same_layout("out", out, x, lay) if relu else go
    xc = x.contiguous(memory_format=lay.fmt)
    gm = grad_means.contiguous()
    cfg = _configs(lay.outer, C, lay.inner, dev)[0]
    _bn_act_bwd_dx_kernel[(cfg.n_tiles, cfg.c_blocks)](
        go, o, xc, _channel_vec("mean", mean, C), _channel_vec("invstd", invstd, C),
        go if weight is None else _channel_vec("weight", weight, C), gm[:C], gm[C:],
        grad_input if mask[0] else go, grad_residual if mask[1] else go,
        C, lay.inner, lay.outer * lay.inner, cfg.n_itiles, 1,
        RELU=bool(relu), HAS_W=weight is not None, WRITE_DX=mask[0], WRITE_G=mask[1],
        CHANNELS_LAST=cfg.channels_last, ACC=acc_tl, BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C,
        num_warps=cfg.num_warps)
    return grad_input, grad_residual
