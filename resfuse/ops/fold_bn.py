"""``fold_bn``: the eval-mode BatchNorm folded into the convolution before it, (W', b') in one launch.

    scale = bn_weight * rsqrt(running_var + eps)                       (bn_weight None: 1)
    W' = conv_weight * scale[c_out]        b' = bn_bias + (conv_bias - running_mean) * scale     (None: 0)

so that bn(conv(x)) == conv(x, W') + b' in eval mode. Computed in fp32 (fp64 for fp64 conv weights), written in
``dtype``, with W' in one of three layouts: "contiguous", "channels_last" or "gemm" (the Triton conv's
implicit-GEMM B matrix, [KH, KW, Cg, C_out] storage; resfuse/nn/fold.py ``gemm_layout``).

The GPU eval path of resfuse's blocks folds on every call (a cached fold can go stale, resfuse/nn/fold.py); this
op keeps that to one launch: ``resfuse::_fold_bn`` (C++: csrc/cpu/fold_bn.cpp, csrc/cuda/fold_bn.cu) or
``resfuse::_fold_bn_triton`` (triton_kernels/fold_bn.py). It has no derivative: a call autograd would have to
record is an error (resfuse/nn/fold.py ``fold_bn_differentiable`` is the differentiable fold, in torch ops).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _loader
from ..reference import fold_bn_ref
from . import _autograd
from ._checks import FLOAT_DTYPES

_SCHEMA = ("(Tensor conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
           "Tensor running_var, float eps, ScalarType dtype, str layout) -> (Tensor, Tensor)")

# The dims of [C_out, Cg, KH, KW] in the order each layout stores them, outermost first (csrc/fold_bn.h).
STORAGE_ORDERS = {"contiguous": (0, 1, 2, 3), "channels_last": (0, 2, 3, 1), "gemm": (2, 3, 1, 0)}


def storage_order(layout: str) -> tuple[int, int, int, int]:
    try:
        return STORAGE_ORDERS[layout]
    except KeyError:
        raise ValueError(f"fold_bn: layout must be one of {', '.join(map(repr, STORAGE_ORDERS))}, "
                         f"got {layout!r}") from None


def in_layout(shape, layout: str, **options) -> Tensor:
    """An empty [C_out, Cg, KH, KW] tensor stored as ``layout`` stores it: a contiguous tensor of the stored
    shape, permuted back (the strides the C++ and Triton kernels write)."""
    order = storage_order(layout)
    return torch.empty([shape[d] for d in order], **options).permute([order.index(d) for d in range(4)])


def _empty_outputs(conv_weight: Tensor, dtype: torch.dtype, layout: str) -> tuple[Tensor, Tensor]:
    options = dict(dtype=dtype, device=conv_weight.device)
    return in_layout(conv_weight.shape, layout, **options), torch.empty((conv_weight.shape[0],), **options)


def _fold_bn_triton(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype, layout):
    kernels = _loader.require_triton_kernels()
    _check_args(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, dtype, layout)
    folded, bias = _empty_outputs(conv_weight, dtype, layout)
    kernels.fold_bn_fwd(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, folded, bias,
                        storage_order(layout))
    return folded, bias


def _check_args(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, dtype, layout) -> None:
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError("fold_bn: conv_weight must be a 4-D (C_out, C_in/groups, kH, kW) tensor, got "
                         f"{tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight)}")
    for name, t in (("conv_weight dtype", conv_weight.dtype), ("dtype", dtype)):
        if t not in FLOAT_DTYPES:
            raise ValueError(f"fold_bn: {name} must be float16, bfloat16, float32 or float64, got {t}")
    storage_order(layout)
    channels = conv_weight.shape[0]
    for name, v in (("conv_bias", conv_bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if v is None:
            if name.startswith("running"):
                raise ValueError("fold_bn folds the eval-mode BatchNorm: running_mean and running_var are required")
            continue
        if v.device != conv_weight.device:
            raise RuntimeError(f"fold_bn: {name} is on {v.device} but conv_weight is on {conv_weight.device}")
        if v.dim() != 1 or v.shape[0] != channels:
            raise ValueError(f"fold_bn: {name} must have shape [{channels}] (one value per output channel), got "
                             f"{tuple(v.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"fold_bn: {name} must be floating-point, got {v.dtype}")


def _check_no_grad(*tensors: Optional[Tensor]) -> None:
    if _autograd.grad_needed(*tensors):
        raise RuntimeError("resfuse.ops.fold_bn folds BatchNorm into the conv weight without autograd, but an "
                           "input requires grad and grad mode is on: call it under torch.no_grad() or "
                           "torch.inference_mode(), or fold with torch ops (resfuse.nn.fold.fold_bn_differentiable) "
                           "to differentiate the fold")


_autograd.define_triton_op("_fold_bn_triton", _SCHEMA, _fold_bn_triton)


def _register(name: str) -> None:
    """Fake kernel, and the no-grad check as the Autograd kernel unless csrc/fold_bn_autograd.cpp registered it."""
    @torch.library.register_fake(f"resfuse::{name}", lib=_autograd._lib)
    def _fake(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype, layout):
        return _empty_outputs(conv_weight, dtype, layout)

    if torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse::{name}", "Autograd"):
        return
    op = getattr(torch.ops.resfuse, name).default

    def autograd_kernel(*args):
        _check_no_grad(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _autograd._lib.impl(name, autograd_kernel, "Autograd")


_register("_fold_bn_triton")
if _loader.extension is not None:
    _register("_fold_bn")


def fold_bn(conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
            bn_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
            dtype: Optional[torch.dtype] = None, layout: str = "contiguous",
            impl: str = "cuda") -> tuple[Tensor, Tensor]:
    """(W', b') with conv2d(x, W') + b' == BatchNorm2d-in-eval(conv2d(x, conv_weight, conv_bias)), for calls
    autograd need not record (no input requires grad, or grad mode is off): otherwise a RuntimeError.

    ``dtype``: of both outputs (None: conv_weight's); ``layout``: W''s, "contiguous", "channels_last" or "gemm";
    ``impl``: the backend already resolved, "cuda" (the C++ op: CPU or CUDA kernel), "triton" or "reference".
    """
    _check_no_grad(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    dtype = conv_weight.dtype if dtype is None else dtype
    if impl == "reference":
        _check_args(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, dtype, layout)
        # fold_bn_ref computes in the conv weight's accumulation dtype and returns that dtype: one rounding to dtype.
        acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
        weight, bias = fold_bn_ref(conv_weight.to(acc), conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                   eps)
        folded = in_layout(weight.shape, layout, dtype=dtype, device=weight.device)
        return folded.copy_(weight), bias.to(dtype)
    op = torch.ops.resfuse._fold_bn if impl == "cuda" else torch.ops.resfuse._fold_bn_triton
    return op(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, float(eps), dtype, layout)
