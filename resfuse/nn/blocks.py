"""Drop-in ResNet blocks: torchvision's constructor, attributes and state_dict keys, fused forward.

BasicBlock: conv-BN-ReLU, then conv-BN + shortcut + ReLU: two fused ops (three with a conv-BN downsample).
Bottleneck: three fused ops (four with a downsample). The reference backend runs torchvision's own forward.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .eager_blocks import EagerBasicBlock, EagerBottleneck
from .routing import check_block_input, resolve_route, run_modules


def _shortcut(block: nn.Module, x: Tensor, route: tuple[str, str]) -> Tensor:
    downsample = block.downsample
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and isinstance(downsample[0], nn.Conv2d):
        check_block_input(x, downsample[0])
        return run_modules(x, downsample[0], downsample[1], None, False, route)
    return downsample(x)


def _block_route(block: nn.Module, x: Tensor) -> Optional[tuple[str, str]]:
    """The (requested, resolved) backend of the block's ops, or None for torchvision's own forward (the
    reference backend). A named backend is checked available here; "auto" stays visible to the ops, which
    decide per call (eval convs may take cuDNN's fused op: resfuse/ops/cudnn_fused.py). The input is checked
    here once: each later conv's input is the previous fused op's output."""
    check_block_input(x, block.conv1)
    route = resolve_route(x, getattr(block, "backend", None))
    return None if route[1] == "reference" else route


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

    def forward(self, x: Tensor) -> Tensor:
        route = _block_route(self, x)
        if route is None:
            return super().forward(x)
        identity = _shortcut(self, x, route)
        out = run_modules(x, self.conv1, self.bn1, None, True, route)
        return run_modules(out, self.conv2, self.bn2, identity, True, route)


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

    def forward(self, x: Tensor) -> Tensor:
        route = _block_route(self, x)
        if route is None:
            return super().forward(x)
        identity = _shortcut(self, x, route)
        out = run_modules(x, self.conv1, self.bn1, None, True, route)
        out = run_modules(out, self.conv2, self.bn2, None, True, route)
        return run_modules(out, self.conv3, self.bn3, identity, True, route)
