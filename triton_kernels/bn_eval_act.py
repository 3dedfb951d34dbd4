"""Eval-mode BatchNorm (running statistics) fused with residual add and ReLU, as Triton kernels.

Fused math, per channel c:
    invstd = 1 / sqrt(running_var + eps)
    out = act((x - running_mean) * (w * invstd) + b + residual)        act = ReLU or identity
Backward (the running statistics are constants):
    g = 0 where out <= 0 if relu, else grad_out          (torch's threshold_backward: a NaN output passes it on)
    grad_input = g * w * invstd       grad_weight = sum(g * (x - mean)) * invstd       grad_bias = sum(g)
    grad_residual = g

Layouts, tiles and launch configurations are bn_act.py's ([outer, C, inner] views, `_tile_offsets`,
`launch_config` / `reduction_config`); accumulation is fp32 (fp64 for float64 input).
Forward: one launch, each program computing its channels' invstd from running_var.
Backward: grad_input and grad_residual in one elementwise pass, which needs no sums (so an Inf in x cannot turn
grad_input into NaN, as in eager's eval-mode backward); grad_weight / grad_bias by one two-level reduction whose
merge is bn_act.py's `_grad_sums_merge`. bn_act's gradient kernels are not reused for the passes over g: their
ReLU mask zeroes the gradient where the output is NaN, which eager does not.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .bn_act import (
    _acc_dtypes,
    _channel_vec,
    _check_activation,
    _column_counters,
    _grad_sums_merge,
    _is_last,
    _layout,
    _like,
    _same_layout,
    _split_f64,
    _tile_offsets,
    launch_config,
    reduction_config,
)


@triton.jit
def _rsqrt_rn(v, ACC: tl.constexpr):
    """1 / sqrt(v), both correctly rounded (tl.sqrt and the division are the approximate instructions on
    NVIDIA in fp32)."""
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.math.div_rn(1.0, tl.sqrt_rn(v))
    return r


@triton.jit
def _running_invstd(rv_ptr, cols, cmask, eps_hi, eps_lo, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    # Float scalars reach kernels as fp32: eps comes as an hi + lo pair (bn_act.py _split_f64).
    eps = (tl.zeros([BLOCK_C], dtype=ACC) + eps_hi) + eps_lo
    var = tl.load(rv_ptr + cols, mask=cmask, other=1.0).to(ACC)
    return _rsqrt_rn(var + eps, ACC)


@triton.jit
def _bn_eval_act_fwd_kernel(x_ptr, out_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, res_ptr,
                            C, inner, n_rows, n_itiles, eps_hi, eps_lo,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
                            RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, cnt = _tile_offsets(tl.program_id(0), c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R,
                                    BLOCK_C)
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale = _running_invstd(rv_ptr, cols, cmask, eps_hi, eps_lo, ACC, BLOCK_C)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    mean = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    # (x - mean) * scale + b rather than x * scale + (b - mean * scale): no cancellation when |mean| >> std.
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        # `y < 0` rather than maximum(): NaN propagates like torch.relu.
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_grad(go_ptr, out_ptr, offs, mask, RELU: tl.constexpr, ACC: tl.constexpr):
    """g of one tile: grad_out, zeroed where out <= 0 when RELU (as torch's threshold_backward)."""
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o <= 0, 0.0, g)
    return g


