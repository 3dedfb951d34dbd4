"""``bn_act``: training-mode BatchNorm (batch statistics, running-stat update) + residual + ReLU, fused.

    out = act((x - mean) * invstd * weight + bias [+ residual])

Two registered flavours share one schema: ``resfuse::bn_act`` (C++: csrc/cpu, csrc/cuda) and
``resfuse::bn_act_triton`` (triton_kernels/bn_act.py). Their backward ops are ``resfuse::_bn_act_backward``
and ``resfuse::_bn_act_backward_triton``. ``bn_act()`` below picks one by backend; ``auto`` measures, once per
configuration, both on a GPU, the C++ kernels against eager PyTorch's own ops on CPU (``eager.py``), and runs
the faster (``autoselect.py``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _loader
from ..layout import memory_format_of, stats_dtype
from ..reference import bn_act_ref
from . import _autograd, autoselect
from .eager import bn_act_eager, bn_act_eager_forward_backward
from .backend import requested_backend, resolve_backend, unavailable_reason
from .sync_bn_act import check_sync_args, group_size, sync_bn_act

_SCHEMA = ("(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
           "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor? weight, Tensor out, Tensor save_mean, "
                    "Tensor save_invstd, bool relu, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)")


def bn_act_triton(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_act_fwd(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu)


def _bn_act_backward_triton(grad_out, input, weight, out, save_mean, save_invstd, relu, output_mask):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_act_bwd(grad_out, input, weight, out, save_mean, save_invstd, relu, list(output_mask))


def bn_act_backward_differentiable(grad_out, input, weight, out, save_mean, save_invstd, relu, output_mask):
    """The backward of bn_act in torch ops, for create_graph=True: autograd records it, so second-order
    gradients flow through the batch statistics, which are recomputed here from ``input``. The saved invstd
    gives their value, rsqrt(var + eps) written as rsqrt(var - var.detach() + save_invstd**-2): the same
    value, and the derivative in var that eps would give. The ReLU mask (from ``out``) is piecewise constant."""
    acc = stats_dtype(input)
    x = input.to(acc)
    dims = (0, 2, 3)
    n = x.numel() // x.shape[1]
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out.detach() <= 0, 0.0, g)  # threshold_backward's mask: NaN outputs pass g
    mean = x.mean(dims) if n > 0 else x.new_zeros(x.shape[1])  # an empty batch: nothing flows back
    xc = x - mean.view(1, -1, 1, 1)
    var = xc.square().mean(dims) if n > 0 else mean
    invstd = torch.rsqrt(var - var.detach() + save_invstd.detach().to(acc).reciprocal().square())
    xhat = xc * invstd.view(1, -1, 1, 1)
    sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)
    param_dtype = weight.dtype if weight is not None else torch.float32
    fmt = memory_format_of(input)
    empty_act, empty_param = input.new_empty((0,)), input.new_empty((0,), dtype=param_dtype)
    grad_input = empty_act
    if output_mask[0]:
        a = invstd if weight is None else invstd * weight.to(acc)
        grad_input = ((g - (sum_g / max(n, 1)).view(1, -1, 1, 1) - xhat * (sum_gx / max(n, 1)).view(1, -1, 1, 1))
                      * a.view(1, -1, 1, 1)).to(input.dtype).contiguous(memory_format=fmt)
    return (grad_input,
            sum_gx.to(param_dtype) if output_mask[1] else empty_param,
            sum_g.to(param_dtype) if output_mask[2] else empty_param.clone(),
            g.to(input.dtype).contiguous(memory_format=fmt) if output_mask[3] else empty_act.clone())


_autograd.define_triton_op("bn_act_triton", _SCHEMA, bn_act_triton)
_autograd.define_triton_op("_bn_act_backward_triton", _BACKWARD_SCHEMA, _bn_act_backward_triton)
_autograd.register_bn_act("bn_act_triton", "_bn_act_backward_triton")
_autograd.register_backward_autograd("_bn_act_backward_triton", bn_act_backward_differentiable)
if _loader.extension is not None:
    _autograd.register_bn_act("bn_act", "_bn_act_backward")
    _autograd.register_backward_autograd("_bn_act_backward", bn_act_backward_differentiable)


def bn_act(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    backend: Optional[str] = None,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> Tensor:
    """BatchNorm over (N, H, W) with batch statistics, then ``+ residual`` and ReLU, in one fused op.

    ``running_mean``/``running_var``, when given, are updated in place like nn.BatchNorm2d in training mode
    (``momentum`` is the exponential-average factor; pass ``1 / num_batches_tracked`` for momentum=None).
    ``process_group``: the statistics are those of the batches of all its ranks, as nn.SyncBatchNorm's in
    training (sync_bn_act.py; every rank must make the call). A group of one rank is the same as none.
    """
    if process_group is not None and group_size(process_group) > 1:
        impl = resolve_backend(requested_backend(backend), x.device)
        return sync_bn_act(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, process_group,
                           impl)
    _check_args(x, weight, bias, residual, running_mean, running_var)
    requested = requested_backend(backend)
    impl = _measured_if_auto(requested, resolve_backend(requested, x.device), x, weight, bias, residual,
                             running_mean, running_var, momentum, eps, relu)
    return _run(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, impl)


def _check_args(x, weight, bias, residual, running_mean, running_var) -> None:
    check_sync_args(x, weight, bias, residual, running_mean, running_var)
    _check_values_per_channel(x)


def _check_values_per_channel(x: Tensor) -> None:
    n = x.numel() // max(x.shape[1], 1)
    if n <= 1 and x.numel() > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def run_bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
               relu: bool, impl: str, requested: Optional[str] = None) -> Tensor:
    """``bn_act`` with the backend already resolved: the path of resfuse's modules. The C++ op checks its
    arguments itself (csrc/common.h), so only the other backends' arguments are checked here, and for every
    backend the rule nn.BatchNorm2d enforces in training (the C++ op enforces it only with running stats)."""
    impl = _measured_if_auto(requested, impl, x, weight, bias, residual, running_mean, running_var, momentum, eps,
                             relu)
    if impl != "cuda":
        _check_args(x, weight, bias, residual, running_mean, running_var)
    else:
        _check_values_per_channel(x)
    return _run(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, impl)


def _run(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, impl) -> Tensor:
    if impl == "reference":
        return bn_act_ref(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu)[0]
    if impl == "eager":
        return bn_act_eager(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu)
    op = torch.ops.resfuse.bn_act if impl == "cuda" else torch.ops.resfuse.bn_act_triton
    return op(x, weight, bias, residual, running_mean, running_var, float(momentum), float(eps), bool(relu))[0]


def _measured_if_auto(requested, impl, *args) -> str:
    """The backend to run: ``impl``, or under ``auto`` what was measured fastest for these arguments."""
    if requested != "auto" or impl == "reference":
        return impl
    return _auto_choice(*args) or impl


_OPS = {"cuda": ("bn_act", "_bn_act_backward"), "triton": ("bn_act_triton", "_bn_act_backward_triton")}


def _auto_choice(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu) -> Optional[str]:
    """``auto``'s measured backend for this configuration (autoselect.py), or None: not measured here. Each
    candidate is timed forward + backward, on copies of the running statistics."""
    if not autoselect.choice_applies(x):
        return None
    key = ("bn_act", x.device, x.dtype, memory_format_of(x), autoselect.batch_bucket(x.shape[0]),
           tuple(x.shape[1:]), None if weight is None else weight.dtype, bias is not None, residual is not None,
           running_mean is not None, bool(relu))
    hit = autoselect.cached(key)
    if hit is not None or not autoselect.measuring_enabled(x.device):
        return hit
    autoselect.check_not_capturing(x.device, f"bn_act on {tuple(x.shape)} {x.dtype}")
    _check_args(x, weight, bias, residual, running_mean, running_var)  # before any candidate runs
    with torch.no_grad():
        copies = [None if t is None else t.clone() for t in (running_mean, running_var)]
        grad_out = autoselect.random_like(x)
    mask = [True, weight is not None, bias is not None, residual is not None]
    args = (x, weight, bias, residual, *copies, float(momentum), float(eps), bool(relu))

    def forward_backward(forward, backward):
        out, mean, invstd = forward(*args)
        return backward(grad_out, x, weight, out, mean, invstd, bool(relu), mask)

    candidates = {}
    for name in autoselect.implementations(x.device):
        if name == "eager":
            candidates[name] = functools.partial(bn_act_eager_forward_backward, *args, grad_out)
        elif unavailable_reason(name, x.device) is None:
            forward, backward = _OPS[name]
            candidates[name] = functools.partial(forward_backward, getattr(torch.ops.resfuse, forward),
                                                 getattr(torch.ops.resfuse, backward))
    return autoselect.choose(key, candidates, x.device)
