"""convert(): swap torchvision ResNet blocks for resfuse's in place; revert(): swap them back.

A block is re-classed, not rebuilt: the new block takes over the old one's submodules, parameters, buffers,
hooks and training flag, so device, dtype, memory format, state_dict and even an optimizer's references to
the parameters all stay valid.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..ops.backend import requested_backend
from .blocks import BasicBlock, Bottleneck
from .eager_blocks import EagerBasicBlock, EagerBottleneck
from .stem import SOURCE_ATTR, fuse_stem, unfuse_stem

_FUSED = (BasicBlock, Bottleneck)


def _fused_class(module: nn.Module) -> Optional[type]:
    cls = type(module)
    if cls in _FUSED:
        return None
    if cls is EagerBasicBlock:
        return BasicBlock
    if cls is EagerBottleneck:
        return Bottleneck
    if cls.__module__ == "torchvision.models.resnet" and cls.__name__ in ("BasicBlock", "Bottleneck"):
        return BasicBlock if cls.__name__ == "BasicBlock" else Bottleneck
    return None


def _reclass(module: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _swap_children(module: nn.Module, swap) -> None:
    for name, child in list(module.named_children()):
        new = swap(child)
        if new is child:
            _swap_children(child, swap)
        else:
            setattr(module, name, new)


def _apply(model: nn.Module, swap) -> nn.Module:
    new = swap(model)
    if new is not model:
        return new
    _swap_children(model, swap)
    return model


def convert(model: nn.Module, backend: Optional[str] = None, stem: bool = True) -> nn.Module:
    """Replace every torchvision BasicBlock/Bottleneck in ``model`` by resfuse's; returns the model (or the
    new block when ``model`` itself is one). ``backend`` is stored on each block (None: RESFUSE_BACKEND/auto).
    ``stem``: also fuse the conv1 -> bn1 -> relu stem of every torchvision ResNet in ``model`` (resfuse/nn/stem.py)."""
    if backend is not None:
        requested_backend(backend)

    def swap(module: nn.Module) -> nn.Module:
        cls = _fused_class(module)
        if cls is None:
            if type(module) in _FUSED and backend is not None:
                module.backend = backend
            return module
        new = _reclass(module, cls)
        new.__dict__[SOURCE_ATTR] = type(module)
        new.__dict__["backend"] = backend
        return new

    model = _apply(model, swap)
    if stem:
        for module in model.modules():
            fuse_stem(module, backend)
    return model


def _default_source(cls: type) -> type:
    try:
        from torchvision.models import resnet
    except ImportError:
        return EagerBasicBlock if cls is BasicBlock else EagerBottleneck
    return resnet.BasicBlock if cls is BasicBlock else resnet.Bottleneck


def revert(model: nn.Module) -> nn.Module:
    """Give back plain torchvision blocks (the class each block was converted from) with the same state."""

    def swap(module: nn.Module) -> nn.Module:
        if type(module) not in _FUSED:
            return module
        source = module.__dict__.get(SOURCE_ATTR) or _default_source(type(module))
        new = _reclass(module, source)
        new.__dict__.pop(SOURCE_ATTR, None)
        new.__dict__.pop("backend", None)
        return new

    for module in model.modules():
        unfuse_stem(module)
    return _apply(model, swap)
