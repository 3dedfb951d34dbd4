"""Implicit-GEMM 2-D convolution with the conv_bn_act epilogue fused in, as one Triton kernel.

Fused math (eval mode, BatchNorm already folded into weight and bias):
    out[n, co, oh, ow] = act(sum_{kh, kw, ci} x[n, ci_g, ih, iw] * w[co, ci, kh, kw] + bias[co] + residual[n, co, oh, ow])
        ih = oh * stride_h - pad_h + kh * dil_h        iw = ow * stride_w - pad_w + kw * dil_w
        ci_g = group(co) * Cg + ci                     Cg = C_in / groups, Cog = C_out / groups
    act = ReLU or identity; bias and residual optional.  Taps outside the input read zero (padding).

As a GEMM:  M = N*OH*OW output pixels (rows),  N = C_out (columns),  K = KH*KW*Cg.  Nothing is materialised:
each program gathers its A tile [BLOCK_M pixels, BLOCK_K channels] straight from the NHWC activation, masking
padding and bounds, loads the matching B tile [BLOCK_K, BLOCK_N] of the weight, accumulates with tl.dot in fp32
(fp64 for float64) and, once K is exhausted, adds bias and residual, applies ReLU and stores the tile once.

Layouts:
  * input: NHWC, i.e. a channels_last tensor; NCHW input is copied to channels_last by the launcher, because
    the gather wants each pixel's channels contiguous (a K block of one tap is one contiguous run per row).
  * weight: K-major [KH*KW*Cg, C_out] with row k = (kh*KW + kw)*Cg + ci and C_out contiguous (`pack_weight`,
    one small copy per call, none for a weight already stored that way).  C_out-contiguous rows make every B
    tile BLOCK_K contiguous runs of BLOCK_N elements whatever Cg is (a [C_out, KH, KW, Cg] layout would give
    runs of Cg elements: 8 bytes for ResNeXt's 4 channels per group), and the flat-K mode below reads rows
    k0..k0+BLOCK_K of that matrix with no index arithmetic at all.
  * output: the input's suggested memory format (channels_last stays channels_last, anything else comes back
    contiguous NCHW); the kernel writes either directly, so NCHW callers pay no output transpose.  The residual
    is read in the output's layout.

K loop modes (constexpr, picked by the launcher):
  * per tap (default): the K loop runs over (tap, channel block) pairs flattened into one loop, so that
    Triton's software pipeliner sees a single long loop even when C_in/BLOCK_K is 1 or 2.  Per step only a
    [BLOCK_M] vector of pixel addresses and bounds is recomputed.
  * IS_1X1 (1x1, stride 1, no padding): a plain GEMM over the NHWC pixels, no spatial decode or bounds.
  * FLAT_K (groups == 1, C_in < 16, more than one tap, e.g. the 7x7 stem with C_in=3): the per-tap mode would
    waste most of every K block (3 of 16+ lanes), so K = (kh, kw, ci) is walked as one flat range and each
    [BLOCK_M, BLOCK_K] element decodes its own tap.

Groups: the columns of a program are a block of `gpb` consecutive groups, gpb = BLOCK_N // Cog when Cog fits a
tile (else 1, and the group's Cog columns span several tiles).  Its K range is those groups' gpb*Cg input
channels and the B tile is made block-diagonal by masking weight entries whose input-channel group differs
from the column's group.  ResNeXt (Cg = Cog = 4) thus runs with full-width loads of 16+ channels instead of
4-wide tiles per group; the masked MMA work is cheap next to the memory traffic of such a conv.

Grid: one axis, pid -> (pixel tile, column tile) with the column tile varying fastest, so consecutive programs
reuse the same activation tile from L2 (the weights are small and stay resident anyway).
Autotuning (configs in one place below, keyed on the problem shape): the first call for a new shape benchmarks
the candidates, which synchronises the host and must stay outside CUDA-graph capture; every later call is a
plain asynchronous launch.  Under the interpreter there is a single tiny config and no benchmarking.
Offsets: image bases are int64 (N*H*W*C may pass 2^31); offsets inside one image and pixel indices are int32,
which the launcher checks.
"""
import inspect
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from ._interpret import INTERPRETING
from .bn_act import _check_activation, suggest_memory_format

