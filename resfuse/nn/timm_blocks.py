"""timm's ResNet blocks with fused forwards: ``timm.models.resnet`` BasicBlock / Bottleneck and
``timm.models.resnetv2`` PreActBasic / PreActBottleneck / Bottleneck.

``convert()`` re-classes such a block in place to a subclass of its timm class made here on first use (timm stays
an optional dependency; the classes are named in this module, so pickle finds them through the module
``__getattr__``). The subclass overrides ``forward`` only. Like resfuse's own blocks it reads its children on
every call and runs them fused where routing.py accepts them, timm's own forward (the module path, after one
warning) where it does not.

What runs fused, per block (every conv-norm-act triple is one fused op: ``fused_conv_bn_act``):

- resnet BasicBlock: conv1-bn1-act1, then conv2-bn2 (+ shortcut) -act2.
  resnet Bottleneck: conv1-bn1-act1, conv2-bn2-act2, conv3-bn3 (+ shortcut) -act3.
  A downsample ``Sequential(conv, norm)`` or avg-down ``Sequential(pool, conv, norm)``: its conv-norm fused,
  the pool run as it is. ``aa`` (BlurPool2d, AvgPool2d) runs as it is between the fused convs.
- resnetv2 PreActBasic / PreActBottleneck (norms are timm's BatchNormAct2d: BN then its own activation, before
  each conv): conv_i followed by norm_{i+1} is a conv-BN-ReLU; the last conv + shortcut is one fused
  conv-add (``fused_conv_act``); norm1, the block's pre-activation, is ``bn_act`` without residual in
  training and ``bn_eval_act`` (one per-channel affine + ReLU pass) in eval, as a module under autocast. The
  shortcut conv (on the pre-activated input, no norm) runs as it is.
- resnetv2 Bottleneck (not pre-activated): conv-norm pairs fused, the last with the shortcut and act3.

- the end of resnet's BasicBlock / Bottleneck and resnetv2's Bottleneck with SE / ECA attention (``se``) or a
  ``drop_path`` that drops: conv, then BN, the attention's gate, drop_path's factor, the add and the ReLU as one
  fused tail (``resfuse.ops.block_tail``; timm_tail.py says which attention layers and why). A pre-activation
  block's drop_path, while it drops: ATen's last conv, then y * keep + shortcut in one block_tail pass.

What still runs as modules inside a fused block, with exactly timm's numbers (``convert()``'s report counts
these): attention layers the tail does not know (and the add + ReLU after them); ``drop_block`` while it
drops anything (training with a rate > 0); ``aa``. A module that
cannot change its input (``nn.Identity``, DropPath / DropBlock2d in eval or at rate 0, no hooks) is skipped, so
the conv-norm-act around it fuses.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.bn_eval_act import run_bn_eval_act
from .routing import (
    Route,
    check_block_input,
    conv_reason,
    fused_bn_act,
    fused_conv_act,
    fused_conv_bn_act,
    has_hooks,
    hook_reason,
    modules_reason,
    norm_reason,
    relu_reason,
    resolve_route,
    run_forward_pre_hooks,
    traced_by_fx,
    uses_batch_stats,
    warn_module_path_once,
    warn_once,
)
from .timm_tail import (attention_reason, drop_path_reason, fused_tail, is_timm_class, preact_drop_path_tail,
                        preact_tail_reason, tail_reason)

BACKEND_ATTR = "_resfuse_backend"
Named = tuple[tuple[str, nn.Module], ...]


# ---------------------------------------------------------------------------------------------------------------
# timm's layers, recognised by module and class name (timm is never imported to look at a model)


def is_batch_norm_act(norm: nn.Module) -> bool:
    """Exactly timm's BatchNormAct2d: nn.BatchNorm2d's math, then its own ``drop`` and ``act`` children."""
    return is_timm_class(type(norm), "timm.layers.norm_act", "BatchNormAct2d")


def norm_act_reason(norm: nn.Module, name: str, hooks: bool = True) -> Optional[str]:
    """Why ``norm`` is not a BatchNormAct2d the fused ops compute (BN, no drop, ReLU or no activation), or None.
    ``hooks``: also refuse hooks on it or its children (a call's check; convert() looks at types only)."""
    if not is_batch_norm_act(norm):
        return f"{name}: norm layer {type(norm).__name__}"
    drop, act = norm.drop, norm.act
    if type(drop) is not nn.Identity:
        return f"{name}.drop: {type(drop).__name__}"
    if type(act) is not nn.ReLU and type(act) is not nn.Identity:
        return f"{name}.act: activation {type(act).__name__}"
    if hooks:
        for part, module in ((name, norm), (f"{name}.drop", drop), (f"{name}.act", act)):
            reason = hook_reason(module, part)
            if reason is not None:
                return reason
    return None


def fusable_norm_type(bn: nn.Module) -> bool:
    """Whether a norm of this type takes the fused path in some mode: nn.SyncBatchNorm does in eval, whatever
    mode the model is in when it is converted (routing.norm_reason decides per call)."""
    return type(bn) is nn.SyncBatchNorm or norm_reason(bn) is None


def norm_act_relu(norm: nn.Module) -> bool:
    """Whether an accepted BatchNormAct2d applies its ReLU (``apply_act=False`` gives it an nn.Identity)."""
    return type(norm.act) is nn.ReLU


def passes_through(module: Optional[nn.Module]) -> bool:
    """Whether calling ``module`` now returns its input untouched and runs nothing else: None, nn.Identity, or
    timm's DropPath / DropBlock2d in eval mode or at rate 0 (both return their input then), without hooks."""
    if module is None:
        return True
    if has_hooks(module):
        return False
    cls = type(module)
    if cls is nn.Identity:
        return True
    if is_timm_class(cls, "timm.layers.drop", "DropPath") or is_timm_class(cls, "timm.layers.drop", "DropBlock2d"):
        return not module.training or not module.drop_prob
    return False


# ---------------------------------------------------------------------------------------------------------------
# Each block's parts: (convs, norms, norm-acts, relus), the (name, module) pairs routing checks


def _resnet_parts(block: nn.Module, depth: int) -> tuple[Named, Named, Named, Named]:
    names = range(1, depth + 1)
    return (tuple((f"conv{i}", getattr(block, f"conv{i}")) for i in names),
            tuple((f"bn{i}", getattr(block, f"bn{i}")) for i in names), (),
            tuple((f"act{i}", getattr(block, f"act{i}")) for i in names))


def _resnetv2_parts(block: nn.Module, depth: int, relus: Named = ()) -> tuple[Named, Named, Named, Named]:
    names = range(1, depth + 1)
    return (tuple((f"conv{i}", getattr(block, f"conv{i}")) for i in names), (),
            tuple((f"norm{i}", getattr(block, f"norm{i}")) for i in names), relus)


_PARTS: dict[str, Callable[[nn.Module], tuple[Named, Named, Named, Named]]] = {
    "TimmBasicBlock": lambda b: _resnet_parts(b, 2),
    "TimmBottleneck": lambda b: _resnet_parts(b, 3),
    "TimmPreActBasic": lambda b: _resnetv2_parts(b, 2),
    "TimmPreActBottleneck": lambda b: _resnetv2_parts(b, 3),
    "TimmV2Bottleneck": lambda b: _resnetv2_parts(b, 3, (("act3", b.act3),)),
}


def static_reason(fused_name: str, block: nn.Module) -> Optional[str]:
    """Why a block of this kind can never take the fused path as its children are (their types; hooks come and
    go), or None. convert() leaves such a block as it is and names the reason in its report."""
    convs, norms, norm_acts, relus = _PARTS[fused_name](block)
    for name, conv in convs:
        reason = conv_reason(conv)
        if reason is not None:
            return f"{name}: {reason}"
    for name, bn in norms:
        if not fusable_norm_type(bn):
            return f"{name}: norm layer {type(bn).__name__}"
    for name, norm in norm_acts:
        reason = norm_act_reason(norm, name, hooks=False)
        if reason is not None:
            return reason
    for name, act in relus:
        reason = relu_reason(act)
        if reason is not None:
            return f"{name}: {reason}"
    return None


# the blocks whose end is ``_residual_tail``: conv, norm, [se,] drop_path, + shortcut, ReLU; and the
# pre-activation blocks, whose end is conv, drop_path, + shortcut (preact_drop_path_tail)
_TAIL_BLOCKS = ("TimmBasicBlock", "TimmBottleneck", "TimmV2Bottleneck", "TimmPreActBasic", "TimmPreActBottleneck")


def _drops_in_training(module: Optional[nn.Module]) -> bool:
    return module is not None and type(module) is not nn.Identity and bool(getattr(module, "drop_prob", 1.0))


def _tail_fuses(fused_name: str, block: nn.Module) -> bool:
    """Whether the block's SE / ECA / drop_path run in the fused tail (types only; hooks are a call's matter)."""
    if fused_name not in _TAIL_BLOCKS:
        return False
    norm = block.norm3 if fused_name == "TimmV2Bottleneck" else None
    if norm is not None and norm_act_relu(norm):
        return False
    return (attention_reason(getattr(block, "se", None), hooks=False) is None
            and drop_path_reason(block.drop_path, hooks=False) is None)


def tail_fused_parts(fused_name: str, block: nn.Module) -> list[str]:
    """What of timm's block end runs inside the fused tail (resfuse/nn/timm_tail.py), for convert()'s report."""
    if not _tail_fuses(fused_name, block):
        return []
    parts = []
    se = getattr(block, "se", None)
    if se is not None:
        parts.append(f"attention {type(se).__name__}")
    if _drops_in_training(block.drop_path):
        parts.append("drop_path")
    return parts


def modules_left_as_is(fused_name: str, block: nn.Module) -> list[str]:
    """What runs as modules inside this block once fused, for convert()'s report (see the module docstring)."""
    notes = []
    tail = _tail_fuses(fused_name, block)
    se = getattr(block, "se", None)
    if se is not None and not tail:
        notes.append(f"attention {type(se).__name__}")
    aa = getattr(block, "aa", None)
    if aa is not None and type(aa) is not nn.Identity:
        notes.append(f"aa {type(aa).__name__}")
    for name in ("drop_path", "drop_block"):
        if _drops_in_training(getattr(block, name, None)) and not (name == "drop_path" and tail):
            notes.append(f"{name} in training")
    return notes


def _route(block: nn.Module, x: Tensor, fused_name: str) -> Optional[Route]:
    """The block's route, or None for timm's forward (the reference backend, or a reason to warn about)."""
    if traced_by_fx(block):
        return None
    check_block_input(x, block.conv1)
    route = resolve_route(x, block.__dict__.get(BACKEND_ATTR))
    if route[1] == "reference":
        return None
    convs, norms, norm_acts, relus = _PARTS[fused_name](block)
    reason = modules_reason(convs, norms, relus)
    if reason is None:
        for name, norm in norm_acts:
            reason = norm_act_reason(norm, name)
            if reason is not None:
                break
    if reason is not None:
        warn_module_path_once(block, reason)
        return None
    return route


# ---------------------------------------------------------------------------------------------------------------
# Shortcuts


def _shortcut(block: nn.Module, x: Tensor, route: Route) -> Tensor:
    """The block's shortcut on ``x``: ``x`` itself, or its downsample with the conv-norm fused where it is a
    ``Sequential([pool,] conv, norm)`` (timm's resnet) or a DownsampleConv / DownsampleAvg (timm's resnetv2)
    with a norm; any other downsample is called as it is."""
    down = block.downsample
    if down is None:
        return x
    cls = type(down)
    pool = None
    if cls is nn.Sequential and len(down) in (2, 3):
        conv, norm = down[-2], down[-1]
        pool = down[0] if len(down) == 3 else None
    elif (is_timm_class(cls, "timm.models.resnetv2", "DownsampleConv")
          or is_timm_class(cls, "timm.models.resnetv2", "DownsampleAvg")):
        conv, norm, pool = down.conv, down.norm, getattr(down, "pool", None)
    else:
        warn_once(f"resfuse: the downsample of {type(block).__name__} runs unfused "
                  f"(downsample {cls.__name__} is not a [pool,] conv, norm sequence)")
        return down(x)
    reason = None
    if has_hooks(down):
        reason = "a hook on downsample"
    elif is_batch_norm_act(norm):
        reason = modules_reason((("downsample conv", conv),), ()) or norm_act_reason(norm, "downsample norm")
    else:
        reason = modules_reason((("downsample conv", conv),), (("downsample norm", norm),))
    if reason is not None:
        # resnetv2's pre-activation shortcut is a conv alone (its norm an nn.Identity): nothing to fuse, no warning
        if type(norm) is not nn.Identity:
            warn_once(f"resfuse: the downsample of {type(block).__name__} runs unfused ({reason})")
        return down(x)
    if pool is not None:
        x = pool(x)
    relu = is_batch_norm_act(norm) and norm_act_relu(norm)
    return fused_conv_bn_act(run_forward_pre_hooks(conv, x), conv, norm, None, relu, route)


# ---------------------------------------------------------------------------------------------------------------
# Forwards


def _conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.Module, drop_block: Optional[nn.Module], act: nn.Module,
                 route: Route) -> Tensor:
    """act(drop_block(bn(conv(x)))), the ReLU fused when drop_block passes its input through."""
    x = run_forward_pre_hooks(conv, x)
    if passes_through(drop_block):
        return fused_conv_bn_act(x, conv, bn, None, True, route)
    return act(drop_block(fused_conv_bn_act(x, conv, bn, None, False, route)))


