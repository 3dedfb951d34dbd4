"""``bn_eval_act``: eval-mode BatchNorm (running statistics, left as they are) + residual + ReLU, in one pass.

    out = act((x - running_mean) * rsqrt(running_var + eps) * weight + bias [+ residual])

The eval path of a CPU block: ATen's convolution on the raw conv weight, then this op over its output, so no
call makes a pass over the weights to fold BN into them (resfuse/nn/routing.py).
Two registered flavours share one schema: ``resfuse::bn_eval_act`` (C++: csrc/cpu, csrc/cuda) and
``resfuse::bn_eval_act_triton`` (triton_kernels/bn_eval_act.py); their backward ops are
``resfuse::_bn_eval_act_backward`` and ``resfuse::_bn_eval_act_backward_triton``. The running statistics are
buffers: read, never updated, never differentiated. ``auto`` measures, once per configuration, the forward of
both on a GPU, of the C++ kernel and eager PyTorch's F.batch_norm + add + ReLU on CPU (``eager.py``), and runs
the faster (``autoselect.py``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _loader
from ..layout import memory_format_of, stats_dtype
from ..reference import bn_eval_act_ref
from . import _autograd, autoselect
from ._autograd import grad_needed
from ._checks import check_activation, check_channel_vector, check_like
from .backend import requested_backend, resolve_backend, unavailable_reason
from .eager import bn_eval_act_eager

_SCHEMA = ("(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor running_mean, "
           "Tensor running_var, float eps, bool relu) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor? weight, Tensor out, Tensor running_mean, "
                    "Tensor running_var, float eps, bool relu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)")


def bn_eval_act_triton(input, weight, bias, residual, running_mean, running_var, eps, relu):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_eval_act_fwd(input, weight, bias, residual, running_mean, running_var, eps, relu)


def _bn_eval_act_backward_triton(grad_out, input, weight, out, running_mean, running_var, eps, relu, output_mask):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_eval_act_bwd(grad_out, input, weight, out, running_mean, running_var, eps, relu,
                                   list(output_mask))


def bn_eval_act_backward_differentiable(grad_out, input, weight, out, running_mean, running_var, eps, relu,
                                        output_mask):
    """The backward of bn_eval_act in torch ops, for create_graph=True: autograd records it, so second-order
    gradients flow through grad_out, input and weight. The running statistics are constants, and so is the
    ReLU mask (from ``out``): zero where out <= 0, as torch's threshold_backward."""
    acc = stats_dtype(input)
    dims = (0, 2, 3)
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out.detach() <= 0, torch.zeros((), dtype=acc, device=g.device), g)
    invstd = torch.rsqrt(running_var.detach().to(acc) + eps).view(1, -1, 1, 1)
    param_dtype = weight.dtype if weight is not None else torch.float32
    fmt = memory_format_of(input)
    empty_act, empty_param = input.new_empty((0,)), input.new_empty((0,), dtype=param_dtype)
    grad_input = empty_act
    if output_mask[0]:
        a = invstd if weight is None else invstd * weight.to(acc).view(1, -1, 1, 1)
        grad_input = (g * a).to(input.dtype).contiguous(memory_format=fmt)
    grad_weight = empty_param
    if output_mask[1]:
        xhat = (input.to(acc) - running_mean.detach().to(acc).view(1, -1, 1, 1)) * invstd
        grad_weight = (g * xhat).sum(dims).to(param_dtype)
    return (grad_input,
            grad_weight,
            g.sum(dims).to(param_dtype) if output_mask[2] else empty_param.clone(),
            # a copy: without ReLU g may be grad_out itself, and an op's output must not alias its input
            g.to(input.dtype).clone(memory_format=fmt) if output_mask[3] else empty_act.clone())