# --------------------------------------------------------------------------------------------------------------
# Launch configuration: every tile / warp / stage choice lives here.
# --------------------------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# GPU candidates: large square tiles for the wide late-stage convs, tall/narrow ones for C_out = 64 stages and
# packed grouped convs, and a 64-deep K block for the 1x1 convs with long K.  Configs that do not fit shared
# memory on a given GPU (the fp32 128x128x64 one on A100) are skipped by the autotuner.
_GPU_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),
    _cfg(64, 32, 32, 4, 4),
]
# fp64 dot has no fast tensor-core path on most GPUs: small tiles keep the fp64 accumulator in registers.
_GPU_CONFIGS_FP64 = [
    _cfg(64, 64, 16, 4, 2),
    _cfg(32, 64, 16, 4, 2),
]
# The interpreter runs every program in Python: one config (no benchmarking) with the smallest tiles tl.dot
# accepts in N and K, so the small test shapes still cover several pixel tiles, column tiles and masks.
_INTERP_CONFIGS = [_cfg(32, 16, 16, 1, 1)]

# Autotuning is keyed on everything that shapes the GEMM and the gather; the autotuner adds the tensor dtypes.
_TUNE_KEY = ["N", "H", "W", "C_in", "OH", "OW", "C_out", "stride_h", "stride_w", "pad_h", "pad_w",
             "dil_h", "dil_w", "groups", "KH", "KW"]

# Below this many input channels a conv with several taps walks K flat (see FLAT_K in the module docstring).
_FLAT_K_MAX_CIN = 16

# tl.dot's precision keyword: input_precision since triton 3.0; older releases only know allow_tf32.
_DOT_HAS_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters


def _configs(fp64: bool):
    if INTERPRETING:
        return _INTERP_CONFIGS
    return _GPU_CONFIGS_FP64 if fp64 else _GPU_CONFIGS


# --------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    # out_dtype named: tl.dot's default is fp32, and triton 3.6 rejects an fp64 accumulator against it.
    if USE_INPUT_PRECISION:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        acc = tl.dot(a, b, acc, allow_tf32=DOT_PRECISION == "tf32", out_dtype=ACC)
    return acc