def _residual_tail(block: nn.Module, x: Tensor, conv: nn.Conv2d, bn: nn.Module, bn_relu: bool, block_input: Tensor,
                   route: Route, shortcut: Optional[Tensor] = None) -> Tensor:
    """relu(drop_path(se(bn(conv(x)))) + shortcut), the shortcut made here from ``block_input`` unless given.
    One fused op when the block has no attention, drop_path passes through and bn has no activation of its own;
    else ATen's conv and the fused tail (timm_tail.py) when it accepts the parts; otherwise conv-norm fused and
    the rest as timm runs it (attention, drop_path, then the shortcut), after one warning."""
    x = run_forward_pre_hooks(conv, x)
    se, drop_path = getattr(block, "se", None), block.drop_path
    if se is None and passes_through(drop_path):
        if not bn_relu:
            if shortcut is None:
                shortcut = _shortcut(block, block_input, route)
            return fused_conv_bn_act(x, conv, bn, shortcut, True, route)
    else:
        reason = tail_reason(se, drop_path, bn, bn_relu)
        if reason is None:
            y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            if shortcut is None:
                shortcut = _shortcut(block, block_input, route)
            return fused_tail(y, bn, se, drop_path, shortcut, route)
        warn_once(f"resfuse: the tail of {type(block).__name__} (attention, drop_path, add, ReLU) runs as timm's "
                  f"modules ({reason})")
    out = fused_conv_bn_act(x, conv, bn, None, bn_relu, route)
    if se is not None:
        out = se(out)
    if not passes_through(drop_path):
        out = drop_path(out)
    if shortcut is None:
        shortcut = _shortcut(block, block_input, route)
    return torch.relu(out + shortcut)


