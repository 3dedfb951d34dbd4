"""The ResNet stem (conv1 -> bn1 -> relu) as one fused op, with the model's state_dict keys unchanged.

torchvision's ResNet calls ``self.conv1``, ``self.bn1`` and ``self.relu`` one after the other. To fuse them
without moving any parameter (so checkpoints, optimizers and ``revert`` keep working), the three modules are
re-classed in place: conv1 runs the fused conv-BN-ReLU, reaching bn1 through a plain (unregistered)
attribute, and bn1 and relu pass their input through. Each keeps its original class for ``revert`` and for
the reference path.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

SOURCE_ATTR = "_resfuse_source_class"
_STEM_BN_ATTR = "_resfuse_stem_bn"


def plain_type(module: nn.Module) -> type:
    """The class a module had before resfuse re-classed it."""
    return module.__dict__.get(SOURCE_ATTR) or type(module)


def plain_forward(module: nn.Module, x: Tensor) -> Tensor:
    """The module's own computation, also for a re-classed stem module (whose forward is fused or a no-op)."""
    source = module.__dict__.get(SOURCE_ATTR)
    return source.forward(module, x) if source is not None else module(x)


class FusedStemConv(nn.Conv2d):
    """conv1 of a converted ResNet: computes relu(bn1(conv1(x))) as one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        from .routing import modules_conv_bn_act

        return modules_conv_bn_act(x, self, self.__dict__[_STEM_BN_ATTR], relu=True, backend=self.__dict__.get("backend"))


class FusedAwayBatchNorm2d(nn.BatchNorm2d):
    """bn1 of a converted ResNet stem: its math runs inside conv1, so it passes its input through."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class FusedAwayReLU(nn.ReLU):
    """relu of a converted ResNet stem: applied inside conv1."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _reclass(module: nn.Module, cls: type) -> None:
    module.__dict__[SOURCE_ATTR] = type(module)
    module.__class__ = cls


def _is_torchvision_resnet(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ == "ResNet" and cls.__module__ == "torchvision.models.resnet"


def fuse_stem(model: nn.Module, backend: Optional[str]) -> bool:
    """Fuse the stem of a torchvision ResNet in place; False when ``model`` is not one (or is fused already)."""
    if not _is_torchvision_resnet(model):
        return False
    if isinstance(model.conv1, FusedStemConv):
        if backend is not None:
            model.conv1.__dict__["backend"] = backend
        return False
    if type(model.conv1) is not nn.Conv2d or type(model.bn1) is not nn.BatchNorm2d or type(model.relu) is not nn.ReLU:
        return False
    model.conv1.__dict__[_STEM_BN_ATTR] = model.bn1
    model.conv1.__dict__["backend"] = backend
    _reclass(model.conv1, FusedStemConv)
    _reclass(model.bn1, FusedAwayBatchNorm2d)
    _reclass(model.relu, FusedAwayReLU)
    return True


def unfuse_stem(model: nn.Module) -> bool:
    """Undo ``fuse_stem``; False when there is nothing to undo."""
    if not _is_torchvision_resnet(model) or not isinstance(model.conv1, FusedStemConv):
        return False
    for module in (model.conv1, model.bn1, model.relu):
        module.__class__ = module.__dict__.pop(SOURCE_ATTR)
    model.conv1.__dict__.pop(_STEM_BN_ATTR, None)
    model.conv1.__dict__.pop("backend", None)
    return True