@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
    N, H, W, C_in, OH, OW, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    groups, Cg, Cog,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, OUT_CL: tl.constexpr,
    IS_1X1: tl.constexpr, FLAT_K: tl.constexpr, GROUPED: tl.constexpr, CG_ALIGN: tl.constexpr,
    COG_ALIGN: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    M = N * OH * OW
    OHW = OH * OW

    # ---- columns: which output channels, and which input channels feed them
    if GROUPED:
        # `+ (Cog > BLOCK_N)` is max(BLOCK_N // Cog, 1) in a form that also folds when Cog is specialised to 1.
        gpb = BLOCK_N // Cog + (Cog > BLOCK_N)
        tiles_per_gb = tl.cdiv(gpb * Cog, BLOCK_N)
        num_pid_n = tl.cdiv(groups, gpb) * tiles_per_gb
        pid_m = pid // num_pid_n
        pid_n = pid - pid_m * num_pid_n
        gb = pid_n // tiles_per_gb
        g_lo = gb * gpb
        g_hi = tl.minimum(g_lo + gpb, groups)
        # Group boundaries are multiples of Cg / Cog; saying so lets Triton vectorise the gathers and stores
        # (e.g. 8-byte loads for ResNeXt's 4 bf16 channels per group instead of single elements).
        n_start = tl.multiple_of(g_lo * Cog + (pid_n - gb * tiles_per_gb) * BLOCK_N, COG_ALIGN)
        n_end = tl.multiple_of(g_hi * Cog, COG_ALIGN)
        c_lo = tl.multiple_of(g_lo * Cg, CG_ALIGN)
        c_len = tl.multiple_of((g_hi - g_lo) * Cg, CG_ALIGN)
        offs_n = n_start + tl.arange(0, BLOCK_N)
        col_group = offs_n // Cog
    else:
        # Kept free of group arithmetic so that Triton can prove the alignment of the weight / output columns.
        num_pid_n = tl.cdiv(C_out, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid - pid_m * num_pid_n
        n_end = C_out
        c_lo = 0
        c_len = C_in
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end

    # ---- rows: output pixels, decoded once per program
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    img = offs_m // OHW
    p = offs_m - img * OHW
    x_img = x_ptr + img.to(tl.int64) * H * W * C_in
    if not IS_1X1:
        oh = p // OW
        ow = p - oh * OW
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if FLAT_K:
        K = KH * KW * C_in
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < K
            tap = kk // C_in
            ci = kk - tap * C_in
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_mask = (m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a = tl.load(x_img[:, None] + ((ih * W + iw) * C_in + ci[None, :]), mask=a_mask, other=0.0)
            b = tl.load(w_ptr + (kk[:, None] * C_out + offs_n[None, :]),
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, USE_INPUT_PRECISION, ACC)
    else:
        n_cblk = tl.cdiv(c_len, BLOCK_K)
        for step in range(0, KH * KW * n_cblk):
            tap = step // n_cblk
            cb = step - tap * n_cblk
            offs_c = cb * BLOCK_K + tl.arange(0, BLOCK_K)  # relative to c_lo
            c_mask = offs_c < c_len
            if IS_1X1:
                a_row = x_img + p * C_in
                row_mask = m_mask
            else:
                kh = tap // KW
                kw = tap - kh * KW
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                row_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_row = x_img + (ih * W + iw) * C_in
            a = tl.load(a_row[:, None] + (c_lo + offs_c)[None, :], mask=row_mask[:, None] & c_mask[None, :],
                        other=0.0)
            if GROUPED:
                ci = c_lo + offs_c
                ci_group = ci // Cg
                w_rows = tap * Cg + (ci - ci_group * Cg)
                b_mask = (c_mask[:, None] & n_mask[None, :]) & (ci_group[:, None] == col_group[None, :])
            else:
                w_rows = tap * C_in + offs_c
                b_mask = c_mask[:, None] & n_mask[None, :]
            b = tl.load(w_ptr + (w_rows[:, None] * C_out + offs_n[None, :]), mask=b_mask, other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, USE_INPUT_PRECISION, ACC)

    # ---- epilogue: bias, residual, ReLU, one store
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
    if OUT_CL:
        o_offs = offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    else:
        # NCHW: consecutive pixels are contiguous, so the store still coalesces along the rows.
        o_offs = img.to(tl.int64)[:, None] * C_out * OHW + (offs_n[None, :] * OHW + p[:, None])
    o_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + o_offs, mask=o_mask, other=0.0).to(ACC)
    if RELU:
        # `acc < 0` rather than maximum(): NaN propagates like torch.relu.
        acc = tl.where(acc < 0, 0.0, acc)
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# Two tuned entry points over the same kernel: the fp64 one gets its own (small-tile) candidates.
_conv_bn_act_tuned = triton.autotune(configs=_configs(False), key=_TUNE_KEY)(_conv_bn_act_kernel)
_conv_bn_act_tuned_fp64 = triton.autotune(configs=_configs(True), key=_TUNE_KEY)(_conv_bn_act_kernel)


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


def _pair(name: str, v: Union[int, Sequence[int]]) -> tuple:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"resfuse triton conv: {name} must be an int or a pair, got {v}")
    return t


def _pow2_divisor(v: int, cap: int = 16) -> int:
    """Largest power of two <= cap dividing v (an alignment hint for the kernel)."""
    d = 1
    while d < cap and v % (2 * d) == 0:
        d *= 2
    return d


def _cudnn_conv_allows_tf32() -> bool:
    """torch's switch for TF32 in fp32 convolutions (what cuDNN would do for the same call)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        # The legacy getter refuses once the per-operator API set conv and RNN differently; ask the conv flag.
        return getattr(torch.backends.cudnn.conv, "fp32_precision", "ieee") == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for fp32 when torch allows it for convs, never under the interpreter
    (whose numpy dot would not round to TF32 anyway, and tests expect IEEE results)."""
    if dtype == torch.float32 and not INTERPRETING and _cudnn_conv_allows_tf32():
        return "tf32"
    return "ieee"


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, Cg, KH, KW] conv weight -> the kernel's K-major [KH*KW*Cg, C_out] (contiguous); cacheable."""
    C_out, Cg, KH, KW = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(KH * KW * Cg, C_out).contiguous()