def _basic_block_forward(self, x: Tensor) -> Tensor:
    route = _route(self, x, "TimmBasicBlock")
    if route is None:
        return self._resfuse_eager_forward(x)
    out = self.aa(_conv_bn_act(x, self.conv1, self.bn1, self.drop_block, self.act1, route))
    return _residual_tail(self, out, self.conv2, self.bn2, False, x, route)


def _bottleneck_forward(self, x: Tensor) -> Tensor:
    route = _route(self, x, "TimmBottleneck")
    if route is None:
        return self._resfuse_eager_forward(x)
    out = _conv_bn_act(x, self.conv1, self.bn1, None, self.act1, route)
    out = self.aa(_conv_bn_act(out, self.conv2, self.bn2, self.drop_block, self.act2, route))
    return _residual_tail(self, out, self.conv3, self.bn3, False, x, route)


def _conv_norm_act_chain(block: nn.Module, x: Tensor, pairs: tuple[tuple[str, str], ...], route: Route) -> Tensor:
    """conv -> BatchNormAct2d for each (conv name, norm name) pair, each one fused op."""
    for conv_name, norm_name in pairs:
        conv, norm = getattr(block, conv_name), getattr(block, norm_name)
        x = fused_conv_bn_act(run_forward_pre_hooks(conv, x), conv, norm, None, norm_act_relu(norm), route)
    return x


