"""How a model's conv -> BatchNorm -> (+ residual) -> (ReLU) runs: as fused ops, or as the modules themselves.

resfuse's blocks, its fused ResNet stem and ConvBNReLU keep nothing of their own: every call reads the children
they have at that moment (``self.conv1``, ``self.bn1``, ``self.relu``...), so replacing a child, adding a
parametrization or a hook after ``convert()`` means what it means in eager PyTorch. A call takes the fused path
only when the fused ops compute exactly what the modules would:

- each conv is an ``nn.Conv2d`` (not a subclass: timm's StdConv2d standardises its weight) with zero padding
  given as numbers; each norm an ``nn.BatchNorm2d``, torchvision's ``FrozenBatchNorm2d``, or an
  ``nn.SyncBatchNorm`` (in training its statistics are synchronised over its process group exactly when
  nn.SyncBatchNorm would synchronise them: ops/sync_bn_act.py); each activation an ``nn.ReLU``;
- no module involved has a hook the fused op cannot run. A conv's forward pre-hooks see only the conv's input,
  which the fused path has, so they are run (``weight_norm``, ``prune`` and ``spectral_norm`` recompute the
  weight that way). Any other hook (forward hooks, pre-hooks on a norm or an activation, backward hooks,
  global module hooks) must see an intermediate the fused op never makes;
- the model is not being traced by ``torch.fx`` (which records module calls, not ops).

Otherwise the owner runs its eager forward (the "module path"), after one warning naming the reason.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as _module

from .. import ops
from .._warn_once import warn_once
from ..layout import memory_format_of
from ..ops._autograd import conv_output_shape, grad_needed
from ..ops._checks import check_activation, check_matches
from ..ops.bn_act import run_bn_act
from ..ops.bn_eval_act import run_bn_eval_act
from ..ops.conv_bn_act import run_conv_bn_act
from ..ops.sync_bn_act import sync_bn_act
from .fold import fold_bn_differentiable, gemm_layout

Route = tuple[str, str]  # (requested backend, resolved backend), from resolve_route

def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself carries a forward, forward-pre, backward or backward-pre hook."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def warn_module_path_once(owner: nn.Module, reason: str) -> None:
    warn_once(f"resfuse: {type(owner).__name__} runs its modules unfused ({reason}); this is eager PyTorch's "
              f"speed, with eager PyTorch's numbers")


# ---------------------------------------------------------------------------------------------------------------
# What the fused ops can honour


def _is_frozen_bn(bn: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d (detection backbones): running stats and affine as buffers, no training.
    cls = type(bn)
    return cls.__name__ == "FrozenBatchNorm2d" and cls.__module__.startswith("torchvision.ops")


def conv_reason(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` is not a convolution the fused ops compute, or None."""
    if type(conv) is not nn.Conv2d:
        return f"conv layer {type(conv).__name__}"
    if conv.padding_mode != "zeros":
        return f"Conv2d padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"Conv2d padding={conv.padding!r}"
    return None


def norm_reason(bn: nn.Module) -> Optional[str]:
    """Why ``bn`` is not a norm layer the fused ops compute, or None."""
    cls = type(bn)
    if cls is nn.BatchNorm2d or cls is nn.SyncBatchNorm or _is_frozen_bn(bn):
        return None
    return f"norm layer {type(bn).__name__}{' (training)' if bn.training else ''}"


def relu_reason(relu: nn.Module) -> Optional[str]:
    return None if type(relu) is nn.ReLU else f"activation {type(relu).__name__}"


def hook_reason(module: nn.Module, name: str, conv_pre_hooks_run: bool = False) -> Optional[str]:
    """Why a hook on ``module`` keeps the fused path from honouring it, or None. ``conv_pre_hooks_run``: its
    forward pre-hooks are run by the fused path (see run_forward_pre_hooks)."""
    if module._forward_hooks:
        return f"a forward hook on {name}"
    if module._forward_pre_hooks and not conv_pre_hooks_run:
        return f"a forward pre-hook on {name}"
    if module._backward_hooks or module._backward_pre_hooks:
        return f"a backward hook on {name}"
    return None


def global_hook_reason() -> Optional[str]:
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return "a global module hook (torch.nn.modules.module.register_module_*_hook)"
    return None


