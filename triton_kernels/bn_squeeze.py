"""BatchNorm's batch statistics and the per-sample squeeze of its normalised input, as Triton kernels.

Fused math (resfuse/ops/bn_squeeze.py), with P = H*W positions and M = N*P values per channel:
    per (n, c): mean_nc, M2_nc over the P positions        (sums shifted by the first tile's mean)
    per c:      mean = sum_n mean_nc / N      M2 = sum_n M2_nc + P * sum_n (mean_nc - mean)^2
                invstd = 1 / sqrt(M2 / M + eps)           running stats as bn_act (unbiased variance)
    squeeze[n, c] = (mean_nc - mean) * invstd
Backward, with q = grad_squeeze, gm = grad_mean, gi = grad_invstd (absent ones zero), Q1 = sum_n q,
Q2 = sum_n q * squeeze:
    grad_x = a[n, c] - (x - mean) * b[c],   a = q * invstd / P + (gm - invstd * Q1) / M,
                                            b = invstd^2 * (invstd * gi + Q2) / M

Kernels (sample_tiles.py has the layouts and tiles): forward `_bn_squeeze_plane_kernel` (one program per sample
and channel block: one read of x) then `_bn_squeeze_finalize_kernel` (one program per channel block, on the
[N, C] partials); backward `_bn_squeeze_coef_kernel` ([N, C] coefficients) then `_bn_squeeze_dx_kernel` (one
elementwise pass). Accumulation is fp32 (fp64 for float64 input).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from .bn_act import _acc_dtypes, _channel_vec, _check_activation, _split_f64
from .sample_tiles import _elementwise_tile, _sample_tile, sample_config, sample_layout


@triton.jit
def _bn_squeeze_plane_kernel(x_ptr, pmean_ptr, pm2_ptr, C, P, p_tiles,
                             CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # Sums shifted by the first tile's mean: squares of the order of the variance, no cancellation when
    # |mean| >> std. Tile-shaped sums, reduced across lanes once after the loop.
    offs, mask, cnt = _sample_tile(n, 0, c0, C, P, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    shift = tl.sum(x0, axis=0) / cnt.to(ACC)
    s1 = tl.where(mask, x0 - shift[None, :], 0.0)
    s2 = s1 * s1
    for t in range(1, p_tiles):
        offs, mask, cnt = _sample_tile(n, t, c0, C, P, CHANNELS_LAST, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - shift[None, :], 0.0)
        s1 += d
        s2 += d * d
    p = (tl.zeros([BLOCK_C], dtype=ACC) + P).to(ACC)
    t1 = tl.sum(s1, axis=0)
    mean = shift + t1 / p
    m2 = tl.sum(s2, axis=0) - t1 * (t1 / p)
    m2 = tl.where(m2 < 0, 0.0, m2)  # rounding can leave a tiny negative; NaN (Inf or NaN input) stays NaN
    poffs = n.to(tl.int64) * C + cols
    tl.store(pmean_ptr + poffs, mean, mask=cmask)
    tl.store(pm2_ptr + poffs, m2, mask=cmask)


@triton.jit
def _bn_squeeze_finalize_kernel(pmean_ptr, pm2_ptr, mean_ptr, invstd_ptr, sq_ptr, rm_ptr, rv_ptr,
                                rm_stride, rv_stride, N, C, P, eps_hi, eps_lo, mom_hi, mom_lo,
                                HAS_RM: tl.constexpr, HAS_RV: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # Float scalars reach kernels as fp32: eps and momentum come as hi + lo pairs (bn_act.py).
    eps = (tl.zeros([BLOCK_C], dtype=ACC) + eps_hi) + eps_lo
    momentum = (tl.zeros([BLOCK_C], dtype=ACC) + mom_hi) + mom_lo
    total = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < N)[:, None] & cmask[None, :]
        offs = ns.to(tl.int64)[:, None] * C + cols[None, :]
        total += tl.load(pmean_ptr + offs, mask=m, other=0.0)
    nf = (tl.zeros([BLOCK_C], dtype=ACC) + N).to(ACC)
    mean = tl.sum(total, axis=0) / nf
    within = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    between = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < N)[:, None] & cmask[None, :]
        offs = ns.to(tl.int64)[:, None] * C + cols[None, :]
        d = tl.where(m, tl.load(pmean_ptr + offs, mask=m, other=0.0) - mean[None, :], 0.0)
        within += tl.load(pm2_ptr + offs, mask=m, other=0.0)
        between += d * d
    pf = (tl.zeros([BLOCK_C], dtype=ACC) + P).to(ACC)
    count = nf * pf
    var = (tl.sum(within, axis=0) + pf * tl.sum(between, axis=0)) / count
    var = tl.where(var < 0, 0.0, var)  # NaN stays NaN
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = 1.0 / tl.sqrt_rn(var + eps)  # tl.sqrt is the approximate instruction on NVIDIA
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < N)[:, None] & cmask[None, :]
        offs = ns.to(tl.int64)[:, None] * C + cols[None, :]
        pm = tl.load(pmean_ptr + offs, mask=m, other=0.0)
        tl.store(sq_ptr + offs, (pm - mean[None, :]) * invstd[None, :], mask=m)
    if HAS_RM:
        rm = tl.load(rm_ptr + cols * rm_stride, mask=cmask, other=0.0).to(ACC)
        rm = (1.0 - momentum) * rm + momentum * mean
        tl.store(rm_ptr + cols * rm_stride, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    if HAS_RV:
        # The launcher guarantees count > 1 here.
        rv = tl.load(rv_ptr + cols * rv_stride, mask=cmask, other=0.0).to(ACC)
        rv = (1.0 - momentum) * rv + momentum * (var * count / (count - 1.0))
        tl.store(rv_ptr + cols * rv_stride, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_squeeze_coef_kernel(q_ptr, gm_ptr, gi_ptr, sq_ptr, invstd_ptr, a_ptr, b_ptr, N, C, P,
                            HAS_Q: tl.constexpr, HAS_GM: tl.constexpr, HAS_GI: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    q1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    q2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    if HAS_Q:
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            m = (ns < N)[:, None] & cmask[None, :]
            offs = ns.to(tl.int64)[:, None] * C + cols[None, :]
            q = tl.load(q_ptr + offs, mask=m, other=0.0).to(ACC)
            q1 += q
            q2 += q * tl.load(sq_ptr + offs, mask=m, other=0.0).to(ACC)
    nf = (tl.zeros([BLOCK_C], dtype=ACC) + N).to(ACC)
    pf = (tl.zeros([BLOCK_C], dtype=ACC) + P).to(ACC)
    count = nf * pf
    base = -invstd * tl.sum(q1, axis=0)
    if HAS_GM:
        base += tl.load(gm_ptr + cols, mask=cmask, other=0.0).to(ACC)
    base = base / count
    inner = tl.sum(q2, axis=0)
    if HAS_GI:
        inner += invstd * tl.load(gi_ptr + cols, mask=cmask, other=0.0).to(ACC)
    tl.store(b_ptr + cols, invstd * invstd * inner / count, mask=cmask)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < N)[:, None] & cmask[None, :]
        offs = ns.to(tl.int64)[:, None] * C + cols[None, :]
        a = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC) + base[None, :]
        if HAS_Q:
            a += tl.load(q_ptr + offs, mask=m, other=0.0).to(ACC) * (invstd / pf)[None, :]
        tl.store(a_ptr + offs, a, mask=m)


@triton.jit
def _bn_squeeze_dx_kernel(x_ptr, mean_ptr, a_ptr, b_ptr, dx_ptr, C, P, p_tiles,
                          CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, cols, cmask, offs, mask = _elementwise_tile(C, P, p_tiles, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    a = tl.load(a_ptr + n.to(tl.int64) * C + cols, mask=cmask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dx = a[None, :] - (x - mean[None, :]) * b[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _per_sample(name: str, t: Optional[torch.Tensor], N: int, C: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if tuple(t.shape) != (N, C):
        raise RuntimeError(f"resfuse triton: {name} must have shape [{N}, {C}], got {list(t.shape)}")
    return t.contiguous()


@on_tensor_device
def bn_squeeze_fwd(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   momentum: float, eps: float):
    """Op bn_squeeze: returns (squeeze [N, C], mean, invstd); updates running_mean / running_var in place."""
    _check_activation("input", x)
    lay = sample_layout(x)
    N, C, P = lay.N, lay.C, lay.P
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    squeeze = torch.empty((N, C), dtype=acc_t, device=x.device)
    mean = torch.empty(C, dtype=acc_t, device=x.device)
    invstd = torch.empty(C, dtype=acc_t, device=x.device)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.numel() != C):
            raise RuntimeError(f"resfuse triton: {name} must be 1-D with C={C} elements, got {list(t.shape)}")
    if x.numel() == 0:
        # No statistics exist; zeros keep the outputs deterministic, running stats stay untouched.
        return squeeze.zero_(), mean.zero_(), invstd.zero_()
    if running_var is not None and N * P <= 1:
        raise RuntimeError(f"bn_squeeze: expected more than 1 value per channel when training with running_var "
                           f"(n = N*H*W = {N * P}), got input size {list(x.shape)}")
    xc = x.contiguous(memory_format=lay.fmt)
    cfg = sample_config(N, C, P, lay.channels_last)
    pmean, pm2 = torch.empty((2, N, C), dtype=acc_t, device=x.device).unbind(0)
    _bn_squeeze_plane_kernel[(N, cfg.c_blocks)](
        xc, pmean, pm2, C, P, cfg.p_tiles, CHANNELS_LAST=lay.channels_last, ACC=acc_tl,
        BLOCK_P=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps)
    has_rm, has_rv = running_mean is not None, running_var is not None
    _bn_squeeze_finalize_kernel[(cfg.c_blocks,)](
        pmean, pm2, mean, invstd, squeeze, running_mean if has_rm else mean, running_var if has_rv else mean,
        running_mean.stride(0) if has_rm else 1, running_var.stride(0) if has_rv else 1, N, C, P,
        *_split_f64(eps), *_split_f64(momentum), HAS_RM=has_rm, HAS_RV=has_rv, ACC=acc_tl,
        BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C)
    return squeeze, mean, invstd


def bn_squeeze_bwd(grad_squeeze: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor],
                   grad_invstd: Optional[torch.Tensor], x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                   squeeze: torch.Tensor) -> torch.Tensor:
    """Op _bn_squeeze_backward: grad_input, in x's dtype and suggested layout."""
    # The device guard keys on the first argument, and the gradients may each be None: x goes first.
    return _bn_squeeze_bwd(x, grad_squeeze, grad_mean, grad_invstd, mean, invstd, squeeze)


