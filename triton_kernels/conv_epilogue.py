"""Backward of conv_bn_act's epilogue (eval mode, BN folded into the convolution), before ATen's conv backward.

The forward epilogue, out = act(conv_out + bias[c] + residual), lives inside the conv kernel (conv_bn_act.py).
Fused math of its backward, per channel c:
    g = grad_out * (out > 0) if relu else grad_out    grad_bias[c] = sum(g)   (fp32 accumulation, fp64 for
    float64, cast to the bias dtype); g is also grad_residual and the gradient fed to at::convolution_backward.
ONE pass over the activation.

Layouts: as in bn_act.py, the tensor made contiguous in its suggested memory format viewed as [outer, C, inner]
(NCHW: outer = N, inner = H*W; channels_last: outer = N*H*W, inner = 1).  No kernel is defined here: with
grad_bias this is bn_act's gradient reduction with WRITE_G (grid: row-programs x channel blocks, then the
deterministic partial merge), without it bn_act's elementwise gradient kernel writing only g.
"""
import torch

from ._device import on_tensor_device
from .bn_act import (
    _acc_dtypes,
    _check_activation,
    _grad_elementwise,
    _grad_reduce,
    _layout,
    _like,
    _same_layout,
    launch_config,
    reduction_config,
)


@on_tensor_device
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