@triton.jit
def _bn_eval_act_bwd_reduce_kernel(go_ptr, out_ptr, x_ptr, rm_ptr, invstd_ptr, pg_ptr, pgx_ptr, counter_ptr,
                                   C, inner, n_rows, n_itiles, n_tiles, tiles_per_prog, gw_ptr, gb_ptr,
                                   RELU: tl.constexpr, HAS_X: tl.constexpr, WRITE_GB: tl.constexpr,
                                   CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # Partials of sum(g) and (HAS_X: grad_weight asked) sum(g * (x - mean)), merged by the last program of each
    # channel block in a fixed order, which writes grad_weight = sum(g * (x - mean)) * invstd and grad_bias.
    pid_p = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_X:
        mean = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(ACC)
    t_begin = pid_p * tiles_per_prog
    n_local = tl.minimum(tiles_per_prog, n_tiles - t_begin)
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for k in range(0, n_local):
        offs, mask, cnt = _tile_offsets(t_begin + k, c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R,
                                        BLOCK_C)
        g = _relu_grad(go_ptr, out_ptr, offs, mask, RELU, ACC)
        acc_g += g
        if HAS_X:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            acc_gx += tl.where(mask, g * (x - mean[None, :]), 0.0)
    poffs = pid_p.to(tl.int64) * C + cols
    tl.store(pg_ptr + poffs, tl.sum(acc_g, axis=0), mask=cmask)
    if HAS_X:
        tl.store(pgx_ptr + poffs, tl.sum(acc_gx, axis=0), mask=cmask)
    if _is_last(counter_ptr):
        _grad_sums_merge(pg_ptr, pgx_ptr, invstd_ptr, tl.num_programs(0), C, cols, cmask, pg_ptr, pg_ptr,
                         gw_ptr, gb_ptr, HAS_X, False, HAS_X, WRITE_GB, ACC, BLOCK_P, BLOCK_C)


@triton.jit
def _bn_eval_act_bwd_dx_kernel(go_ptr, out_ptr, rv_ptr, w_ptr, dx_ptr, gr_ptr,
                               C, inner, n_rows, n_itiles, eps_hi, eps_lo,
                               RELU: tl.constexpr, HAS_W: tl.constexpr, WRITE_DX: tl.constexpr,
                               WRITE_G: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, cnt = _tile_offsets(tl.program_id(0), c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R,
                                    BLOCK_C)
    g = _relu_grad(go_ptr, out_ptr, offs, mask, RELU, ACC)
    if WRITE_G:
        tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        a = _running_invstd(rv_ptr, cols, cmask, eps_hi, eps_lo, ACC, BLOCK_C)
        if HAS_W:
            a = a * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        tl.store(dx_ptr + offs, (g * a[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)


def _running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], C: int):
    if running_mean is None or running_var is None:
        raise RuntimeError("resfuse triton: bn_eval_act needs running_mean and running_var")
    return _channel_vec("running_mean", running_mean, C), _channel_vec("running_var", running_var, C)


def bn_eval_act_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor,
                    eps: float, relu: bool) -> torch.Tensor:
    """Op bn_eval_act_triton: out, in x's dtype and suggested memory format; the running statistics are read."""
    _check_activation("input", x)
    lay = _layout(x)
    C = lay.C
    _, acc_tl = _acc_dtypes(x.dtype)
    rm, rv = _running_stats(running_mean, running_var, C)
    w = _channel_vec("weight", weight, C)
    b = _channel_vec("bias", bias, C)
    res = _same_layout("residual", residual, x, lay) if residual is not None else None
    out = _like(x, lay)
    if x.numel() == 0:
        return out
    xc = x.contiguous(memory_format=lay.fmt)
    cfg = launch_config(lay.outer, C, lay.inner, x.device)
    _bn_eval_act_fwd_kernel[(cfg.n_tiles, cfg.c_blocks)](
        xc, out, rm, rv, w if w is not None else xc, b if b is not None else xc, res if res is not None else xc,
        C, lay.inner, lay.outer * lay.inner, cfg.n_itiles, *_split_f64(eps),
        HAS_W=w is not None, HAS_B=b is not None, HAS_RES=res is not None, RELU=bool(relu),
        CHANNELS_LAST=cfg.channels_last, ACC=acc_tl, BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C,
        num_warps=cfg.num_warps)
    return out


def bn_eval_act_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], out: torch.Tensor,
                    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, relu: bool, output_mask):
    """Op _bn_eval_act_backward_triton: (grad_input, grad_weight, grad_bias, grad_residual); entries whose
    output_mask is False are empty tensors of the dtype they would have had."""
    _check_activation("input", x)
    mask = [bool(m) for m in output_mask]
    if len(mask) != 4:
        raise RuntimeError(f"resfuse triton: output_mask must have 4 entries, got {len(mask)}")
    lay = _layout(x)
    C = lay.C
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    dev = x.device
    rm, rv = _running_stats(running_mean, running_var, C)
    w = _channel_vec("weight", weight, C)
    wdt = weight.dtype if weight is not None else torch.float32

    def param_grad(wanted):
        return torch.empty(C if wanted else 0, dtype=wdt, device=dev)

    grad_input = _like(x, lay) if mask[0] else x.new_empty((0,))
    grad_weight, grad_bias = param_grad(mask[1]), param_grad(mask[2])
    grad_residual = _like(x, lay) if mask[3] else x.new_empty((0,))
    if x.numel() == 0 or not any(mask):
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_input, grad_weight, grad_bias, grad_residual

    go = _same_layout("grad_out", grad_out, x, lay)
    o = _same_layout("out", out, x, lay) if relu else go
    if mask[1] or mask[2]:
        cfg = reduction_config(lay.outer, C, lay.inner, dev)
        P = cfg.n_parts
        partials = torch.empty((2 if mask[1] else 1, P, C), dtype=acc_t, device=dev)  # one allocation
        pg, pgx = partials[0], partials[-1]
        # Only grad_weight's merge needs invstd, from torch ops: the merge cannot read one a program of the same
        # launch wrote without ordering the two, and this backward is off the hot path (GPUs fold BN instead).
        xc = x.contiguous(memory_format=lay.fmt) if mask[1] else go
        invstd = torch.rsqrt(rv.to(acc_t) + eps) if mask[1] else pg
        _bn_eval_act_bwd_reduce_kernel[(P, cfg.c_blocks)](
            go, o, xc, rm, invstd, pg, pgx, _column_counters(cfg.c_blocks, dev),
            C, lay.inner, lay.outer * lay.inner, cfg.n_itiles, cfg.n_tiles, cfg.tiles_per_prog,
            grad_weight if mask[1] else pg, grad_bias if mask[2] else pg,
            RELU=bool(relu), HAS_X=mask[1], WRITE_GB=mask[2], CHANNELS_LAST=cfg.channels_last, ACC=acc_tl,
            BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C, BLOCK_P=cfg.BLOCK_P, num_warps=cfg.num_warps)
    if mask[0] or mask[3]:
        cfg = launch_config(lay.outer, C, lay.inner, dev)
        _bn_eval_act_bwd_dx_kernel[(cfg.n_tiles, cfg.c_blocks)](
            go, o, rv, w if w is not None else rv, grad_input if mask[0] else go, grad_residual if mask[3] else go,
            C, lay.inner, lay.outer * lay.inner, cfg.n_itiles, *_split_f64(eps),
            RELU=bool(relu), HAS_W=w is not None, WRITE_DX=mask[0], WRITE_G=mask[3],
            CHANNELS_LAST=cfg.channels_last, ACC=acc_tl, BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C,
            num_warps=cfg.num_warps)
    return grad_input, grad_weight, grad_bias, grad_residual