def modules_reason(convs: Iterable[tuple[str, nn.Module]], norms: Iterable[tuple[str, nn.Module]],
                   relus: Iterable[tuple[str, nn.Module]] = ()) -> Optional[str]:
    """The first reason the fused path cannot honour these (name, module) pairs, or None."""
    reason = global_hook_reason()
    if reason is not None:
        return reason
    for name, conv in convs:
        reason = conv_reason(conv) or hook_reason(conv, name, conv_pre_hooks_run=True)
        if reason is not None:
            return f"{name}: {reason}"
    for name, bn in norms:
        reason = norm_reason(bn) or hook_reason(bn, name)
        if reason is not None:
            return f"{name}: {reason}"
    for name, relu in relus:
        reason = relu_reason(relu) or hook_reason(relu, name)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def traced_by_fx(owner: nn.Module) -> bool:
    """Whether torch.fx is tracing ``owner`` (symbolically: the input is a Proxy, so nothing about it may be
    checked): it then runs its modules, which FX records as calls of the original modules. Warns once."""
    if not is_fx_symbolic_tracing():
        return False
    warn_module_path_once(owner, "traced by torch.fx, which records module calls: the traced graph is unfused")
    return True


def run_forward_pre_hooks(module: nn.Module, x: Tensor) -> Tensor:
    """``module``'s forward pre-hooks on its input ``x``, as ``nn.Module.__call__`` runs them; returns the input
    the module's forward would receive. A hook that changes the call into anything but one tensor is an error
    here: the fused ops take one input."""
    if not module._forward_pre_hooks:
        return x
    args, kwargs = (x,), {}
    for hook_id, hook in module._forward_pre_hooks.items():
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        raise RuntimeError(f"resfuse: a forward pre-hook of {type(module).__name__} turned its input into "
                           f"{len(args)} positional and {len(kwargs)} keyword arguments; the fused path takes "
                           f"one tensor (resfuse.revert() the model to run such hooks)")
    return args[0]


# ---------------------------------------------------------------------------------------------------------------
# Inputs and backends


def check_block_input(x: Tensor, conv: nn.Conv2d) -> None:
    """Clear errors for inputs torch would reject deep inside a conv, or accept and get wrong."""
    check_activation(x)
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"expected input with {conv.in_channels} channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    weight = conv.weight
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the block's weights are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"input dtype {x.dtype} does not match the block's weight dtype {weight.dtype}")


def resolve_route(x: Tensor, backend: Optional[str]) -> Route:
    """(requested, resolved) backend for ops on ``x``'s device: "auto" stays visible to the ops, which may send
    an eval conv to cuDNN's fused op (resfuse/ops/cudnn_fused.py)."""
    requested = ops.backend.requested_backend(backend)
    return requested, ops.resolve_backend(requested, x.device)


# ---------------------------------------------------------------------------------------------------------------
# The fused conv -> BN -> (+ residual) -> (ReLU)


def _train_momentum(bn: nn.BatchNorm2d) -> float:
    """The exponential-average factor exactly as nn.BatchNorm2d.forward computes it (and its counter bump)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def sync_group(bn: nn.Module) -> Optional[dist.ProcessGroup]:
    """The process group an ``nn.SyncBatchNorm`` synchronises its statistics over in this call, by its own rule
    (training, torch.distributed initialised, a group of two ranks or more), or None: it computes what
    nn.BatchNorm2d would. Unlike nn.SyncBatchNorm, CPU tensors are accepted (gloo)."""
    if type(bn) is not nn.SyncBatchNorm or not bn.training or not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def uses_batch_stats(bn: nn.Module) -> bool:
    if _is_frozen_bn(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def eval_without_fold(x: Tensor, impl: str) -> bool:
    """Whether an eval conv-BN runs unfolded: on CPU nothing needs the fold, so ATen's conv on the raw weight,
    then BN from the running statistics, the residual and the ReLU in one pass (bn_eval_act): eager's own order
    of operations. Elsewhere the one-launch conv kernels take the folded weight."""
    return x.device.type == "cpu" and impl == "cuda"


def _folded_weight(x: Tensor, conv: nn.Conv2d, bn: nn.Module, impl: str, amp_dtype: Optional[torch.dtype]
                   ) -> tuple[Tensor, Tensor]:
    """(W', b') for the one-launch conv kernels, in the layout the conv reads: made on every call (fold.py says
    why). Without autograd one launch makes both; when autograd records the call, torch ops that it sees."""
    layout = "gemm" if impl == "triton" else (
        "channels_last" if memory_format_of(x) == torch.channels_last else "contiguous")
    if not grad_needed(conv.weight, conv.bias, bn.weight, bn.bias):
        return ops.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                           dtype=amp_dtype, layout=layout, impl=impl)
    weight, bias = fold_bn_differentiable(conv, bn, dtype=amp_dtype)
    weight = gemm_layout(weight) if layout == "gemm" else weight.contiguous(memory_format=memory_format_of(x))
    return weight, bias


def fused_conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool,
                      route: Route) -> Tensor:
    """``act(bn(conv(x)) + residual)`` as fused ops, for modules ``modules_reason`` accepted, an input already
    checked (check_block_input) and through ``conv``'s forward pre-hooks, and a route from ``resolve_route``
    (not "reference"). Blocks call this for each of their convs, so the input check and the backend lookup are
    made once per block: at N=128 a block's step is bound by host time, and this is part of it."""
    requested, impl = route
    # Under autocast, eager runs the conv in the autocast dtype and BN on that output with fp32 statistics
    # and parameters; the fused ops are not autocast-aware, so the same casts are made here.
    amp_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    if uses_batch_stats(bn):
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return fused_bn_act(y, bn, residual, relu, route)
    if eval_without_fold(x, impl):
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is not None and residual.dtype != y.dtype:
            residual = residual.to(y.dtype)
        # auto may run eager's F.batch_norm instead (ops/eager.py): that is eager's math for nn.BatchNorm2d,
        # not for FrozenBatchNorm2d (its own scale-and-shift), which keeps the fixed rule.
        return run_bn_eval_act(y, bn.weight, bn.bias, residual, bn.running_mean, bn.running_var, bn.eps, relu,
                               impl, None if _is_frozen_bn(bn) else requested)
    weight, bias = _folded_weight(x, conv, bn, impl, amp_dtype)
    if amp_dtype is not None:
        x = x.to(amp_dtype)
        residual = residual.to(amp_dtype) if residual is not None else None
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    if residual is not None:
        check_matches(residual, conv_output_shape(x, weight, stride, padding, dilation), x.dtype, x.device,
                      "residual")
    return run_conv_bn_act(x, weight, bias, residual, stride, padding, dilation, conv.groups, relu, requested,
                           impl)


