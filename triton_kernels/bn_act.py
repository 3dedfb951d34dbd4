"""Training-mode BatchNorm fused with residual add and ReLU, as Triton kernels.

Fused math, per channel c, with n = N*H*W values per channel:
    mean = sum(x) / n                  var = sum((x - mean)^2) / n        (biased)
    invstd = 1 / sqrt(var + eps)       scale = w * invstd                 shift = b - mean * scale
    out = act(x * scale + shift + residual)          act = ReLU or identity, residual optional
    running_mean <- (1 - momentum) * running_mean + momentum * mean                (in place)
    running_var  <- (1 - momentum) * running_var  + momentum * var * n / (n - 1)   (in place)
Backward:
    g = (0 where out <= 0 else grad_out) if relu else grad_out      xhat = (x - mean) * invstd
    sum_g = sum(g)                                          sum_gx = sum(g * xhat)
    grad_input = (g - sum_g / n - xhat * sum_gx / n) * invstd * w
    grad_weight = sum_gx      grad_bias = sum_g      grad_residual = g

Layouts: every activation is made contiguous in x.suggest_memory_format() and seen as [outer, C, inner], element
(o, c, i) at (o * C + c) * inner + i.  NCHW: outer = N, inner = H*W.  NHWC (channels_last): outer = N*H*W,
inner = 1.  All kernels work on 2-D tiles [BLOCK_R, BLOCK_C] (rows x channels) produced by `_tile_offsets`:
  * CHANNELS_LAST (inner == 1): rows are the outer index, a tile is BLOCK_R whole rows of BLOCK_C channels,
    offset = row * C + c, no integer division anywhere;
  * otherwise a tile lies inside one outer index o and covers BLOCK_R consecutive inner positions, so the
    inner index stays provably contiguous (vectorised loads); the only division is per tile, on a scalar.
Accumulation is fp32 (fp64 for float64 input); offsets are int64.

Statistics are a deterministic two-level reduction in one launch: each program of `_bn_stats_partial_kernel`
(grid: row-programs x channel blocks) folds a fixed range of tiles into per-program (count, mean, M2) partials
through sums shifted by its first tile's mean; the program of each channel block that finishes last (an
arrival counter, `_is_last`) merges that block's partials in a fixed order, writes mean / invstd and updates the
running statistics.  `_bn_act_fwd_kernel` then writes the output in one pass: two launches per forward.
The backward reduces sum(g) and sum(g * (x - mean)) the same way, and `_bn_act_bwd_dx_kernel` writes
grad_input and grad_residual in one pass: two launches per backward.  The gradient kernels also serve the conv
epilogue's backward (conv_epilogue.py) through their constexpr flags.  The reductions and the elementwise
kernels tile differently (`reduction_config`, `launch_config`).
"""
import functools
import struct
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# The layout rule every resfuse op writes its output in (torch's suggest_memory_format, with a fast path for
# dense 4-D tensors: each launch here asks it once or more).
from ..layout import memory_format_of as suggest_memory_format
from ._device import on_tensor_device
from ._interpret import INTERPRETING

# --------------------------------------------------------------------------------------------------------------
# Launch configuration: every block-size / grid decision lives here.
# --------------------------------------------------------------------------------------------------------------




def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


class LaunchConfig(NamedTuple):
    channels_last: bool   # inner == 1: rows are outer indices, channels contiguous
    BLOCK_R: int          # rows (or inner positions) per tile
    BLOCK_C: int          # channels per tile
    n_itiles: int         # tiles per outer index (NCHW); 1 for channels_last
    n_tiles: int          # row tiles in total (grid axis 0 of the elementwise kernels)
    c_blocks: int         # channel blocks (grid axis 1)
    tiles_per_prog: int   # row tiles folded by one reduction program
    n_parts: int          # reduction programs along rows = partial rows per channel
    BLOCK_P: int          # partials merged per step by the last program of a channel block
    num_warps: int


def _inner_block(inner: int) -> int:
    """Power of two in [64, 1024] (or np2(inner) when smaller) wasting the fewest masked lanes on the inner axis,
    the largest on ties: 56x56 -> 64 (no padding) rather than 1024 (23% padding)."""
    hi = min(_np2(inner), 1024)
    best = hi
    b = hi
    while b >= 64:
        if triton.cdiv(inner, b) * b < triton.cdiv(inner, best) * best:
            best = b
        b //= 2
    return best


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(outer: int, C: int, inner: int, device: torch.device) -> LaunchConfig:
    """Tiles of the elementwise kernels (apply, dx)."""
    return _configs(outer, C, inner, device)[0]


