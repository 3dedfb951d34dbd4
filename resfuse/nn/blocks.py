"""Drop-in ResNet blocks: torchvision's constructor, attributes and state_dict keys, fused forward.

BasicBlock: conv-BN-ReLU, then conv-BN + shortcut + ReLU: two fused ops (three with a conv-BN downsample).
Bottleneck: three fused ops (four with a downsample). The reference backend runs torchvision's own forward.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .. import ops, reference
from .functional import check_block_input, conv_bn_act


def _shortcut(block: nn.Module, x: Tensor, backend: str) -> Tensor:
    downsample = block.downsample
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and isinstance(downsample[0], nn.Conv2d):
        return conv_bn_act(x, downsample[0], downsample[1], relu=False, backend=backend)
    return downsample(x)


def _block_backend(block: nn.Module, x: Tensor) -> Optional[str]:
    """The backend the block's ops get, or None for torchvision's own forward (the reference backend). A named
    backend is checked available here; "auto" passes through, since the ops decide per call (eval convs may
    take cuDNN's fused op: resfuse/ops/cudnn_fused.py)."""
    check_block_input(x, block.conv1)
    requested = ops.backend.requested_backend(getattr(block, "backend", None))
    resolved = ops.resolve_backend(requested, x.device)
    if resolved == "reference":
        return None
    return requested if requested == "auto" else resolved


class BasicBlock(reference.BasicBlock):
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
        backend = _block_backend(self, x)
        if backend is None:
            return super().forward(x)
        identity = _shortcut(self, x, backend)
        out = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=backend)
        return conv_bn_act(out, self.conv2, self.bn2, residual=identity, relu=True, backend=backend)


class Bottleneck(reference.Bottleneck):
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
        backend = _block_backend(self, x)
        if backend is None:
            return super().forward(x)
        identity = _shortcut(self, x, backend)
        out = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=backend)
        out = conv_bn_act(out, self.conv2, self.bn2, relu=True, backend=backend)
        return conv_bn_act(out, self.conv3, self.bn3, residual=identity, relu=True, backend=backend)
