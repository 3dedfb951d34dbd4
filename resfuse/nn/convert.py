"""convert(): re-class torchvision's ResNet blocks (and ResNets' stems) to resfuse's in place; revert(): back.

Re-classing in place keeps everything a module has: submodules, parameters, buffers, hooks, the training flag,
device, dtype and memory format, so the state_dict, an optimizer's references to the parameters and every
outside reference to a module stay valid. The class a module had is kept in its ``__dict__`` for revert().

A block is recognised by its class: torchvision's BasicBlock / Bottleneck (by module and name, so torchvision
is never imported here), resfuse's eager copies of them, and subclasses of either whose ``forward`` is the
parent's. A subclass with its own forward computes something resfuse does not know: it is left as it is, and
the report says so. ``convert()`` ends with one ``ConversionWarning`` saying what it fused and what it left.
"""
from __future__ import annotations

import collections
import warnings
from typing import Optional

from torch import nn

from ..ops.backend import requested_backend
from .blocks import BasicBlock, Bottleneck
from .eager_blocks import EagerBasicBlock, EagerBottleneck
from .fused_resnet import BACKEND_ATTR, fused_model_class, is_fused_model

SOURCE_ATTR = "_resfuse_source_class"
_FUSED_BLOCKS = {BasicBlock: EagerBasicBlock, Bottleneck: EagerBottleneck}  # fused class -> its eager twin


class ConversionWarning(UserWarning):
    """What ``resfuse.convert()`` fused and what it left as it was (one per call)."""


def _known_block(cls: type) -> Optional[tuple[type, type]]:
    """(the known block class ``cls`` is or derives from, the fused class for it), or None."""
    for base in cls.__mro__:
        if base is EagerBasicBlock or base is EagerBottleneck:
            return base, BasicBlock if base is EagerBasicBlock else Bottleneck
        if base.__module__ == "torchvision.models.resnet" and base.__name__ in ("BasicBlock", "Bottleneck"):
            return base, BasicBlock if base.__name__ == "BasicBlock" else Bottleneck
    return None


def _reclass(module: nn.Module, cls: type) -> None:
    module.__dict__[SOURCE_ATTR] = type(module)
    module.__class__ = cls


class _Report:
    def __init__(self) -> None:
        self.fused: collections.Counter = collections.Counter()
        self.left: collections.Counter = collections.Counter()
        self.stems = 0

    def text(self, model: nn.Module) -> str:
        blocks = sum(self.fused.values())
        parts = [f"{blocks} block{'s' if blocks != 1 else ''} fused"]
        if blocks:
            parts[0] += " (" + ", ".join(f"{n} {name}" for name, n in sorted(self.fused.items())) + ")"
        if self.stems:
            parts.append(f"{self.stems} ResNet stem{'s' if self.stems != 1 else ''} fused")
        text = "resfuse.convert: " + ", ".join(parts)
        if self.left:
            total = sum(self.left.values())
            text += f"; {total} left as {'they are' if total != 1 else 'it is'}: " + "; ".join(
                f"{n} x {what}" for what, n in sorted(self.left.items()))
        if not blocks and not self.left:
            text += f": no ResNet block found in {type(model).__name__}"
        return text


def convert(model: nn.Module, backend: Optional[str] = None, stem: bool = True, strict: bool = False) -> nn.Module:
    """Re-class every torchvision BasicBlock/Bottleneck in ``model`` (``model`` itself included) to resfuse's, in
    place, and return ``model``. ``backend`` is stored on each block (None: RESFUSE_BACKEND, else auto).
    ``stem``: also fuse the conv1 -> bn1 -> relu stem of every torchvision ResNet in ``model``. ``strict``: raise
    if a ResNet block is left unfused (a subclass with its own forward). Warns once, with what it did."""
    if backend is not None:
        requested_backend(backend)
    report = _Report()
    for module in list(model.modules()):
        cls = type(module)
        if cls in _FUSED_BLOCKS:
            if backend is not None:
                module.backend = backend
            report.fused[cls.__name__] += 1
            continue
        if stem and (is_fused_model(module) or fused_model_class(cls) is not None):
            if not is_fused_model(module):
                _reclass(module, fused_model_class(cls))
            if backend is not None or BACKEND_ATTR not in module.__dict__:
                module.__dict__[BACKEND_ATTR] = backend
            report.stems += 1
            continue
        known = _known_block(cls)
        if known is None:
            continue
        source, fused = known
        if cls is not source and cls.forward is not source.forward:
            report.left[f"{cls.__name__} (a subclass of {source.__name__} with its own forward)"] += 1
            continue
        _reclass(module, fused)
        module.__dict__["backend"] = backend
        report.fused[fused.__name__] += 1
    text = report.text(model)
    if strict and report.left:
        raise RuntimeError(text + " (convert(strict=True))")
    warnings.warn(text, ConversionWarning, stacklevel=2)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Give back the classes every converted module had (a plain torchvision model), with the same state."""
    for module in list(model.modules()):
        cls = type(module)
        if cls in _FUSED_BLOCKS or is_fused_model(module):
            source = module.__dict__.pop(SOURCE_ATTR, None)
            if source is None:  # built as resfuse's block, not converted: its eager twin
                source = _torchvision_twin(cls) if cls in _FUSED_BLOCKS else None
            module.__dict__.pop("backend" if cls in _FUSED_BLOCKS else BACKEND_ATTR, None)
            if source is not None:
                module.__class__ = source
    return model


def _torchvision_twin(cls: type) -> type:
    try:
        from torchvision.models import resnet
    except ImportError:
        return _FUSED_BLOCKS[cls]
    return resnet.BasicBlock if cls is BasicBlock else resnet.Bottleneck