def reduction_config(outer: int, C: int, inner: int, device: torch.device) -> LaunchConfig:
    """Tiles, partials and merge steps of the reduction kernels (statistics, gradient sums)."""
    return _configs(outer, C, inner, device)[1]


# Cached, both in one lookup: a training step asks for the same few shapes on every call, and the host time of
# a launch is what limits a block at small activations (the GPU work of a C256_H14 block is a third of its
# eager host time).
@functools.lru_cache(maxsize=1024)
def _configs(outer: int, C: int, inner: int, device: torch.device) -> tuple[LaunchConfig, LaunchConfig]:
    """(elementwise, reduction) configurations of one [outer, C, inner] shape."""
    return (_launch_config(outer, C, inner, device, INTERPRETING, False),
            _launch_config(outer, C, inner, device, INTERPRETING, True))


def _launch_config(outer: int, C: int, inner: int, device: torch.device, interp: bool,
                   reduction: bool) -> LaunchConfig:
    """Block sizes from the [outer, C, inner] shape.

    The interpreter runs every program instance in Python, so there the tiles are tiny: that keeps CI fast on the
    small test shapes and still exercises the multi-tile, multi-partial and masked paths.  On a GPU a tile holds
    about 2K elements (enough bytes in flight per program, few registers) and the reduction keeps a few waves of
    programs busy while the partial buffer stays small.

    A reduction's tail is its merge: the last program of each channel block reads the block's n_parts partials,
    BLOCK_P = 2048 / BLOCK_C per step, one L2 round trip per step while the rest of the GPU waits: about
    4 x SMs x BLOCK_C^2 / (2048 x C) steps.  With 64-channel NHWC tiles that is 17 steps at C = 64 and 9 at
    C = 128 on an H100, so the reductions take 32-channel tiles (64-byte row segments) up to C = 128: 5 and 3
    steps, and more channel blocks merging at once.  The elementwise kernels keep 64-channel rows.
    """
    channels_last = inner == 1
    if channels_last:
        BLOCK_C = min(_np2(C), 16 if interp else (32 if reduction and C <= 128 else 64))
        BLOCK_R = 16 if interp else max(16, min(512, 2048 // BLOCK_C))
        n_itiles = 1
        n_tiles = triton.cdiv(outer, BLOCK_R)
    else:
        BLOCK_R = min(_np2(inner), 32) if interp else _inner_block(inner)
        BLOCK_C = min(_np2(C), 8 if interp else max(1, 2048 // BLOCK_R))
        n_itiles = triton.cdiv(inner, BLOCK_R)
        n_tiles = outer * n_itiles
    c_blocks = triton.cdiv(C, BLOCK_C)
    if interp:
        target_parts = 3
    else:
        sms = _sm_count(device) if device.type == "cuda" else 16
        target_parts = max(1, (4 * sms) // c_blocks)
    target_parts = max(1, min(target_parts, n_tiles))
    tiles_per_prog = triton.cdiv(n_tiles, target_parts)
    n_parts = triton.cdiv(n_tiles, tiles_per_prog)
    BLOCK_P = 2 if interp else max(1, min(64, 2048 // BLOCK_C))
    num_warps = 4 if BLOCK_R * BLOCK_C <= 2048 else 8
    return LaunchConfig(channels_last, BLOCK_R, BLOCK_C, n_itiles, n_tiles, c_blocks, tiles_per_prog, n_parts,
                        BLOCK_P, num_warps)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(t, c0, C, inner, n_rows, n_itiles,
          CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (int64), mask and valid-row count of row tile t and channels [c0, c0 + BLOCK_C)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    r = tl.arange(0, BLOCK_R)
    if CHANNELS_LAST:
        row0 = t.to(tl.int64) * BLOCK_R
        rows = row0 + r
        rmask = rows < n_rows
        offs = rows[:, None] * C + cols[None, :]
        cnt = tl.minimum(n_rows - row0, BLOCK_R)
    else:
        # The only integer division: one scalar per tile.
        o = t // n_itiles
        i0 = (t - o * n_itiles) * BLOCK_R
        i = i0 + r
        rmask = i < inner
        offs = (o.to(tl.int64) * C + cols[None, :]) * inner + i[:, None]
        cnt = tl.minimum(inner - i0, BLOCK_R)
    mask = rmask[:, None] & cmask[None, :]
    return offs, mask, cnt


@triton.jit
def _is_last(counter_ptr):
    """True in the one program of this channel block (grid axis 1) that arrives here last, which then resets the
    block's counter to zero for the next launch (see _column_counters). The barrier puts every thread's partial
    stores before the release, and the acquire puts the other programs' stores before the caller's loads."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tl.program_id(1), 1, sem="acq_rel")
    last = ticket == tl.num_programs(0) - 1
    if last:
        tl.store(counter_ptr + tl.program_id(1), 0)
    return last


@triton.jit
def _bn_stats_partial_kernel(x_ptr, cnt_ptr, pmean_ptr, pm2_ptr, counter_ptr,
                             C, inner, n_rows, n_itiles, n_tiles, tiles_per_prog,
                             eps_hi, eps_lo, mom_hi, mom_lo, mean_ptr, invstd_ptr, rm_ptr, rv_ptr,
                             rm_stride, rv_stride,
                             HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
                             CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                             STORE_M2: tl.constexpr = False):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c0 = pid_c * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    t_begin = pid_p * tiles_per_prog
    n_local = tl.minimum(tiles_per_prog, n_tiles - t_begin)
    # Shifted sums: every value is taken relative to `shift`, the mean of this program's first tile, so the
    # squares summed below are of the order of the variance and sum((x - shift)^2) - sum(x - shift)^2 / n does
    # not cancel even when |mean| >> std. The sums are tile-shaped, one per lane, and reduced across lanes once
    # after the loop: the loop body has no cross-warp reduction and no barrier, only loads and FMAs.
    # The first tile gives the shift and starts the sums.
    offs, mask, cnt = _tile_offsets(t_begin, c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    shift = tl.sum(x0, axis=0) / cnt.to(ACC)
    s1 = tl.where(mask, x0 - shift[None, :], 0.0)
    s2 = s1 * s1
    n = cnt
    # Two tiles per iteration, both loads issued before either is used: twice the bytes in flight per program.
    for k in range(1, n_local, 2):
        offs_a, mask_a, cnt_a = _tile_offsets(t_begin + k, c0, C, inner, n_rows, n_itiles, CHANNELS_LAST,
                                              BLOCK_R, BLOCK_C)
        offs_b, mask_b, cnt_b = _tile_offsets(t_begin + k + 1, c0, C, inner, n_rows, n_itiles, CHANNELS_LAST,
                                              BLOCK_R, BLOCK_C)
        has_b = k + 1 < n_local
        mask_b = mask_b & has_b
        xa = tl.load(x_ptr + offs_a, mask=mask_a, other=0.0).to(ACC)
        xb = tl.load(x_ptr + offs_b, mask=mask_b, other=0.0).to(ACC)
        da = tl.where(mask_a, xa - shift[None, :], 0.0)
        db = tl.where(mask_b, xb - shift[None, :], 0.0)
        s1 += da + db
        s2 += da * da + db * db
        n += cnt_a + tl.where(has_b, cnt_b, 0)
    nf = n.to(ACC)
    t1 = tl.sum(s1, axis=0)
    mean = shift + t1 / nf
    m2 = tl.sum(s2, axis=0) - t1 * (t1 / nf)
    m2 = tl.where(m2 < 0, 0.0, m2)  # rounding can leave a tiny negative; NaN (Inf or NaN input) stays NaN
    poffs = pid_p.to(tl.int64) * C + cols
    # One count per program (it is the same for every channel), stored per channel block so that each block's
    # merge reads only what its own programs wrote.
    tl.store(cnt_ptr + pid_c * tl.num_programs(0) + pid_p, nf)
    tl.store(pmean_ptr + poffs, mean, mask=cmask)
    tl.store(pm2_ptr + poffs, m2, mask=cmask)
    if _is_last(counter_ptr):
        _bn_stats_merge(cnt_ptr + pid_c * tl.num_programs(0), pmean_ptr, pm2_ptr, tl.num_programs(0), n_rows,
                        C, cols, cmask, eps_hi, eps_lo, mom_hi, mom_lo, mean_ptr, invstd_ptr, rm_ptr, rv_ptr,
                        rm_stride, rv_stride, HAS_RM, HAS_RV, ACC, BLOCK_P, BLOCK_C, STORE_M2)


@triton.jit
def _bn_stats_merge(cnt_ptr, pmean_ptr, pm2_ptr, P, n_total, C, cols, cmask, eps_hi, eps_lo, mom_hi, mom_lo,
                    mean_ptr, invstd_ptr, rm_ptr, rv_ptr, rm_stride, rv_stride,
                    HAS_RM: tl.constexpr, HAS_RV: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STORE_M2: tl.constexpr = False):
    """Merges the P partials (count, mean, M2) of channels `cols` in a fixed order, writes mean / invstd and
    updates the running statistics.

    The partials' means are taken relative to the first one's, `ref`: with d_p = mean_p - ref,
        mean = ref + sum(n_p * d_p) / n        M2 = sum(M2_p + n_p * d_p^2) - n * (mean - ref)^2
    exact, and without cancellation since every partial holds thousands of values and ref is within a few of
    their standard errors of the mean. Tile-shaped sums again: one cross-lane reduction after the loop."""
    # Float scalars reach kernels as fp32; eps and momentum come as hi + lo fp32 pairs so that float64
    # inputs see them at (nearly) double precision.
    eps = (tl.zeros([BLOCK_C], dtype=ACC) + eps_hi) + eps_lo
    momentum = (tl.zeros([BLOCK_C], dtype=ACC) + mom_hi) + mom_lo
    # .cg: other programs wrote these; read them from L2.
    ref = tl.load(pmean_ptr + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    a = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    b = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pmask = ps < P
        m = pmask[:, None] & cmask[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        cb = tl.load(cnt_ptr + ps, mask=pmask, other=0.0, cache_modifier=".cg")
        mp = tl.load(pmean_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
        m2p = tl.load(pm2_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
        d = tl.where(m, mp - ref[None, :], 0.0)
        nd = cb[:, None] * d
        a += nd
        b += m2p + nd * d
    n = (tl.zeros([BLOCK_C], dtype=ACC) + n_total).to(ACC)
    dm = tl.sum(a, axis=0) / n
    mean = ref + dm
    m2 = tl.sum(b, axis=0) - n * dm * dm
    m2 = tl.where(m2 < 0, 0.0, m2)  # as above: NaN stays NaN
    var = m2 / n
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        # tl.sqrt is the approximate instruction on NVIDIA; the stats deserve a correctly rounded one.
        invstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    if STORE_M2:  # the local statistics of synchronised BN (bn_act_passes.py): M2 in invstd's place
        tl.store(invstd_ptr + cols, m2, mask=cmask)
    else:
        tl.store(invstd_ptr + cols, invstd, mask=cmask)
    if HAS_RM:
        rm = tl.load(rm_ptr + cols * rm_stride, mask=cmask, other=0.0).to(ACC)
        rm = (1.0 - momentum) * rm + momentum * mean
        tl.store(rm_ptr + cols * rm_stride, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    if HAS_RV:
        # The launcher guarantees n > 1 here.
        unbiased = m2 / tl.where(n > 1, n - 1.0, 1.0)
        rv = tl.load(rv_ptr + cols * rv_stride, mask=cmask, other=0.0).to(ACC)
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(rv_ptr + cols * rv_stride, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_act_fwd_kernel(x_ptr, out_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr,
                       C, inner, n_rows, n_itiles,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
                       RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, cnt = _tile_offsets(tl.program_id(0), c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_W:
        scale = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)
    else:
        scale = tl.full([BLOCK_C], 1.0, dtype=ACC)
    if HAS_B:
        shift = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    scale = scale * invstd
    shift = shift - mean * scale
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = x * scale[None, :] + shift[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        # `y < 0` rather than maximum(): NaN propagates like torch.relu.
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(go_ptr, out_ptr, g_ptr, offs, mask, RELU: tl.constexpr, WRITE_G: tl.constexpr,
                 ACC: tl.constexpr):
    """g = grad_out masked by the ReLU (or grad_out without ReLU) of one tile; stored to g_ptr when WRITE_G.
    `out <= 0` gives 0, as torch's threshold_backward: where the output is NaN the gradient passes."""
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o <= 0, 0.0, g)
    if WRITE_G:
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    return g


@triton.jit
def _bn_act_bwd_reduce_kernel(go_ptr, out_ptr, x_ptr, mean_ptr, g_ptr, pg_ptr, pgx_ptr, counter_ptr,
                              C, inner, n_rows, n_itiles, n_tiles, tiles_per_prog,
                              invstd_ptr, sum_g_ptr, sum_gx_ptr, gw_ptr, gb_ptr,
                              RELU: tl.constexpr, HAS_X: tl.constexpr, WRITE_G: tl.constexpr,
                              STORE_SUMS: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GB: tl.constexpr,
                              CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # Partials of sum(g) and (HAS_X) sum(g * (x - mean)); invstd is applied once per channel in the merge.
    # WRITE_G stores g on the way (conv epilogue backward: g and grad_bias in one pass).
    pid_p = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_X:
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    t_begin = pid_p * tiles_per_prog
    n_local = tl.minimum(tiles_per_prog, n_tiles - t_begin)
    # Tile-shaped accumulators, reduced once at the end: fewer cross-lane reductions, better rounding.
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for k in range(0, n_local):
        offs, mask, cnt = _tile_offsets(t_begin + k, c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R, BLOCK_C)
        g = _masked_grad(go_ptr, out_ptr, g_ptr, offs, mask, RELU, WRITE_G, ACC)
        acc_g += g
        if HAS_X:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            acc_gx += tl.where(mask, g * (x - mean[None, :]), 0.0)
    poffs = pid_p.to(tl.int64) * C + cols
    tl.store(pg_ptr + poffs, tl.sum(acc_g, axis=0), mask=cmask)
    if HAS_X:
        tl.store(pgx_ptr + poffs, tl.sum(acc_gx, axis=0), mask=cmask)
    if _is_last(counter_ptr):
        _grad_sums_merge(pg_ptr, pgx_ptr, invstd_ptr, tl.num_programs(0), C, cols, cmask,
                         sum_g_ptr, sum_gx_ptr, gw_ptr, gb_ptr, HAS_X, STORE_SUMS, WRITE_GW, WRITE_GB, ACC,
                         BLOCK_P, BLOCK_C)


@triton.jit
def _grad_sums_merge(pg_ptr, pgx_ptr, invstd_ptr, P, C, cols, cmask, sum_g_ptr, sum_gx_ptr, gw_ptr, gb_ptr,
                     HAS_X: tl.constexpr, STORE_SUMS: tl.constexpr, WRITE_GW: tl.constexpr,
                     WRITE_GB: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Fixed summation order over the [P, C] partials: bitwise reproducible, unlike atomics.
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc_gx = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < P)[:, None] & cmask[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        acc_g += tl.load(pg_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
        if HAS_X:
            acc_gx += tl.load(pgx_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    sum_g = tl.sum(acc_g, axis=0)
    if STORE_SUMS:
        tl.store(sum_g_ptr + cols, sum_g, mask=cmask)
    if WRITE_GB:
        tl.store(gb_ptr + cols, sum_g.to(gb_ptr.dtype.element_ty), mask=cmask)
    if HAS_X:
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
        sum_gx = tl.sum(acc_gx, axis=0) * invstd
        if STORE_SUMS:
            tl.store(sum_gx_ptr + cols, sum_gx, mask=cmask)
        if WRITE_GW:
            tl.store(gw_ptr + cols, sum_gx.to(gw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_act_bwd_dx_kernel(go_ptr, out_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, sum_g_ptr, sum_gx_ptr,
                          dx_ptr, g_ptr, C, inner, n_rows, n_itiles, n_per_c,
                          RELU: tl.constexpr, HAS_W: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_G: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # WRITE_DX=False leaves only g = grad_out * (out > 0): the conv epilogue backward without grad_bias.
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, cnt = _tile_offsets(tl.program_id(0), c0, C, inner, n_rows, n_itiles, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    g = _masked_grad(go_ptr, out_ptr, g_ptr, offs, mask, RELU, WRITE_G, ACC)
    if WRITE_DX:
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        # n arrives as an integer so that 1/n is exact to the accumulation precision (fp64 too).
        inv_n = 1.0 / (tl.zeros([BLOCK_C], dtype=ACC) + n_per_c)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
        if HAS_W:
            a = invstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        else:
            a = invstd
        k_g = tl.load(sum_g_ptr + cols, mask=cmask, other=0.0) * inv_n
        k_x = tl.load(sum_gx_ptr + cols, mask=cmask, other=0.0) * invstd * inv_n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dx = (g - k_g[None, :] - (x - mean[None, :]) * k_x[None, :]) * a[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtypes(dtype: torch.dtype):
    """(torch accumulation dtype, triton accumulation dtype) for an activation dtype."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _to_f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


@functools.lru_cache(maxsize=256)  # eps and momentum: the same few values on every call
def _split_f64(v: float):
    """v as an fp32 pair (hi, lo) with hi + lo == v to about 48 bits."""
    v = float(v)
    hi = _to_f32(v)
    return hi, _to_f32(v - hi)


class _Layout(NamedTuple):
    fmt: torch.memory_format
    outer: int
    C: int
    inner: int


def _check_activation(name: str, t: torch.Tensor) -> None:
    if t.dim() < 2:
        raise RuntimeError(f"resfuse triton: {name} must have at least 2 dims (N, C, ...), got {t.dim()}")
    if t.dtype not in _SUPPORTED:
        raise RuntimeError(f"resfuse triton: unsupported dtype {t.dtype} for {name}; expected one of {_SUPPORTED}")
    if t.device.type == "cpu" and not INTERPRETING:
        raise RuntimeError("resfuse triton: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                           "importing resfuse.triton_kernels)")


def _layout(x: torch.Tensor) -> _Layout:
    fmt = suggest_memory_format(x)
    C = x.shape[1]
    if fmt in (torch.channels_last, torch.channels_last_3d):
        inner = 1
        outer = x.numel() // C if C > 0 else 0
    else:
        inner = 1
        for s in x.shape[2:]:
            inner *= s
        outer = x.shape[0]
    return _Layout(fmt, outer, C, inner)


def _like(t: torch.Tensor, lay: _Layout, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    # empty_like: half the host time of torch.empty with a shape and a memory format, on every launch.
    return torch.empty_like(t, dtype=dtype or t.dtype, memory_format=lay.fmt)


def _same_layout(name: str, t: torch.Tensor, x: torch.Tensor, lay: _Layout) -> torch.Tensor:
    if t.shape != x.shape:
        raise RuntimeError(f"resfuse triton: {name} shape {list(t.shape)} must equal input shape {list(x.shape)}")
    if t.device != x.device:
        raise RuntimeError(f"resfuse triton: {name} is on {t.device}, input on {x.device}")
    return t.contiguous(memory_format=lay.fmt)


def _channel_vec(name: str, t: Optional[torch.Tensor], C: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.numel() != C:
        raise RuntimeError(f"resfuse triton: {name} must have C={C} elements, got {t.numel()}")
    if t.dim() == 1 and t.is_contiguous():  # what the modules pass: skip reshape's dispatch
        return t
    return t.reshape(C).contiguous()


_counters: dict = {}


def _column_counters(n: int, device: torch.device) -> torch.Tensor:
    """Arrival counters of the reduction kernels (`_is_last`), zero on entry to a launch: the last program of
    each channel block resets its own, so one zeroed buffer per (device, stream) serves every later launch on
    that stream, whose kernels run in order. While a stream is captured into a CUDA graph a fresh zeroed
    buffer is used instead, its zeroing captured with the kernel, so every replay starts from zero."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    else:  # the interpreter runs one program after another
        key = (device.type, device.index)
    counters = _counters.get(key)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _counters[key] = counters
    return counters


def _apply(xc, out, lay, cfg, acc_tl, *, mean, invstd, weight=None, bias=None, residual=None, relu=False):
    """Elementwise pass out = act(x * scale + shift + residual)."""
    grid = (cfg.n_tiles, cfg.c_blocks)
    _bn_act_fwd_kernel[grid](
        xc, out, mean, invstd,
        weight if weight is not None else xc, bias if bias is not None else xc,
        residual if residual is not None else xc,
        lay.C, lay.inner, lay.outer * lay.inner, cfg.n_itiles,
        HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RES=residual is not None, RELU=bool(relu), CHANNELS_LAST=cfg.channels_last, ACC=acc_tl,
        BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps)


def _grad_reduce(go, out, xc, mean, invstd, g_out, lay, cfg, acc_t, acc_tl, *, relu, has_x,
                 sums=None, grad_weight=None, grad_bias=None):
    """Two-level reduction of sum(g) (and sum(g * xhat) when has_x); optionally writes g on the way.
    cfg: a reduction_config."""
    P, C = cfg.n_parts, lay.C
    partials = torch.empty((2 if has_x else 1, P, C), dtype=acc_t, device=go.device)  # one allocation
    pg, pgx = partials[0], partials[-1]
    sum_g, sum_gx = sums if sums is not None else (pg, pg)
    _bn_act_bwd_reduce_kernel[(P, cfg.c_blocks)](
        go, out if relu else go, xc if has_x else go, mean if has_x else pg,
        g_out if g_out is not None else go, pg, pgx, _column_counters(cfg.c_blocks, go.device),
        C, lay.inner, lay.outer * lay.inner, cfg.n_itiles, cfg.n_tiles, cfg.tiles_per_prog,
        invstd if has_x else pg, sum_g, sum_gx,
        grad_weight if grad_weight is not None else pg, grad_bias if grad_bias is not None else pg,
        RELU=bool(relu), HAS_X=has_x, WRITE_G=g_out is not None, STORE_SUMS=sums is not None,
        WRITE_GW=grad_weight is not None, WRITE_GB=grad_bias is not None,
        CHANNELS_LAST=cfg.channels_last, ACC=acc_tl,
        BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C, BLOCK_P=cfg.BLOCK_P, num_warps=cfg.num_warps)


def _grad_elementwise(go, out, xc, mean, invstd, weight, sums, dx, g_out, lay, cfg, acc_tl, *, relu):
    """One pass writing grad_input (when dx is given) and/or g (when g_out is given)."""
    any_t = go
    sum_g, sum_gx = sums if sums is not None else (any_t, any_t)
    _bn_act_bwd_dx_kernel[(cfg.n_tiles, cfg.c_blocks)](
        go, out if relu else any_t, xc if dx is not None else any_t,
        mean if dx is not None else any_t, invstd if dx is not None else any_t,
        weight if weight is not None else any_t, sum_g, sum_gx,
        dx if dx is not None else any_t, g_out if g_out is not None else any_t,
        lay.C, lay.inner, lay.outer * lay.inner, cfg.n_itiles, lay.outer * lay.inner,
        RELU=bool(relu), HAS_W=weight is not None, WRITE_DX=dx is not None, WRITE_G=g_out is not None,
        CHANNELS_LAST=cfg.channels_last, ACC=acc_tl, BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C,
        num_warps=cfg.num_warps)


@on_tensor_device
def bn_act_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
               running_var: Optional[torch.Tensor], momentum: float, eps: float, relu: bool):
    """Op bn_act: returns (out, save_mean, save_invstd); updates running_mean / running_var in place."""
    _check_activation("input", x)
    lay = _layout(x)
    C = lay.C
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    xc = x.contiguous(memory_format=lay.fmt)
    out = _like(x, lay)
    save_mean = torch.empty(C, dtype=acc_t, device=x.device)
    save_invstd = torch.empty(C, dtype=acc_t, device=x.device)
    w = _channel_vec("weight", weight, C)
    b = _channel_vec("bias", bias, C)
    res = _same_layout("residual", residual, x, lay) if residual is not None else None
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.numel() != C):
            raise RuntimeError(f"resfuse triton: {name} must be 1-D with C={C} elements, got {list(t.shape)}")
    if x.numel() == 0:
        # No statistics exist; zeros keep the outputs deterministic, running stats stay untouched.
        save_mean.zero_()
        save_invstd.zero_()
        return out, save_mean, save_invstd
    n = lay.outer * lay.inner
    if running_var is not None and n <= 1:
        raise RuntimeError(f"bn_act: expected more than 1 value per channel when training with running_var "
                           f"(n = N*H*W = {n}), got input size {list(x.shape)}")

    cfg, rcfg = _configs(lay.outer, C, lay.inner, x.device)
    P = rcfg.n_parts
    # One allocation; pcnt holds one count per (channel block, program), c_blocks * P <= C * P values.
    pcnt, pmean, pm2 = torch.empty((3, P, C), dtype=acc_t, device=x.device).unbind(0)
    has_rm, has_rv = running_mean is not None, running_var is not None
    _bn_stats_partial_kernel[(P, rcfg.c_blocks)](
        xc, pcnt, pmean, pm2, _column_counters(rcfg.c_blocks, x.device),
        C, lay.inner, n, rcfg.n_itiles, rcfg.n_tiles, rcfg.tiles_per_prog,
        *_split_f64(eps), *_split_f64(momentum), save_mean, save_invstd,
        running_mean if has_rm else save_mean, running_var if has_rv else save_mean,
        running_mean.stride(0) if has_rm else 1, running_var.stride(0) if has_rv else 1,
        HAS_RM=has_rm, HAS_RV=has_rv, CHANNELS_LAST=rcfg.channels_last, ACC=acc_tl,
        BLOCK_R=rcfg.BLOCK_R, BLOCK_C=rcfg.BLOCK_C, BLOCK_P=rcfg.BLOCK_P, num_warps=rcfg.num_warps)
    _apply(xc, out, lay, cfg, acc_tl, mean=save_mean, invstd=save_invstd, weight=w, bias=b, residual=res,
           relu=relu)
    return out, save_mean, save_invstd


@on_tensor_device
def bn_act_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], out: torch.Tensor,
               save_mean: torch.Tensor, save_invstd: torch.Tensor, relu: bool, output_mask):
    """Op _bn_act_backward: returns (grad_input, grad_weight, grad_bias, grad_residual).

    Entries whose output_mask is False are empty tensors of the dtype they would have had.
    """
    _check_activation("input", x)
    mask = [bool(m) for m in output_mask]
    if len(mask) != 4:
        raise RuntimeError(f"resfuse triton: output_mask must have 4 entries, got {len(mask)}")
    lay = _layout(x)
    C = lay.C
    acc_t, acc_tl = _acc_dtypes(x.dtype)
    wdt = weight.dtype if weight is not None else torch.float32
    dev = x.device
    grad_input = _like(x, lay) if mask[0] else torch.empty(0, dtype=x.dtype, device=dev)
    grad_weight = torch.empty(C, dtype=wdt, device=dev) if mask[1] else torch.empty(0, dtype=wdt, device=dev)
    grad_bias = torch.empty(C, dtype=wdt, device=dev) if mask[2] else torch.empty(0, dtype=wdt, device=dev)
    grad_residual = _like(x, lay) if mask[3] else torch.empty(0, dtype=x.dtype, device=dev)
    if x.numel() == 0 or not any(mask):
        if mask[1]:
            grad_weight.zero_()
        if mask[2]:
            grad_bias.zero_()
        return grad_input, grad_weight, grad_bias, grad_residual

    go = _same_layout("grad_out", grad_out, x, lay)
    o = _same_layout("out", out, x, lay) if relu else None
    xc = x.contiguous(memory_format=lay.fmt)
    mean = _channel_vec("save_mean", save_mean, C)
    invstd = _channel_vec("save_invstd", save_invstd, C)
    w = _channel_vec("weight", weight, C)
    cfg, rcfg = _configs(lay.outer, C, lay.inner, dev)

    sums = None
    if mask[0] or mask[1] or mask[2]:
        has_x = mask[0] or mask[1]
        if mask[0]:
            sums = tuple(torch.empty((2, C), dtype=acc_t, device=dev).unbind(0))
        _grad_reduce(go, o, xc, mean, invstd, None, lay, rcfg, acc_t, acc_tl, relu=relu, has_x=has_x, sums=sums,
                     grad_weight=grad_weight if mask[1] else None, grad_bias=grad_bias if mask[2] else None)
    if mask[0] or mask[3]:
        _grad_elementwise(go, o, xc, mean, invstd, w, sums, grad_input if mask[0] else None,
                          grad_residual if mask[3] else None, lay, cfg, acc_tl, relu=relu)
    return grad_input, grad_weight, grad_bias, grad_residual