def batch_stats_args(bn: nn.Module) -> tuple[float, Optional[Tensor], Optional[Tensor]]:
    """(momentum, running_mean, running_var) for a fused op that normalises with batch statistics, for a norm
    that ``uses_batch_stats``: what ``bn`` itself would update (None, None when it tracks nothing, or in eval
    without running statistics) and the factor it would update them with (momentum None: a cumulative average),
    its ``num_batches_tracked`` bumped as ``bn`` would bump it. Call it once per call of ``bn``."""
    momentum = _train_momentum(bn)
    keep_running = not bn.training or bn.track_running_stats
    return momentum, (bn.running_mean if keep_running else None), (bn.running_var if keep_running else None)


def fused_bn_act(y: Tensor, bn: nn.Module, residual: Optional[Tensor], relu: bool, route: Route) -> Tensor:
    """``act(bn(y) + residual)`` for a norm that ``uses_batch_stats`` (training mode), as one fused op that also
    updates the running statistics and the counter as ``bn`` would: the second half of a training-mode
    conv -> BN, and a pre-activation BN-ReLU (timm's BatchNormAct2d before a conv) on its own."""
    if residual is not None and residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    requested, impl = route
    momentum, running_mean, running_var = batch_stats_args(bn)
    group = sync_group(bn)
    if group is not None:
        return sync_bn_act(y, bn.weight, bn.bias, residual, running_mean, running_var, momentum, bn.eps, relu,
                           group, impl)
    return run_bn_act(y, bn.weight, bn.bias, residual, running_mean, running_var, momentum, bn.eps, relu, impl,
                      requested)


def fused_conv_act(x: Tensor, conv: nn.Conv2d, residual: Optional[Tensor], relu: bool, route: Route) -> Tensor:
    """``act(conv(x) + residual)`` for a conv with no norm after it (a pre-activation block's last conv and its
    shortcut), as one fused op: conv_bn_act with the conv's own weight and bias. Same preconditions as
    ``fused_conv_bn_act``."""
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled(x.device.type):
        amp_dtype = torch.get_autocast_dtype(x.device.type)  # eager's conv runs in it, and so its sum
        x, weight = x.to(amp_dtype), weight.to(amp_dtype)
        bias = bias.to(amp_dtype) if bias is not None else None
        residual = residual.to(amp_dtype) if residual is not None else None
    weight = gemm_layout(weight) if route[1] == "triton" else weight.contiguous(memory_format=memory_format_of(x))
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    if residual is not None:
        check_matches(residual, conv_output_shape(x, weight, stride, padding, dilation), x.dtype, x.device,
                      "residual")
    return run_conv_bn_act(x, weight, bias, residual, stride, padding, dilation, conv.groups, relu, route[0],
                           route[1])