def _preact_forward(block: nn.Module, x: Tensor, fused_name: str, pairs: tuple[tuple[str, str], ...],
                    last: str) -> Tensor:
    """norm1 -> (conv_i -> norm_i+1)... -> last conv -> drop_path, + the shortcut (x, or the downsample of the
    pre-activated x); no activation after the add."""
    route = _route(block, x, fused_name)
    if route is None:
        return block._resfuse_eager_forward(x)
    norm1 = block.norm1
    if uses_batch_stats(norm1):
        x_preact = fused_bn_act(x, norm1, None, norm_act_relu(norm1), route)
    elif torch.is_autocast_enabled(x.device.type):
        x_preact = norm1(x)  # the eval op is not autocast-aware: the module, with eager's casts
    else:
        x_preact = run_bn_eval_act(x, norm1.weight, norm1.bias, None, norm1.running_mean, norm1.running_var,
                                   norm1.eps, norm_act_relu(norm1), route[1], route[0])
    shortcut = x if block.downsample is None else _shortcut(block, x_preact, route)
    out = _conv_norm_act_chain(block, x_preact, pairs, route)
    conv = getattr(block, last)
    out = run_forward_pre_hooks(conv, out)
    drop_path = block.drop_path
    if passes_through(drop_path):
        return fused_conv_act(out, conv, shortcut, False, route)
    out = F.conv2d(out, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    reason = preact_tail_reason(out, drop_path, shortcut)
    if reason is None:
        return preact_drop_path_tail(out, drop_path, shortcut, route)
    warn_once(f"resfuse: the drop_path of {type(block).__name__} runs as timm's module ({reason})")
    return drop_path(out) + shortcut


def _preact_basic_forward(self, x: Tensor) -> Tensor:
    return _preact_forward(self, x, "TimmPreActBasic", (("conv1", "norm2"),), "conv2")


def _preact_bottleneck_forward(self, x: Tensor) -> Tensor:
    return _preact_forward(self, x, "TimmPreActBottleneck", (("conv1", "norm2"), ("conv2", "norm3")), "conv3")


def _v2_bottleneck_forward(self, x: Tensor) -> Tensor:
    """resnetv2's non-pre-activation Bottleneck: the shortcut first (timm's order), then conv-norm pairs, the
    last with the shortcut and act3."""
    route = _route(self, x, "TimmV2Bottleneck")
    if route is None:
        return self._resfuse_eager_forward(x)
    shortcut = _shortcut(self, x, route)
    out = _conv_norm_act_chain(self, x, (("conv1", "norm1"), ("conv2", "norm2")), route)
    norm3 = self.norm3
    return _residual_tail(self, out, self.conv3, norm3, norm_act_relu(norm3), x, route, shortcut)


# ---------------------------------------------------------------------------------------------------------------
# The classes

# fused class name -> (timm module, timm class, fused forward)
_SOURCES: dict[str, tuple[str, str, Callable]] = {
    "TimmBasicBlock": ("timm.models.resnet", "BasicBlock", _basic_block_forward),
    "TimmBottleneck": ("timm.models.resnet", "Bottleneck", _bottleneck_forward),
    "TimmPreActBasic": ("timm.models.resnetv2", "PreActBasic", _preact_basic_forward),
    "TimmPreActBottleneck": ("timm.models.resnetv2", "PreActBottleneck", _preact_bottleneck_forward),
    "TimmV2Bottleneck": ("timm.models.resnetv2", "Bottleneck", _v2_bottleneck_forward),
}
_classes: dict[str, type] = {}


def fused_block_class(name: str) -> type:
    """The fused subclass of a timm block class, by its name here (e.g. "TimmBottleneck"), made on first use."""
    cls = _classes.get(name)
    if cls is not None:
        return cls
    module, base_name, forward = _SOURCES[name]
    base = getattr(importlib.import_module(module), base_name)
    cls = type(name, (base,), {
        "__doc__": f"timm's {module}.{base_name} with a fused forward (resfuse.nn.timm_blocks).",
        "__module__": __name__,
        "__qualname__": name,
        "forward": forward,
        "_resfuse_eager_forward": base.forward,  # the module path: timm's own forward
    })
    _classes[name] = cls
    return cls


def known_timm_block(cls: type) -> Optional[tuple[type, str]]:
    """(the timm block class ``cls`` is or derives from, the name of its fused class), or None."""
    for base in cls.__mro__:
        for name, (module, base_name, _) in _SOURCES.items():
            if is_timm_class(base, module, base_name):
                return base, name
    return None


def fused_block_name(module: nn.Module) -> Optional[str]:
    """The fused class name when ``module`` is a converted timm block, else None."""
    cls = type(module)
    return cls.__name__ if _classes.get(cls.__name__) is cls else None


def __getattr__(name: str):
    if name in _SOURCES:
        return fused_block_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
