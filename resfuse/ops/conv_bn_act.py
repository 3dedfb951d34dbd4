"""``conv_bn_act``: eval-mode conv with BatchNorm folded into its weight and bias, + residual + ReLU.

    out = act(conv2d(x, W') + b' [+ residual])

Flavours: ``resfuse::conv_bn_act`` (C++) and ``resfuse::conv_bn_act_triton``; backward ops
``resfuse::_conv_bn_act_backward`` and ``resfuse::_conv_bn_act_backward_triton``.
- Triton: one implicit-GEMM kernel over NHWC with the epilogue (bias, residual, ReLU) fused in.
- C++: ATen's convolution (cuDNN / oneDNN), then one fused epilogue pass over its output.
Backward (both): one fused pass for the ReLU mask and the bias gradient, then ATen's convolution backward.
``backend="auto"`` on a GPU first tries cuDNN's fused conv + bias (+ add) + ReLU (``cudnn_fused.py``), the
fastest eval path measured, when no gradient is needed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _loader
from ..reference import conv_bn_act_ref, memory_format_of
from . import _autograd, cudnn_fused
from ._checks import check_activation, check_channel_vector, check_matches
from .backend import requested_backend, resolve_backend

_SCHEMA = ("(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, SymInt[2] stride, SymInt[2] padding, "
           "SymInt[2] dilation, SymInt groups, bool relu) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor weight, Tensor out, SymInt[2] stride, "
                    "SymInt[2] padding, SymInt[2] dilation, SymInt groups, bool relu, bool[] output_mask) "
                    "-> (Tensor, Tensor, Tensor, Tensor)")


def conv_bn_act_triton(input, weight, bias, residual, stride, padding, dilation, groups, relu):
    # One launch: implicit-GEMM conv with the bias + residual + ReLU epilogue (triton_kernels/conv_bn_act.py).
    kernels = _loader.require_triton_kernels()
    return kernels.conv_bn_act_fwd(input, weight, bias, residual, stride, padding, dilation, groups, relu)


def _conv_bn_act_backward_triton(grad_out, input, weight, out, stride, padding, dilation, groups, relu,
                                 output_mask):
    kernels = _loader.require_triton_kernels()
    g, grad_bias = kernels.conv_epilogue_bwd(grad_out, out, relu, bool(output_mask[2]), weight.dtype)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        g, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [bool(output_mask[0]), bool(output_mask[1]), False])
    grad_input = (grad_input.contiguous(memory_format=memory_format_of(input)) if output_mask[0]
                  else input.new_empty((0,)))
    grad_weight = (grad_weight.contiguous(memory_format=memory_format_of(weight)) if output_mask[1]
                   else weight.new_empty((0,)))
    grad_residual = g if output_mask[3] else input.new_empty((0,))
    return grad_input, grad_weight, grad_bias, grad_residual


_autograd.define_triton_op("conv_bn_act_triton", _SCHEMA, conv_bn_act_triton)
_autograd.define_triton_op("_conv_bn_act_backward_triton", _BACKWARD_SCHEMA, _conv_bn_act_backward_triton)
_autograd.register_conv_bn_act("conv_bn_act_triton", "_conv_bn_act_backward_triton")
if _loader.extension is not None:
    _autograd.register_conv_bn_act("conv_bn_act", "_conv_bn_act_backward")


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    return [int(i) for i in v]


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(conv2d(x, weight) + bias + residual)``; weight and bias are the BN-folded ones."""
    check_activation(x)
    if weight.device != x.device:
        raise RuntimeError(f"weight is on {weight.device} but the input is on {x.device}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"weight has dtype {weight.dtype} but the input has dtype {x.dtype}: "
                           "convert the model or the input so they match")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"expected input with {weight.shape[1] * groups} channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_shape = _autograd.conv_output_shape(x, weight, stride, padding, dilation)
    check_channel_vector(x, bias, "bias", allow_fp32=False, channels=weight.shape[0])
    check_matches(residual, out_shape, x.dtype, x.device, "residual")
    requested = requested_backend(backend)
    return run_conv_bn_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, requested,
                           resolve_backend(requested, x.device))


def run_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
                    requested: str, impl: str) -> Tensor:
    """``conv_bn_act`` on checked arguments (stride, padding, dilation as pairs), with the backend already
    requested and resolved: the path of resfuse's modules, which check their input once per block and pass
    weights they made themselves (resfuse/nn/functional.py)."""
    if requested == "auto" and cudnn_fused.unusable_reason(x, weight, bias, residual, relu) is None:
        out = cudnn_fused.run(x, weight, bias, residual, stride, padding, dilation, groups)
        if out is not None:
            return out
    if impl == "reference":
        return conv_bn_act_ref(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    op = torch.ops.resfuse.conv_bn_act if impl == "cuda" else torch.ops.resfuse.conv_bn_act_triton
    return op(x, weight, bias, residual, stride, padding, dilation, groups, bool(relu))
