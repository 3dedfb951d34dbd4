"""convert(): re-class torchvision's and timm's ResNet blocks (and ResNets' stems) to fused classes in place;
revert(): back.

Re-classing in place keeps everything a module has: submodules, parameters, buffers, hooks, the training flag,
device, dtype and memory format, so the state_dict, an optimizer's references to the parameters and every
outside reference to a module stay valid. The class a module had is kept in its ``__dict__`` for revert().

A block is recognised by its class: torchvision's BasicBlock / Bottleneck (by module and name, so torchvision
is never imported here), resfuse's eager copies of them, timm's resnet BasicBlock / Bottleneck and resnetv2
PreActBasic / PreActBottleneck / Bottleneck (timm_blocks.py, also by module and name), and subclasses of any of
these whose ``forward`` is the parent's. A subclass with its own forward computes something resfuse does not
know: it is left as it is, and the report says so. So is a timm block whose children the fused ops can never
compute (GroupNorm, StdConv2d, an activation other than ReLU: their types, checked here), and every other
residual block of a timm ResNet (SelectiveKernel, ResNeSt, Res2Net...). ``convert()`` ends with one
``ConversionWarning`` saying what it fused, which SE / ECA / drop_path block ends it fused into the block tail
(timm_tail.py), what runs as modules inside fused blocks, and what it left.
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
from .timm_blocks import (fused_block_class, fused_block_name, known_timm_block, modules_left_as_is, static_reason,
                          tail_fused_parts)
from .timm_resnet import (
    ConvNormActSequential,
    fusable_sequence,
    fused_timm_model_class,
    is_fused_timm_model,
    stage_blocks,
    stem_sequences,
    stem_static_reason,
)

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


def _reclass(module: nn.Module, cls: type, changed: list) -> None:
    module.__dict__[SOURCE_ATTR] = type(module)
    module.__class__ = cls
    changed.append(module)


def _undo(changed: list) -> None:
    """Give back the classes (and drop the attributes) this convert() call gave: strict=True leaves the model as
    it found it when it raises."""
    for module in changed:
        module.__dict__.pop("backend" if type(module) in _FUSED_BLOCKS else BACKEND_ATTR, None)
        module.__class__ = module.__dict__.pop(SOURCE_ATTR)


def _store_backend(module: nn.Module, backend: Optional[str]) -> None:
    """A fused model, Sequential or timm block keeps its backend in its __dict__ (None: RESFUSE_BACKEND, else
    auto); converting again keeps it unless a backend is given."""
    if backend is not None or BACKEND_ATTR not in module.__dict__:
        module.__dict__[BACKEND_ATTR] = backend


class _Report:
    def __init__(self) -> None:
        self.fused: collections.Counter = collections.Counter()
        self.left: collections.Counter = collections.Counter()
        self.as_modules: collections.Counter = collections.Counter()
        self.in_tails: collections.Counter = collections.Counter()  # SE / ECA / drop_path in the fused tail
        self.stems_left: collections.Counter = collections.Counter()  # not blocks: strict=True lets them be
        self.stems = 0
        self.sequences = 0

    def text(self, model: nn.Module) -> str:
        blocks = sum(self.fused.values())
        parts = [f"{blocks} block{'s' if blocks != 1 else ''} fused"]
        if blocks:
            parts[0] += " (" + ", ".join(f"{n} {name}" for name, n in sorted(self.fused.items())) + ")"
        if self.stems:
            parts.append(f"{self.stems} ResNet stem{'s' if self.stems != 1 else ''} fused")
        if self.sequences:
            parts.append(f"{self.sequences} stem Sequential{'s' if self.sequences != 1 else ''} fused")
        text = "resfuse.convert: " + ", ".join(parts)
        if self.in_tails:
            text += "; fused into the block tails: " + ", ".join(
                f"{n} x {what}" for what, n in sorted(self.in_tails.items()))
        if self.as_modules:
            text += "; run as modules inside fused blocks: " + ", ".join(
                f"{n} x {what}" for what, n in sorted(self.as_modules.items()))
        if self.left:
            total = sum(self.left.values())
            text += f"; {total} left as {'they are' if total != 1 else 'it is'}: " + "; ".join(
                f"{n} x {what}" for what, n in sorted(self.left.items()))
        if self.stems_left:
            text += "; stems left as they are: " + "; ".join(
                f"{n} x {what}" for what, n in sorted(self.stems_left.items()))
        if not blocks and not self.left:
            text += f": no ResNet block found in {type(model).__name__}"
        return text


def convert(model: nn.Module, backend: Optional[str] = None, stem: bool = True, strict: bool = False) -> nn.Module:
    """Re-class every torchvision and timm ResNet block in ``model`` (``model`` itself included) to a fused class,
    in place, and return ``model``. ``backend`` is stored on each block (None: RESFUSE_BACKEND, else auto).
    ``stem``: also fuse the stem of every torchvision or timm ResNet in ``model`` (conv1 -> bn1 -> relu; timm's
    deep stems and stem Sequentials). ``strict``: raise if a ResNet block is left unfused (a subclass with its
    own forward, a timm block with children the fused ops cannot compute, a timm ResNet block of another kind).
    Warns once, with what it did."""
    if backend is not None:
        requested_backend(backend)
    report = _Report()
    changed: list = []  # what this call re-classed
    stage_members = []  # every residual block of a timm ResNet: each must end up fused or named
    for module in list(model.modules()):
        cls = type(module)
        stage_members += stage_blocks(module)
        if cls in _FUSED_BLOCKS:
            if backend is not None:
                module.backend = backend
            report.fused[cls.__name__] += 1
            continue
        if stem and (is_fused_model(module) or fused_model_class(cls) is not None):
            if not is_fused_model(module):
                _reclass(module, fused_model_class(cls), changed)
            _store_backend(module, backend)
            report.stems += 1
            continue
        if stem and (is_fused_timm_model(module) or fused_timm_model_class(cls) is not None):
            reason = None if is_fused_timm_model(module) else stem_static_reason(module)
            if reason is None:
                if not is_fused_timm_model(module):
                    _reclass(module, fused_timm_model_class(cls), changed)
                _store_backend(module, backend)
                report.stems += 1
            else:
                report.stems_left[f"{cls.__name__} ({reason})"] += 1
        if stem:
            for _, seq in stem_sequences(module):
                if type(seq) is not ConvNormActSequential and not fusable_sequence(seq):
                    continue
                if type(seq) is not ConvNormActSequential:
                    _reclass(seq, ConvNormActSequential, changed)
                _store_backend(seq, backend)
                report.sequences += 1
        timm_name = fused_block_name(module)
        if timm_name is not None:
            _store_backend(module, backend)
            report.fused[timm_name] += 1
            continue
        known = _known_block(cls)
        if known is not None:
            source, fused = known
            if cls is not source and cls.forward is not source.forward:
                report.left[f"{cls.__name__} (a subclass of {source.__name__} with its own forward)"] += 1
                continue
            _reclass(module, fused, changed)
            module.__dict__["backend"] = backend
            report.fused[fused.__name__] += 1
            continue
        timm_known = known_timm_block(cls)
        if timm_known is None:
            continue
        source, timm_name = timm_known
        if cls is not source and cls.forward is not source.forward:
            report.left[f"{cls.__name__} (a subclass of timm's {source.__name__} with its own forward)"] += 1
            continue
        reason = static_reason(timm_name, module)
        if reason is not None:
            report.left[f"{cls.__name__} ({reason})"] += 1
            continue
        _reclass(module, fused_block_class(timm_name), changed)
        _store_backend(module, backend)
        report.fused[timm_name] += 1
        for what in modules_left_as_is(timm_name, module):
            report.as_modules[what] += 1
        for what in tail_fused_parts(timm_name, module):
            report.in_tails[what] += 1
    for block in stage_members:
        cls = type(block)
        if (fused_block_name(block) is None and known_timm_block(cls) is None and _known_block(cls) is None
                and cls not in _FUSED_BLOCKS):
            report.left[f"{cls.__name__} (no fused path)"] += 1
    text = report.text(model)
    if strict and report.left:
        _undo(changed)
        raise RuntimeError(text + " (convert(strict=True): the model is left as it was)")
    warnings.warn(text, ConversionWarning, stacklevel=2)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Give back the classes every converted module had (a plain torchvision or timm model), with the same
    state."""
    for module in list(model.modules()):
        cls = type(module)
        if cls in _FUSED_BLOCKS:
            source = module.__dict__.pop(SOURCE_ATTR, None)
            if source is None:  # built as resfuse's block, not converted: its eager twin
                source = _torchvision_twin(cls)
            module.__dict__.pop("backend", None)
            module.__class__ = source
        elif (is_fused_model(module) or is_fused_timm_model(module) or cls is ConvNormActSequential
              or fused_block_name(module) is not None):
            # each is a subclass of the class it was made from, which is what a missing record gives back
            source = module.__dict__.pop(SOURCE_ATTR, None) or cls.__bases__[0]
            module.__dict__.pop(BACKEND_ATTR, None)
            module.__class__ = source
    return model


def _torchvision_twin(cls: type) -> type:
    try:
        from torchvision.models import resnet
    except ImportError:
        return _FUSED_BLOCKS[cls]
    return resnet.BasicBlock if cls is BasicBlock else resnet.Bottleneck
