"""BatchNorm with given statistics, a per-(sample, channel) factor, the shortcut and ReLU, as Triton kernels.

Fused math (resfuse/ops/bn_scale_act.py; absent arguments are the identity: mean 0, invstd 1, w 1, b 0, f 1):
    z = (x - mean) * invstd * w + b            out = act(z * f[n, c] + residual)
Backward, with g = grad_out masked by the ReLU (`out <= 0` gives 0, as torch's threshold_backward) and, per
(n, c), S1 = sum_p g, S2 = sum_p g * (x - mean):
    grad_x = g * f * w * invstd        grad_residual = g        grad_scale[n, c] = w * invstd * S2 + b * S1
    grad_w = sum_n f * invstd * S2     grad_b = sum_n f * S1
    grad_mean = -sum_n f * w * invstd * S1                       grad_invstd = sum_n f * w * S2

Kernels (sample_tiles.py has the layouts and tiles): forward `_bn_scale_act_fwd_kernel`, one elementwise pass;
backward `_bn_scale_act_bwd_kernel` (one program per sample and channel block: reads grad_out, out and x once,
writes grad_x and grad_residual, and the [N, C] sums) then, when a parameter's gradient is asked for,
`_bn_scale_act_param_kernel` on the [N, C] sums. Accumulation is fp32 (fp64 for float64 input).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from .bn_act import _acc_dtypes, _channel_vec, _check_activation, _same_layout
from .bn_squeeze import _per_sample
from .sample_tiles import _elementwise_tile, _sample_tile, sample_config, sample_layout


@triton.jit
def _channel_or(ptr, cols, cmask, identity, HAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel argument of the block's channels, or its identity value when the argument is absent."""
    if HAS:
        v = tl.load(ptr + cols, mask=cmask, other=identity).to(ACC)
    else:
        v = tl.full([BLOCK_C], identity, dtype=ACC)
    return v


