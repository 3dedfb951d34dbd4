"""Drop-in ResNet blocks: torchvision's constructor, attributes and state_dict keys, fused forward.

BasicBlock: conv-BN-ReLU, then conv-BN + shortcut + ReLU: two fused ops (three with a conv-BN downsample).
Bottleneck: three fused ops (four with a downsample). Every call reads the block's children as they are then;
when routing.py finds something the fused ops cannot honour (a replaced child, a hook, FX tracing), or with
the reference backend, the block runs torchvision's eager forward (``EagerBasicBlock.forward``).

The convs' forward pre-hooks run where eager runs them: each on its conv's input, in eager's order (the
shortcut's conv after the main branch's last conv), so hooks that recompute a weight (weight_norm, prune) see
what they would see in eager PyTorch.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .eager_blocks import EagerBasicBlock, EagerBottleneck
from .routing import (
    Route,
    check_block_input,
    fused_conv_bn_act,
    modules_reason,
    resolve_route,
    run_forward_pre_hooks,
    traced_by_fx,
    warn_module_path_once,
    warn_once,
)
from .scripting import refuse_scripting


def _route(block: nn.Module, x: Tensor, convs: tuple, norms: tuple) -> Optional[Route]:
    """The block's route, or None for its eager forward (the reference backend, or a reason to warn about)."""
    if traced_by_fx(block):
        return None
    check_block_input(x, block.conv1)
    route = resolve_route(x, block.backend)
    if route[1] == "reference":
        return None
    reason = modules_reason(convs, norms, (("relu", block.relu),))
    if reason is not None:
        warn_module_path_once(block, reason)
        return None
    return route


def _shortcut(block: nn.Module, x: Tensor, route: Route) -> Tensor:
    """The block's identity: ``x``, or its downsample fused when it is torchvision's Sequential(conv, BN)."""
    downsample = block.downsample
    if downsample is None:
        return x
    reason = None
    if type(downsample) is not nn.Sequential or len(downsample) != 2:
        reason = f"downsample {type(downsample).__name__} is not a Sequential(conv, norm)"
    elif downsample._forward_hooks or downsample._forward_pre_hooks:
        reason = "a hook on downsample"
    else:
        reason = modules_reason((("downsample.0", downsample[0]),), (("downsample.1", downsample[1]),))
    if reason is not None:
        warn_once(f"resfuse: the downsample of {type(block).__name__} runs unfused ({reason})")
        return downsample(x)
    conv, bn = downsample[0], downsample[1]
    return fused_conv_bn_act(run_forward_pre_hooks(conv, x), conv, bn, None, False, route)


class BasicBlock(EagerBasicBlock):
    """torchvision.models.resnet.BasicBlock with fused conv-BN-ReLU and conv-BN-add-ReLU."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self.backend = backend

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting(self)

    def forward(self, x: Tensor) -> Tensor:
        conv1, conv2, bn1, bn2 = self.conv1, self.conv2, self.bn1, self.bn2
        route = _route(self, x, (("conv1", conv1), ("conv2", conv2)), (("bn1", bn1), ("bn2", bn2)))
        if route is None:
            return super().forward(x)
        out = fused_conv_bn_act(run_forward_pre_hooks(conv1, x), conv1, bn1, None, True, route)
        out = run_forward_pre_hooks(conv2, out)
        return fused_conv_bn_act(out, conv2, bn2, _shortcut(self, x, route), True, route)


class Bottleneck(EagerBottleneck):
    """torchvision.models.resnet.Bottleneck (v1.5, groups and dilation included) with fused stages."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self.backend = backend

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting(self)

    def forward(self, x: Tensor) -> Tensor:
        conv1, conv2, conv3, bn1, bn2, bn3 = self.conv1, self.conv2, self.conv3, self.bn1, self.bn2, self.bn3
        route = _route(self, x, (("conv1", conv1), ("conv2", conv2), ("conv3", conv3)),
                       (("bn1", bn1), ("bn2", bn2), ("bn3", bn3)))
        if route is None:
            return super().forward(x)
        out = fused_conv_bn_act(run_forward_pre_hooks(conv1, x), conv1, bn1, None, True, route)
        out = fused_conv_bn_act(run_forward_pre_hooks(conv2, out), conv2, bn2, None, True, route)
        out = run_forward_pre_hooks(conv3, out)
        return fused_conv_bn_act(out, conv3, bn3, _shortcut(self, x, route), True, route)