@on_tensor_device
def _bn_squeeze_bwd(x, grad_squeeze, grad_mean, grad_invstd, mean, invstd, squeeze):
    _check_activation("input", x)
    lay = sample_layout(x)
    N, C, P = lay.N, lay.C, lay.P
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    dx = torch.empty_like(x, memory_format=lay.fmt)
    if x.numel() == 0:
        return dx
    q = _per_sample("grad_squeeze", grad_squeeze, N, C)
    sq = _per_sample("squeeze", squeeze, N, C)
    gm = _channel_vec("grad_mean", grad_mean, C)
    gi = _channel_vec("grad_invstd", grad_invstd, C)
    mean = _channel_vec("mean", mean, C)
    invstd = _channel_vec("invstd", invstd, C)
    cfg = sample_config(N, C, P, lay.channels_last)
    a = torch.empty((N, C), dtype=acc_t, device=x.device)
    b = torch.empty(C, dtype=acc_t, device=x.device)
    _bn_squeeze_coef_kernel[(cfg.c_blocks,)](
        q if q is not None else a, gm if gm is not None else b, gi if gi is not None else b, sq, invstd, a, b,
        N, C, P, HAS_Q=q is not None, HAS_GM=gm is not None, HAS_GI=gi is not None, ACC=acc_tl,
        BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C)
    _bn_squeeze_dx_kernel[(N * cfg.p_tiles, cfg.c_blocks)](
        x.contiguous(memory_format=lay.fmt), mean, a, b, dx, C, P, cfg.p_tiles, CHANNELS_LAST=lay.channels_last,
        ACC=acc_tl, BLOCK_P=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps)
    return dx