@on_tensor_device
def conv_bn_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                    relu: bool) -> torch.Tensor:
    """act(conv2d(x, weight, None, stride, padding, dilation, groups) + bias[c] + residual), in one kernel.

    x: [N, C_in, H, W] in any layout (copied to channels_last unless it already is); weight: [C_out, C_in/groups,
    KH, KW] of x's dtype; bias: C_out values or None; residual: the output's shape or None.  Returns a tensor of
    x's dtype, contiguous in x's suggested memory format.  A weight stored in the kernel's layout (resfuse/nn/fold.py
    ``gemm_layout``) is packed without a copy.
    """
    _check_activation("input", x)
    if x.dim() != 4:
        raise RuntimeError(f"resfuse triton conv: input must be 4-D (N, C, H, W), got shape {list(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise RuntimeError(f"resfuse triton conv: unsupported dtype {x.dtype}; expected one of {_SUPPORTED}")
    if weight.dim() != 4:
        raise RuntimeError(f"resfuse triton conv: weight must be 4-D (C_out, C_in/groups, KH, KW), "
                           f"got shape {list(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise RuntimeError(f"resfuse triton conv: weight dtype/device ({weight.dtype}, {weight.device}) must match "
                           f"the input's ({x.dtype}, {x.device})")
    groups = int(groups)
    N, C_in, H, W = x.shape
    C_out, Cg, KH, KW = weight.shape
    if groups < 1 or C_in != Cg * groups or C_out % groups != 0:
        raise RuntimeError(f"resfuse triton conv: input channels {C_in}, weight {list(weight.shape)} and "
                           f"groups={groups} do not match (need C_in == weight.shape[1] * groups and C_out % groups "
                           f"== 0)")
    (sh, sw), (ph, pw), (dh, dw) = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise RuntimeError(f"resfuse triton conv: need stride >= 1, dilation >= 1, padding >= 0; got stride "
                           f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise RuntimeError(f"resfuse triton conv: output size ({OH} x {OW}) is too small for input "
                           f"{list(x.shape)}, kernel {KH}x{KW}, padding {(ph, pw)}, dilation {(dh, dw)}")

    fmt = suggest_memory_format(x)
    out = torch.empty((N, C_out, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    b = None
    if bias is not None:
        if bias.numel() != C_out or bias.device != x.device:
            raise RuntimeError(f"resfuse triton conv: bias must have C_out={C_out} elements on {x.device}, got "
                               f"{bias.numel()} on {bias.device}")
        b = bias.reshape(C_out).contiguous()
    res = None
    if residual is not None:
        if tuple(residual.shape) != tuple(out.shape) or residual.device != x.device:
            raise RuntimeError(f"resfuse triton conv: residual shape {list(residual.shape)} on {residual.device} "
                               f"must equal the output shape {list(out.shape)} on {x.device}")
        res = residual.contiguous(memory_format=fmt)
    if out.numel() == 0:
        return out

    w = pack_weight(weight)
    # Pixel indices and offsets inside one image are int32 in the kernel; only image bases are int64.
    if N * OH * OW > _INT32_MAX or H * W * C_in > _INT32_MAX or OH * OW * C_out > _INT32_MAX:
        raise RuntimeError(f"resfuse triton conv: problem too large for int32 pixel indexing (N*OH*OW = "
                           f"{N * OH * OW}, H*W*C_in = {H * W * C_in}, OH*OW*C_out = {OH * OW * C_out})")

    xc = x.contiguous(memory_format=torch.channels_last)
    if xc.numel() == 0:
        # C_in == 0: the K loop runs zero times and never dereferences the input; any valid pointer will do.
        xc = out
    is_1x1 = KH == 1 and KW == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0
    flat_k = groups == 1 and C_in < _FLAT_K_MAX_CIN and KH * KW > 1
    fp64 = x.dtype == torch.float64
    acc_tl = tl.float64 if fp64 else tl.float32

    def grid(meta):
        bn = meta["BLOCK_N"]
        if groups > 1:
            Cog = C_out // groups
            gpb = bn // Cog if Cog <= bn else 1
            n_tiles = triton.cdiv(groups, gpb) * triton.cdiv(gpb * Cog, bn)
        else:
            n_tiles = triton.cdiv(C_out, bn)
        return (triton.cdiv(N * OH * OW, meta["BLOCK_M"]) * n_tiles,)

    kernel = _conv_bn_act_tuned_fp64 if fp64 else _conv_bn_act_tuned
    kernel[grid](
        xc, w, b if b is not None else w, res if res is not None else out, out,
        N, H, W, C_in, OH, OW, C_out,
        sh, sw, ph, pw, dh, dw,
        groups, Cg, C_out // groups,
        KH=KH, KW=KW,
        HAS_BIAS=b is not None, HAS_RES=res is not None, RELU=bool(relu),
        OUT_CL=fmt == torch.channels_last, IS_1X1=is_1x1, FLAT_K=flat_k, GROUPED=groups > 1,
        CG_ALIGN=_pow2_divisor(Cg), COG_ALIGN=_pow2_divisor(C_out // groups), ACC=acc_tl,
        DOT_PRECISION=_dot_precision(x.dtype), USE_INPUT_PRECISION=_DOT_HAS_INPUT_PRECISION,
    )
    return out
