"""Epilogue of conv_bn_act (eval mode, BN folded into the convolution) after an ATen convolution.

Fused math, per channel c:
    forward:   out = act(conv_out + bias[c] + residual)          act = ReLU or identity, bias/residual optional
    backward:  g = grad_out * (out > 0) if relu else grad_out    grad_bias[c] = sum(g)   (fp32 accumulation,
               fp64 for float64, cast to the bias dtype); g is also grad_residual and the gradient fed to
               at::convolution_backward.
Each direction is ONE pass over the activation.

Layouts: as in bn_act.py, the tensor made contiguous in its suggested memory format viewed as [outer, C, inner]
(NCHW: outer = N, inner = H*W; channels_last: outer = N*H*W, inner = 1).  No kernel is defined here: the forward is
bn_act's apply kernel with the normalisation switched off (HAS_NORM=False), the backward is bn_act's gradient
reduction with WRITE_G (grid: row-programs x channel blocks, then the deterministic partial merge) or, without
grad_bias, bn_act's elementwise gradient kernel writing only g.
"""
from typing import Optional

import torch

from .bn_act import (
    _acc_dtypes,
    _apply,
    _channel_vec,
    _check_activation,
    _grad_elementwise,
    _grad_reduce,
    _layout,
    _like,
    _same_layout,
    launch_config,
    reduction_config,
)


def conv_epilogue_fwd(conv_out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                      relu: bool, inplace: bool = False) -> torch.Tensor:
    """out = act(conv_out + bias[c] + residual), in conv_out's suggested memory format.

    With inplace=True the result overwrites conv_out (meant for a fresh convolution output).  When conv_out is not
    contiguous in its suggested format the private contiguous copy is reused as the output either way.
    """
    _check_activation("conv_out", conv_out)
    lay = _layout(conv_out)
    y = conv_out.contiguous(memory_format=lay.fmt)
    out = y if (inplace or y is not conv_out) else _like(conv_out, lay)
    if conv_out.numel() == 0:
        return out
    b = _channel_vec("bias", bias, lay.C)
    res = _same_layout("residual", residual, conv_out, lay) if residual is not None else None
    if b is None and res is None and not relu:
        if out is not y:
            out.copy_(y)
        return out
    _, acc_tl = _acc_dtypes(conv_out.dtype)
    cfg = launch_config(lay.outer, lay.C, lay.inner, conv_out.device)
    _apply(y, out, lay, cfg, acc_tl, bias=b, residual=res, relu=relu)
    return out


def conv_epilogue_bwd(grad_out: torch.Tensor, out: torch.Tensor, relu: bool, need_grad_bias: bool,
                      bias_dtype: torch.dtype = torch.float32):
    """(g, grad_bias): g = grad_out * (out > 0) if relu else grad_out, in out's dtype and suggested format;
    grad_bias = sum of g per channel in bias_dtype, or an empty tensor of bias_dtype when not needed."""
    _check_activation("out", out)
    lay = _layout(out)
    dev = out.device
    g = _like(out, lay)
    grad_bias = torch.empty(lay.C if need_grad_bias else 0, dtype=bias_dtype, device=dev)
    if out.numel() == 0:
        grad_bias.zero_()
        return g, grad_bias
    go = _same_layout("grad_out", grad_out, out, lay)
    o = out.contiguous(memory_format=lay.fmt) if relu else None
    acc_t, acc_tl = _acc_dtypes(out.dtype)
    if need_grad_bias:
        cfg = reduction_config(lay.outer, lay.C, lay.inner, dev)
        _grad_reduce(go, o, None, None, None, g, lay, cfg, acc_t, acc_tl, relu=relu, has_x=False,
                     grad_bias=grad_bias)
    else:
        cfg = launch_config(lay.outer, lay.C, lay.inner, dev)
        _grad_elementwise(go, o, None, None, None, None, None, None, g, lay, cfg, acc_tl, relu=relu)
    return g, grad_bias
