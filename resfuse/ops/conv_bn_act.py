"""``conv_bn_act``: eval-mode conv with BatchNorm folded into its weight and bias, + residual + ReLU.

    out = act(conv2d(x, W') + b' [+ residual])

Flavours: ``resfuse::conv_bn_act`` (C++), ``resfuse::conv_bn_act_igemm`` (CUDA) and
``resfuse::conv_bn_act_triton``; backward ops ``resfuse::_conv_bn_act_backward`` (the first two) and
``resfuse::_conv_bn_act_backward_triton``.
- Triton: one implicit-GEMM kernel over NHWC with the epilogue (bias, residual, ReLU) fused in.
- C++: ATen's convolution (cuDNN / oneDNN), then one fused epilogue pass over its output; or, on GPUs, one
  implicit-GEMM tensor-core kernel with the epilogue inside (one launch), picked by ``RESFUSE_CUDA_CONV``:
  ``resfuse::conv_bn_act_sm90`` (Hopper: CUTLASS's TMA + wgmma convolution, csrc/cuda/conv_sm90.cu) or
  ``resfuse::conv_bn_act_igemm`` (sm_80+: our WMMA kernel, csrc/cuda/conv_igemm.cu).
Backward (both): one fused pass for the ReLU mask and the bias gradient, then ATen's convolution backward.
``backend="auto"`` on a GPU measures, once per configuration, cuDNN's fused conv + bias (+ add) + ReLU
(``cudnn_fused.py``, when no gradient is needed), the ``cuda`` and the ``triton`` conv, and runs the fastest
(``autoselect.py``); where it does not measure it tries cuDNN's fused op first, the fastest eval path measured
on an H100.
"""
from __future__ import annotations

import functools
import os
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
    g = grad_out * (out.detach() > 0) if relu else grad_out
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

CUDA_CONV_KERNELS = ("aten", "igemm", "sm90")


def cuda_conv_kernel() -> str:
    """The ``cuda`` backend's eval conv on GPUs, from ``RESFUSE_CUDA_CONV``: ``sm90`` (default:
    ``resfuse::conv_bn_act_sm90``, one launch, on Hopper), ``igemm`` (our WMMA implicit-GEMM kernel with the
    epilogue inside, ``resfuse::conv_bn_act_igemm``, sm_80+) or ``aten`` (ATen's conv, i.e. cuDNN, then our fused
    epilogue pass). Calls the chosen kernel does not take run ``aten`` (see sm90_unusable_reason,
    igemm_unusable_reason): other GPUs, channel counts that are not multiples of 8, fp32, NCHW, groups."""
    name = os.environ.get("RESFUSE_CUDA_CONV", "sm90").strip().lower() or "sm90"
    if name not in CUDA_CONV_KERNELS:
        raise ValueError(f"RESFUSE_CUDA_CONV={name!r}: expected one of {', '.join(CUDA_CONV_KERNELS)}")
    return name


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def igemm_unusable_reason(x: Tensor, weight: Tensor, residual: Optional[Tensor], groups: int) -> Optional[str]:
    """Why ``resfuse::conv_bn_act_igemm`` cannot take this call (None: it can); mirrors the kernel's own check
    (csrc/cuda/conv_igemm.cu), which raises for what is named here."""
    if not x.is_cuda:
        return "not a CUDA tensor"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} (the kernel takes float16 and bfloat16)"
    if groups != 1:
        return "a grouped convolution"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "an input that is not channels_last"
    if x.shape[1] == 0 or x.shape[1] % 8 or weight.shape[0] % 8:
        return "channel counts that are not multiples of 8"
    if any(t is not None and t.data_ptr() % 16 for t in (x, residual)):
        return "a tensor not aligned to 16 bytes"
    if _capability(x.device)[0] < 8:
        return "a GPU older than sm_80"
    return None


@functools.lru_cache(maxsize=None)
def sm90_build_reason() -> Optional[str]:
    """Why this build holds no runnable resfuse::conv_bn_act_sm90 (None: it does): the extension's own answer,
    the rule the op checks (csrc/cuda/conv_sm90.cu)."""
    ext = _loader.extension
    return "a build without the C++ extension" if ext is None else ext.sm90_build_reason()


def sm90_unusable_reason(x: Tensor, weight: Tensor, residual: Optional[Tensor], groups: int) -> Optional[str]:
    """Why ``resfuse::conv_bn_act_sm90`` cannot take this call (None: it can): igemm's scope, on an sm_90 GPU,
    from a build that holds the kernel; mirrors the op's own check (csrc/cuda/conv_igemm.cu)."""
    reason = igemm_unusable_reason(x, weight, residual, groups)
    if reason is not None:
        return reason
    if _capability(x.device) != (9, 0):
        return "a GPU other than sm_90 (Hopper)"
    return sm90_build_reason()


_UNUSABLE = {"igemm": igemm_unusable_reason, "sm90": sm90_unusable_reason}
_CUDA_CONV_OPS = {"igemm": "conv_bn_act_igemm", "sm90": "conv_bn_act_sm90"}


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
    if not autoselect.device_measurable(x.device):
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
    for name in ("cuda", "triton"):
        if unavailable_reason(name, x.device) is None:
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
    if impl == "triton":
        op = torch.ops.resfuse.conv_bn_act_triton
    else:
        op = torch.ops.resfuse.conv_bn_act
        if x.is_cuda:
            kernel = cuda_conv_kernel()
            if kernel != "aten" and _UNUSABLE[kernel](x, weight, residual, groups) is None:
                op = getattr(torch.ops.resfuse, _CUDA_CONV_OPS[kernel])
    return op(x, weight, bias, residual, stride, padding, dilation, groups, bool(relu))
