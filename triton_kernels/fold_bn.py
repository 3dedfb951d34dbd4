"""The eval-mode BatchNorm folded into the convolution before it, as one Triton launch (op _fold_bn_triton).

    scale = bn_weight / sqrt(running_var + eps)          (bn_weight absent: 1)
    W'[o] = conv_weight[o] * scale[o]        b' = bn_bias + (conv_bias - running_mean) * scale     (absent: 0)

computed in fp32 (fp64 for fp64 conv weights) and written in the outputs' dtype. W' arrives allocated dense in
a storage order (a permutation of [C_out, Cg, KH, KW], outermost first: csrc/fold_bn.h's layouts); the kernel
walks that storage in order, so its stores are coalesced, decodes each flat index into (o, i, kh, kw) and reads
conv_weight through its strides, whatever its layout. The programs whose indices fall below C_out also write
b': one launch for both outputs.
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .bn_act import _split_f64
from .bn_eval_act import _running_invstd
from ._interpret import INTERPRETING

_BLOCK = 1024


@triton.jit
def _fold_scale(bw_ptr, rv_ptr, o, m, eps_hi, eps_lo, HAS_BW: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    scale = _running_invstd(rv_ptr, o, m, eps_hi, eps_lo, ACC, BLOCK)
    if HAS_BW:
        scale = tl.load(bw_ptr + o, mask=m, other=1.0).to(ACC) * scale
    return scale


@triton.jit
def _rounded(v, OUT: tl.constexpr):
    """v in dtype OUT as torch rounds it: a double goes to 16 bits through float (c10's Half and BFloat16), and
    Triton's interpreter has no direct fp64 -> bf16 conversion."""
    if OUT != tl.float64:
        v = v.to(tl.float32)
    return v.to(OUT)


@triton.jit
def _fold_bn_kernel(w_ptr, folded_ptr, bias_ptr, cb_ptr, bw_ptr, bb_ptr, rm_ptr, rv_ptr, numel, C,
                    size1, size2, size3, stride0, stride1, stride2, stride3, eps_hi, eps_lo,
                    O_LAST: tl.constexpr, HAS_CB: tl.constexpr, HAS_BW: tl.constexpr, HAS_BB: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # (k0, k1, k2, k3): the coordinates in storage order, k3 fastest; strides are conv_weight's, in that order.
    k3 = offs % size3
    rest = offs // size3
    k2 = rest % size2
    rest = rest // size2
    k1 = rest % size1
    k0 = rest // size1
    if O_LAST:  # the output channel is the fastest storage dim (gemm), else the slowest
        o = k3
    else:
        o = k0
    m = offs < numel
    scale = _fold_scale(bw_ptr, rv_ptr, o, m, eps_hi, eps_lo, HAS_BW, ACC, BLOCK)
    w = tl.load(w_ptr + k0 * stride0 + k1 * stride1 + k2 * stride2 + k3 * stride3, mask=m, other=0.0).to(ACC)
    tl.store(folded_ptr + offs, _rounded(w * scale, folded_ptr.dtype.element_ty), mask=m)

    cm = offs < C
    shift = -tl.load(rm_ptr + offs, mask=cm, other=0.0).to(ACC)
    if HAS_CB:
        shift += tl.load(cb_ptr + offs, mask=cm, other=0.0).to(ACC)
    shift = shift * _fold_scale(bw_ptr, rv_ptr, offs, cm, eps_hi, eps_lo, HAS_BW, ACC, BLOCK)
    if HAS_BB:
        shift += tl.load(bb_ptr + offs, mask=cm, other=0.0).to(ACC)
    tl.store(bias_ptr + offs, _rounded(shift, bias_ptr.dtype.element_ty), mask=cm)


def fold_bn_fwd(conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                folded: torch.Tensor, bias: torch.Tensor, order: Sequence[int]) -> None:
    """Writes W' into ``folded`` (shaped like conv_weight, dense in ``order``: the dims of [C_out, Cg, KH, KW]
    from outermost to innermost, (0, 1, 2, 3), (0, 2, 3, 1) or (2, 3, 1, 0)) and b' into ``bias`` ([C_out])."""
    if conv_weight.device.type == "cpu" and not INTERPRETING:
        raise RuntimeError("resfuse triton: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                           "importing resfuse.triton_kernels)")
    order = tuple(order)
    if order not in ((0, 1, 2, 3), (0, 2, 3, 1), (2, 3, 1, 0)):
        raise RuntimeError(f"resfuse triton: unsupported storage order {order} for the folded weight")
    C = conv_weight.shape[0]
    params = {name: t.reshape(C).contiguous() if t is not None else None for name, t in
              (("conv_bias", conv_bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
               ("running_mean", running_mean), ("running_var", running_var))}
    numel = conv_weight.numel()
    if max(numel, C) == 0:
        return
    sizes = [max(conv_weight.shape[d], 1) for d in order]  # a 0 would divide by zero in masked-off lanes
    strides = [conv_weight.stride(d) for d in order]
    acc_tl = tl.float64 if conv_weight.dtype == torch.float64 else tl.float32
    any_t = params["running_var"]
    _fold_bn_kernel[(triton.cdiv(max(numel, C), _BLOCK),)](
        conv_weight, folded, bias, *(params[n] if params[n] is not None else any_t
                                     for n in ("conv_bias", "bn_weight", "bn_bias")),
        params["running_mean"], params["running_var"], numel, C, sizes[1], sizes[2], sizes[3], *strides,
        *_split_f64(eps), O_LAST=order[3] == 0, HAS_CB=conv_bias is not None, HAS_BW=bn_weight is not None,
        HAS_BB=bn_bias is not None, ACC=acc_tl, BLOCK=_BLOCK)
