"""``conv_bn_act``: eval-mode conv with BatchNorm folded into its weight and bias, + residual + ReLU.

    out = act(conv2d(x, W') + b' [+ residual])

Flavours: ``resfuse::conv_bn_act`` (C++), ``resfuse::conv_bn_act_igemm`` and ``resfuse::conv_bn_act_sm90``
(CUDA, named one-launch kernels) and ``resfuse::conv_bn_act_triton``; backward ops
``resfuse::_conv_bn_act_backward`` (the C++ ones) and ``resfuse::_conv_bn_act_backward_triton``.
- Triton: one implicit-GEMM kernel over NHWC with the epilogue (bias, residual, ReLU) fused in.
- C++: on CPU, ATen's convolution (oneDNN), then one fused epilogue pass over its output. On GPUs the op's
  CUDA kernel applies the one rule of csrc/cuda/conv_kernels.h (``RESFUSE_CUDA_CONV``): by default CUTLASS's
  Hopper convolution with the epilogue inside (one launch, csrc/cuda/conv_sm90.cu) wherever it takes the call,
  ATen's conv + the epilogue pass everywhere else; a kernel named by the variable runs, or raises why not.
Backward (both): one fused pass for the ReLU mask and the bias gradient, then ATen's convolution backward.
``backend="auto"`` measures, once per configuration, on a GPU cuDNN's fused conv + bias (+ add) + ReLU
(``cudnn_fused.py``, when no gradient is needed), the ``cuda`` and the ``triton`` conv, on CPU the C++ op and
eager PyTorch's F.conv2d + add + ReLU (``eager.py``), and runs the fastest (``autoselect.py``); where it does
not measure it tries cuDNN's fused op first, the fastest eval path measured on an H100.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _loader
from ..layout import memory_format_of, stats_dtype
from ..reference import conv_bn_act_ref
from . import _autograd, autoselect, cudnn_fused
from ._autograd import grad_needed
from ._checks import check_activation, check_channel_vector, check_matches
from .backend import requested_backend, resolve_backend, unavailable_reason
from .eager import conv_bn_act_eager

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


def conv_bn_act_backward_differentiable(grad_out, input, weight, out, stride, padding, dilation, groups, relu,
                                        output_mask):
    """The backward of conv_bn_act in torch ops, for create_graph=True: autograd records it (ATen's
    convolution_backward has its own derivative). The ReLU mask (from ``out``) is piecewise constant."""
    g = torch.where(out.detach() <= 0, 0.0, grad_out) if relu else grad_out  # threshold_backward's mask
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        g, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [bool(output_mask[0]), bool(output_mask[1]), False])
    empty = input.new_empty((0,))
    return (grad_input.contiguous(memory_format=memory_format_of(input)) if output_mask[0] else empty,
            grad_weight.contiguous(memory_format=memory_format_of(weight)) if output_mask[1]
            else weight.new_empty((0,)),
            g.to(stats_dtype(g)).sum((0, 2, 3)).to(weight.dtype) if output_mask[2] else weight.new_empty((0,)),
            g.contiguous(memory_format=memory_format_of(out)).clone() if output_mask[3] else empty.clone())


_autograd.define_triton_op("conv_bn_act_triton", _SCHEMA, conv_bn_act_triton)
_autograd.define_triton_op("_conv_bn_act_backward_triton", _BACKWARD_SCHEMA, _conv_bn_act_backward_triton)
_autograd.register_conv_bn_act("conv_bn_act_triton", "_conv_bn_act_backward_triton")
_autograd.register_backward_autograd("_conv_bn_act_backward_triton", conv_bn_act_backward_differentiable)
if _loader.extension is not None:
    # The three C++ flavours share the contract and the backward; only how the forward computes `out` differs.
    _autograd.register_conv_bn_act("conv_bn_act", "_conv_bn_act_backward")
    _autograd.register_backward_autograd("_conv_bn_act_backward", conv_bn_act_backward_differentiable)
    _autograd.register_conv_bn_act("conv_bn_act_igemm", "_conv_bn_act_backward", backward_registered=True)
    _autograd.register_conv_bn_act("conv_bn_act_sm90", "_conv_bn_act_backward", backward_registered=True)

def cuda_conv_kernel() -> Optional[str]:
    """``RESFUSE_CUDA_CONV`` as the CUDA kernels read it (csrc/cuda/conv_kernels.h): auto, aten, igemm or sm90;
    None without them. An unknown name raises."""
    return _loader.extension.cuda_conv_setting() if _loader.extension_has_cuda() else None


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
    if requested == "auto":
        choice = _auto_choice(x, weight, bias, residual, stride, padding, dilation, groups, relu)
        if not choice:  # not measured here: the fixed rule, cuDNN's fused op first when it applies
            choice = "cudnn_fused" if cudnn_fused.unusable_reason(x, weight, bias, residual, relu) is None else impl
        if choice == "cudnn_fused":
            out = cudnn_fused.run(x, weight, bias, residual, stride, padding, dilation, groups)
            if out is not None:
                return out
        else:
            impl = choice
    return _run_impl(impl, x, weight, bias, residual, stride, padding, dilation, groups, relu)


def _auto_choice(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 relu: bool) -> Optional[str]:
    """``auto``'s measured implementation for this configuration (autoselect.py), or None: not measured here.
    Every candidate is timed on the arguments as given: resfuse's modules fold the weight in the input's layout
    for ``auto``, which the Triton conv repacks on each call, and that copy is part of its measured time, as it
    is of its later calls."""
    if not autoselect.choice_applies(x):
        return None
    grad = grad_needed(x, weight, bias, residual)
    key = ("conv_bn_act", x.device, x.dtype, memory_format_of(x), autoselect.batch_bucket(x.shape[0]),
           tuple(x.shape[1:]), tuple(weight.shape),
           tuple(stride), tuple(padding), tuple(dilation), groups, bias is not None, residual is not None,
           bool(relu), grad, cuda_conv_kernel() if x.is_cuda else None)
    hit = autoselect.cached(key)
    if hit is not None or not autoselect.measuring_enabled(x.device):
        return hit
    autoselect.check_not_capturing(x.device, f"conv_bn_act on {tuple(x.shape)} {x.dtype}")
    args = (x, weight, bias, residual, stride, padding, dilation, groups, relu)
    candidates = {}
    if cudnn_fused.unusable_reason(x, weight, bias, residual, relu) is None:
        candidates["cudnn_fused"] = functools.partial(_cudnn_fused_or_raise, *args[:-1])
    for name in autoselect.implementations(x.device):
        if name == "eager" or unavailable_reason(name, x.device) is None:
            candidates[name] = functools.partial(_run_impl, name, *args)
    return autoselect.choose(key, candidates, x.device)


def _cudnn_fused_or_raise(x, weight, bias, residual, stride, padding, dilation, groups) -> Tensor:
    out = cudnn_fused.run(x, weight, bias, residual, stride, padding, dilation, groups)
    if out is None:
        raise RuntimeError("cuDNN refused its fused convolution for this configuration")
    return out


def _run_impl(impl: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
              stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool) -> Tensor:
    if impl == "reference":
        return conv_bn_act_ref(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    if impl == "eager":
        return conv_bn_act_eager(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    op = torch.ops.resfuse.conv_bn_act_triton if impl == "triton" else torch.ops.resfuse.conv_bn_act
    return op(x, weight, bias, residual, stride, padding, dilation, groups, bool(relu))