_autograd.define_triton_op("bn_eval_act_triton", _SCHEMA, bn_eval_act_triton)
_autograd.define_triton_op("_bn_eval_act_backward_triton", _BACKWARD_SCHEMA, _bn_eval_act_backward_triton)
_autograd.register_bn_eval_act("bn_eval_act_triton", "_bn_eval_act_backward_triton")
_autograd.register_backward_autograd("_bn_eval_act_backward_triton", bn_eval_act_backward_differentiable)
if _loader.extension is not None:
    _autograd.register_bn_eval_act("bn_eval_act", "_bn_eval_act_backward")
    _autograd.register_backward_autograd("_bn_eval_act_backward", bn_eval_act_backward_differentiable)


def bn_eval_act(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    eps: float = 1e-5,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """BatchNorm in eval mode (normalised by ``running_mean`` / ``running_var``, which are required and left
    unchanged), then ``+ residual`` and ReLU, in one fused op."""
    _check_args(x, weight, bias, residual, running_mean, running_var)
    requested = requested_backend(backend)
    return run_bn_eval_act(x, weight, bias, residual, running_mean, running_var, eps, relu,
                           resolve_backend(requested, x.device), requested)


def _check_args(x, weight, bias, residual, running_mean, running_var) -> None:
    check_activation(x)
    check_like(x, residual, "residual")
    if running_mean is None or running_var is None:
        raise ValueError("bn_eval_act normalises with the running statistics: running_mean and running_var are "
                         "required")
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_channel_vector(x, v, name)


def run_bn_eval_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float, relu: bool, impl: str,
                    requested: Optional[str] = None) -> Tensor:
    """``bn_eval_act`` with the backend already resolved (cuda | triton | reference): the path of resfuse's
    modules; under ``requested="auto"`` what was measured fastest for these arguments. The C++ op checks its
    arguments itself (csrc/bn_eval_act.h), so only the other implementations' are checked here."""
    if requested == "auto" and impl != "reference":
        impl = _auto_choice(x, weight, bias, residual, running_mean, running_var, eps, relu) or impl
    if impl != "cuda":
        _check_args(x, weight, bias, residual, running_mean, running_var)
    return _run(x, weight, bias, residual, running_mean, running_var, eps, relu, impl)


def _run(x, weight, bias, residual, running_mean, running_var, eps, relu, impl) -> Tensor:
    if impl == "reference":
        return bn_eval_act_ref(x, weight, bias, residual, running_mean, running_var, eps, relu)
    if impl == "eager":
        return bn_eval_act_eager(x, weight, bias, residual, running_mean, running_var, eps, relu)
    op = torch.ops.resfuse.bn_eval_act if impl == "cuda" else torch.ops.resfuse.bn_eval_act_triton
    return op(x, weight, bias, residual, running_mean, running_var, float(eps), bool(relu))


def _auto_choice(x, weight, bias, residual, running_mean, running_var, eps, relu) -> Optional[str]:
    """``auto``'s measured implementation for this configuration (autoselect.py), or None: not measured here.
    Each candidate's forward is timed; the running statistics are only read."""
    if not autoselect.choice_applies(x):
        return None
    key = ("bn_eval_act", x.device, x.dtype, memory_format_of(x), autoselect.batch_bucket(x.shape[0]),
           tuple(x.shape[1:]), None if weight is None else weight.dtype, bias is not None, residual is not None,
           running_mean.dtype, bool(relu), grad_needed(x, weight, bias, residual))
    hit = autoselect.cached(key)
    if hit is not None or not autoselect.measuring_enabled(x.device):
        return hit
    autoselect.check_not_capturing(x.device, f"bn_eval_act on {tuple(x.shape)} {x.dtype}")
    _check_args(x, weight, bias, residual, running_mean, running_var)  # before any candidate runs
    candidates = {name: functools.partial(_run, x, weight, bias, residual, running_mean, running_var, eps, relu,
                                          name)
                  for name in autoselect.implementations(x.device)
                  if name == "eager" or unavailable_reason(name, x.device) is None}
    return autoselect.choose(key, candidates, x.device)
