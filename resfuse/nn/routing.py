"""How conv -> BatchNorm -> (+ residual) -> (ReLU) over a model's own modules runs: fused ops, or the modules.

Training mode (or a BN without running statistics) runs ATen's conv then the fused ``bn_act`` op with batch
statistics and the running-stat update; eval mode runs ``conv_bn_act`` with the BN folded into the conv.
A configuration with no fused kernel runs the modules themselves (the reference path) after one warning.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops._autograd import conv_output_shape
from ..ops._checks import check_activation, check_matches
from ..ops.bn_act import run_bn_act
from ..ops.conv_bn_act import run_conv_bn_act
from ..layout import memory_format_of
from .fold import folded_weight_bias
from .stem import plain_forward, plain_type

_warned: set = set()


def warn_reference_once(reason: str) -> None:
    """One warning per configuration that runs the reference path instead of a fused kernel."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"resfuse: no fused kernel for {reason}; running the reference PyTorch path", stacklevel=3)


def _is_frozen_bn(bn: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d (detection backbones): running stats and affine as buffers, no training.
    return type(bn).__name__ == "FrozenBatchNorm2d" and hasattr(bn, "running_var")


def unsupported_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why (conv, bn) has no fused path, or None."""
    if plain_type(conv) is not nn.Conv2d:
        return f"conv layer {type(conv).__name__}"
    if conv.padding_mode != "zeros":
        return f"Conv2d padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"Conv2d padding={conv.padding!r}"
    if plain_type(bn) is nn.BatchNorm2d or _is_frozen_bn(bn):
        return None
    if isinstance(bn, nn.SyncBatchNorm) and not bn.training:
        return None
    return f"norm layer {type(bn).__name__}{' (training)' if bn.training else ''}"


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


def _train_momentum(bn: nn.BatchNorm2d) -> float:
    """The exponential-average factor exactly as nn.BatchNorm2d.forward computes it (and its counter bump)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def uses_batch_stats(bn: nn.Module) -> bool:
    if _is_frozen_bn(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def reference_conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor],
                          relu: bool) -> Tensor:
    out = plain_forward(bn, plain_forward(conv, x))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def modules_conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor] = None,
                        relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """``act(bn(conv(x)) + residual)`` over the modules ``conv`` and ``bn``, fused where it can be;
    ``backend`` as in ``resfuse.ops``. Checks the input; blocks check once and call ``run_modules`` per conv."""
    check_block_input(x, conv)
    return run_modules(x, conv, bn, residual, relu, resolve_route(x, backend))


def resolve_route(x: Tensor, backend: Optional[str]) -> tuple[str, str]:
    """(requested, resolved) backend for ops on ``x``'s device: "auto" stays visible to the ops, which may send
    an eval conv to cuDNN's fused op (resfuse/ops/cudnn_fused.py)."""
    requested = ops.backend.requested_backend(backend)
    return requested, ops.resolve_backend(requested, x.device)


def run_modules(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool,
                route: tuple[str, str]) -> Tensor:
    """``conv_bn_act`` for an input already checked against ``conv`` (check_block_input) and a route from
    ``resolve_route``. Blocks call this for each of their convs, so the input check and the backend lookup are
    made once per block: at N=128 a block's step is bound by host time, and this is part of it."""
    requested, impl = route
    reason = unsupported_reason(conv, bn)
    if impl == "reference" or reason is not None:
        if reason is not None:
            warn_reference_once(reason)
        return reference_conv_bn_act(x, conv, bn, residual, relu)
    # Under autocast, eager runs the conv in the autocast dtype and BN on that output with fp32 statistics
    # and parameters; the fused ops are not autocast-aware, so the same casts are made here.
    amp_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    if uses_batch_stats(bn):
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is not None and residual.dtype != y.dtype:
            residual = residual.to(y.dtype)
        momentum = _train_momentum(bn)
        keep_running = not bn.training or bn.track_running_stats
        return run_bn_act(
            y, bn.weight, bn.bias, residual,
            bn.running_mean if keep_running else None, bn.running_var if keep_running else None,
            momentum, bn.eps, relu, impl, requested,
        )
    for_gemm = impl == "triton"
    weight, bias = folded_weight_bias(conv, bn, for_gemm=for_gemm, dtype=amp_dtype,
                                      memory_format=torch.contiguous_format if for_gemm else memory_format_of(x))
    if amp_dtype is not None:
        x = x.to(amp_dtype)
        residual = residual.to(amp_dtype) if residual is not None else None
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    if residual is not None:
        check_matches(residual, conv_output_shape(x, weight, stride, padding, dilation), x.dtype, x.device,
                      "residual")
    return run_conv_bn_act(x, weight, bias, residual, stride, padding, dilation, conv.groups, relu, requested,
                           impl)