@triton.jit
def _bn_scale_act_fwd_kernel(x_ptr, out_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, s_ptr, res_ptr, C, P, p_tiles,
                             HAS_MEAN: tl.constexpr, HAS_INVSTD: tl.constexpr, HAS_W: tl.constexpr,
                             HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_RES: tl.constexpr,
                             RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, cols, cmask, offs, mask = _elementwise_tile(C, P, p_tiles, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    mean = _channel_or(mean_ptr, cols, cmask, 0.0, HAS_MEAN, ACC, BLOCK_C)
    scale = _channel_or(invstd_ptr, cols, cmask, 1.0, HAS_INVSTD, ACC, BLOCK_C) * \
        _channel_or(w_ptr, cols, cmask, 1.0, HAS_W, ACC, BLOCK_C)
    shift = _channel_or(b_ptr, cols, cmask, 0.0, HAS_B, ACC, BLOCK_C)
    if HAS_S:
        f = tl.load(s_ptr + n.to(tl.int64) * C + cols, mask=cmask, other=1.0).to(ACC)
        scale = scale * f
        shift = shift * f
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # `y < 0` rather than maximum(): NaN propagates like torch.relu
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_scale_act_bwd_kernel(go_ptr, out_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, s_ptr, gx_ptr, gr_ptr,
                             s1_ptr, s2_ptr, C, P, p_tiles,
                             HAS_MEAN: tl.constexpr, HAS_INVSTD: tl.constexpr, HAS_W: tl.constexpr,
                             HAS_S: tl.constexpr, RELU: tl.constexpr, WRITE_GX: tl.constexpr,
                             WRITE_GR: tl.constexpr, SUMS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = _channel_or(mean_ptr, cols, cmask, 0.0, HAS_MEAN, ACC, BLOCK_C)
    a = _channel_or(invstd_ptr, cols, cmask, 1.0, HAS_INVSTD, ACC, BLOCK_C) * \
        _channel_or(w_ptr, cols, cmask, 1.0, HAS_W, ACC, BLOCK_C)
    if HAS_S:
        a = a * tl.load(s_ptr + n.to(tl.int64) * C + cols, mask=cmask, other=1.0).to(ACC)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for t in range(0, p_tiles):
        offs, mask, cnt = _sample_tile(n, t, c0, C, P, CHANNELS_LAST, BLOCK_P, BLOCK_C)
        g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            o = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(o <= 0, 0.0, g)
        if WRITE_GR:
            tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
        if WRITE_GX:
            tl.store(gx_ptr + offs, (g * a[None, :]).to(gx_ptr.dtype.element_ty), mask=mask)
        if SUMS:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            s1 += g
            s2 += tl.where(mask, g * (x - mean[None, :]), 0.0)
    if SUMS:
        poffs = n.to(tl.int64) * C + cols
        tl.store(s1_ptr + poffs, tl.sum(s1, axis=0), mask=cmask)
        tl.store(s2_ptr + poffs, tl.sum(s2, axis=0), mask=cmask)


@triton.jit
def _bn_scale_act_param_kernel(s1_ptr, s2_ptr, invstd_ptr, w_ptr, b_ptr, s_ptr,
                               gw_ptr, gb_ptr, gm_ptr, gi_ptr, gs_ptr, N, C,
                               HAS_INVSTD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               HAS_S: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GB: tl.constexpr,
                               WRITE_GM: tl.constexpr, WRITE_GI: tl.constexpr, WRITE_GS: tl.constexpr,
                               ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    i = _channel_or(invstd_ptr, cols, cmask, 1.0, HAS_INVSTD, ACC, BLOCK_C)
    w = _channel_or(w_ptr, cols, cmask, 1.0, HAS_W, ACC, BLOCK_C)
    b = _channel_or(b_ptr, cols, cmask, 0.0, HAS_B, ACC, BLOCK_C)
    # sum_n f * S1 and sum_n f * S2: every parameter gradient is one of them times a per-channel factor.
    fs1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    fs2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < N)[:, None] & cmask[None, :]
        offs = ns.to(tl.int64)[:, None] * C + cols[None, :]
        s1 = tl.load(s1_ptr + offs, mask=m, other=0.0)
        s2 = tl.load(s2_ptr + offs, mask=m, other=0.0)
        if WRITE_GS:
            gs = (w * i)[None, :] * s2 + b[None, :] * s1
            tl.store(gs_ptr + offs, gs.to(gs_ptr.dtype.element_ty), mask=m)
        if HAS_S:
            f = tl.load(s_ptr + offs, mask=m, other=0.0).to(ACC)
            s1 = s1 * f
            s2 = s2 * f
        fs1 += s1
        fs2 += s2
    t1 = tl.sum(fs1, axis=0)
    t2 = tl.sum(fs2, axis=0)
    if WRITE_GW:
        tl.store(gw_ptr + cols, (i * t2).to(gw_ptr.dtype.element_ty), mask=cmask)
    if WRITE_GB:
        tl.store(gb_ptr + cols, t1.to(gb_ptr.dtype.element_ty), mask=cmask)
    if WRITE_GM:
        tl.store(gm_ptr + cols, (-(w * i) * t1).to(gm_ptr.dtype.element_ty), mask=cmask)
    if WRITE_GI:
        tl.store(gi_ptr + cols, (w * t2).to(gi_ptr.dtype.element_ty), mask=cmask)


def _vectors(x, weight, bias, mean, invstd, scale, C):
    N = x.shape[0]
    return (_channel_vec("weight", weight, C), _channel_vec("bias", bias, C), _channel_vec("mean", mean, C),
            _channel_vec("invstd", invstd, C), _per_sample("scale", scale, N, C))


@on_tensor_device
def bn_scale_act_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     mean: Optional[torch.Tensor], invstd: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Op bn_scale_act: out, in x's dtype and suggested layout."""
    _check_activation("input", x)
    lay = sample_layout(x)
    N, C, P = lay.N, lay.C, lay.P
    out = torch.empty_like(x, memory_format=lay.fmt)
    if x.numel() == 0:
        return out
    _, acc_tl = _acc_dtypes(x.dtype)
    w, b, m, i, s = _vectors(x, weight, bias, mean, invstd, scale, C)
    res = _same_layout("residual", residual, x, lay) if residual is not None else None
    xc = x.contiguous(memory_format=lay.fmt)
    cfg = sample_config(N, C, P, lay.channels_last)
    _bn_scale_act_fwd_kernel[(N * cfg.p_tiles, cfg.c_blocks)](
        xc, out, *(t if t is not None else xc for t in (m, i, w, b, s, res)), C, P, cfg.p_tiles,
        HAS_MEAN=m is not None, HAS_INVSTD=i is not None, HAS_W=w is not None, HAS_B=b is not None,
        HAS_S=s is not None, HAS_RES=res is not None, RELU=bool(relu), CHANNELS_LAST=lay.channels_last,
        ACC=acc_tl, BLOCK_P=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps)
    return out


@on_tensor_device
def bn_scale_act_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], mean: Optional[torch.Tensor], invstd: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor], out: torch.Tensor, relu: bool, output_mask):
    """Op _bn_scale_act_backward: (grad_input, grad_weight, grad_bias, grad_mean, grad_invstd, grad_scale,
    grad_residual); an entry output_mask does not ask for is an empty tensor of the dtype it would have had."""
    _check_activation("input", x)
    mask = [bool(v) for v in output_mask]
    if len(mask) != 7:
        raise RuntimeError(f"resfuse triton: output_mask must have 7 entries, got {len(mask)}")
    lay = sample_layout(x)
    N, C, P = lay.N, lay.C, lay.P
    dev = x.device
    like = (x, weight, bias, mean, invstd, scale, x)
    for k, t in enumerate(like):
        if mask[k] and t is None:
            raise RuntimeError(f"resfuse triton: output_mask asks for the gradient of argument {k}, which was "
                               "not given")
    grads = [torch.empty(0, dtype=t.dtype if t is not None else torch.float32, device=dev) for t in like]
    for k in (0, 6):
        if mask[k]:
            grads[k] = torch.empty_like(x, memory_format=lay.fmt)
    for k in (1, 2, 3, 4, 5):
        if mask[k]:
            t = like[k]  # contiguous, whatever the argument's strides: the kernels write [C] and [N, C] rows
            grads[k] = (torch.zeros if x.numel() == 0 else torch.empty)(t.shape, dtype=t.dtype, device=dev)
    if x.numel() == 0 or not any(mask):
        return tuple(grads)

    acc_t, acc_tl = _acc_dtypes(x.dtype)
    w, b, m, i, s = _vectors(x, weight, bias, mean, invstd, scale, C)
    go = _same_layout("grad_out", grad_out, x, lay)
    o = _same_layout("out", out, x, lay) if relu else None
    xc = x.contiguous(memory_format=lay.fmt)
    cfg = sample_config(N, C, P, lay.channels_last)
    sums = any(mask[1:6])
    s1, s2 = torch.empty((2, N, C) if sums else (2, 0), dtype=acc_t, device=dev).unbind(0)
    gx = grads[0] if mask[0] else go
    gr = grads[6] if mask[6] else go
    _bn_scale_act_bwd_kernel[(N, cfg.c_blocks)](
        go, o if o is not None else go, xc, m if m is not None else xc, i if i is not None else xc,
        w if w is not None else xc, s if s is not None else xc, gx, gr, s1, s2, C, P, cfg.p_tiles,
        HAS_MEAN=m is not None, HAS_INVSTD=i is not None, HAS_W=w is not None, HAS_S=s is not None,
        RELU=bool(relu), WRITE_GX=mask[0], WRITE_GR=mask[6], SUMS=sums, CHANNELS_LAST=lay.channels_last,
        ACC=acc_tl, BLOCK_P=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps)
    if sums:
        _bn_scale_act_param_kernel[(cfg.c_blocks,)](
            s1, s2, *(t if t is not None else s1 for t in (i, w, b, s)), *(grads[k] if mask[k] else s1
                                                                         for k in (1, 2, 3, 4, 5)), N, C,
            HAS_INVSTD=i is not None, HAS_W=w is not None, HAS_B=b is not None, HAS_S=s is not None,
            WRITE_GW=mask[1], WRITE_GB=mask[2], WRITE_GM=mask[3], WRITE_GI=mask[4], WRITE_GS=mask[5], ACC=acc_tl,
            BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C)
    return tuple(grads)
