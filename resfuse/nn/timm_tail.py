"""The end of a timm ResNet block with its SE / ECA attention and its drop_path, as one fused tail.

timm's resnet BasicBlock / Bottleneck end with ``act(drop_path(se(bn(conv(x)))) + shortcut)`` (resnetv2's
Bottleneck the same without ``se``). When the parts are ones whose math is known here, the block runs that as
``y = conv(x)`` (ATen's conv, as routing runs a conv whose BN uses batch statistics; under autocast the same
casts, autocast's own) then ``resfuse.ops.block_tail``:

- ``bn``: a plain BN (nn.BatchNorm2d, an nn.SyncBatchNorm that does not synchronise in this call, torchvision's
  FrozenBatchNorm2d) with no activation of its own. Batch statistics and running-statistic updates exactly as
  routing's fused BN path (``routing.batch_stats_args``: momentum None is a cumulative average,
  ``num_batches_tracked`` bumped, ``track_running_stats=False`` updates nothing); otherwise the running statistics.
- ``se``: exactly timm's SEModule (without ``add_maxpool``), EcaModule or CecaModule, no hooks on the module
  itself and no ``forward`` of its own on the instance. Its gate (everything SE does to the squeeze
  ``bn(y).mean((2, 3))`` before the final multiplication) runs as torch ops on [N, C] by calling the module's own
  children (``fc1``, ``bn``, ``act``, ``fc2``, ``gate``; ``conv``, ``act``, ``conv2``, ``gate``), so a child
  replaced after convert(), its parameters and its hooks are live.
- ``drop_path``: None, nn.Identity or timm's DropPath (its ``drop_prob``, ``scale_by_keep`` and mode read on every
  call), no hooks. Its factor is drawn by ``drop_path_mask`` with torch's RNG after the gate has run, where timm
  draws it (after ``se``), so a seeded run drops the same samples.
- the block's last activation: nn.ReLU (routing checks it).

One difference in order, which no random number can see in the registry's models: timm makes the shortcut
(the downsample) after se and drop_path; here it is made first, because block_tail takes it as an input. The
downsample is a conv and a norm, after an average pool for avg-down: none of them draws a random number.

Eval uses the running statistics through block_tail's eval path: torch's mean over y for the squeeze, then one
bn_scale_act pass (BN, the gate's factor, the shortcut, ReLU). Folding BN into the conv and taking the squeeze in
the conv's epilogue would save no pass over the activation (the mean reads y once either way), and the conv
here is ATen's, whose epilogue cannot be reached.

resnetv2's pre-activation blocks end with ``drop_path(conv(x)) + shortcut``, no norm and no activation: while
drop_path drops, ``preact_drop_path_tail`` runs ATen's conv then block_tail without BN (one pass: y * keep +
shortcut) instead of timm's multiplication and addition.

Whatever the tail cannot honour in a call (another attention module, a hook, a synchronising SyncBatchNorm) takes
the block's earlier path: its conv and BN fused, the rest run as timm's modules, after one warning naming why;
convert()'s report names the attention types it cannot fuse.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.block_tail import Gate, block_tail, drop_path_mask
from .routing import Route, batch_stats_args, has_hooks, sync_group, uses_batch_stats

# (module, class) of the attention layers whose gate is written here
_SE = ("timm.layers.squeeze_excite", "SEModule")
_ECA = ("timm.layers.eca", "EcaModule")
_CECA = ("timm.layers.eca", "CecaModule")
_DROP_PATH = ("timm.layers.drop", "DropPath")


def is_timm_class(cls: type, module: str, name: str) -> bool:
    """``cls`` is timm's ``module.name`` itself (not a subclass; timm need not be importable to ask)."""
    return cls.__name__ == name and cls.__module__ == module


def _is(module: nn.Module, source: tuple[str, str]) -> bool:
    return is_timm_class(type(module), *source)


def attention_reason(se: Optional[nn.Module], hooks: bool = True) -> Optional[str]:
    """Why the tail cannot run ``se``'s gate, or None (also for no attention at all). ``hooks``: also refuse a
    hook on the module or a ``forward`` set on the instance (a call's check; convert() looks at types only)."""
    if se is None:
        return None
    if not (_is(se, _SE) or _is(se, _ECA) or _is(se, _CECA)):
        return f"attention {type(se).__name__}"
    if _is(se, _SE) and se.add_maxpool:
        return "attention SEModule with add_maxpool"
    if hooks and has_hooks(se):
        return "a hook on se"
    if hooks and "forward" in se.__dict__:
        return "se has a forward of its own"
    return None


def drop_path_reason(drop_path: Optional[nn.Module], hooks: bool = True) -> Optional[str]:
    """Why the tail cannot apply ``drop_path``, or None."""
    if drop_path is None:
        return None
    if type(drop_path) is not nn.Identity and not _is(drop_path, _DROP_PATH):
        return f"drop_path {type(drop_path).__name__}"
    if hooks and has_hooks(drop_path):
        return "a hook on drop_path"
    return None


def tail_reason(se: Optional[nn.Module], drop_path: Optional[nn.Module], bn: nn.Module, bn_relu: bool
                ) -> Optional[str]:
    """Why this call cannot run the fused tail (routing has accepted bn and the block's ReLU), or None."""
    if bn_relu:
        return "the norm before the tail has an activation of its own"
    if sync_group(bn) is not None:
        return "a SyncBatchNorm synchronising its statistics before the attention"
    return attention_reason(se) or drop_path_reason(drop_path)


def _se_gate(se: nn.Module, s: Tensor) -> Tensor:
    """SEModule on the squeeze [N, C], without its final multiplication: fc1, bn, act, fc2, gate."""
    z = se.fc1(s.view(s.shape[0], s.shape[1], 1, 1))
    z = se.fc2(se.act(se.bn(z)))
    return se.gate(z).view(s.shape[0], -1)


def _eca_gate(eca: nn.Module, s: Tensor) -> Tensor:
    """EcaModule / CecaModule on the squeeze [N, C]: a 1-D conv across channels (circularly padded by
    CecaModule; EcaModule's ``use_mlp`` adds act and conv2), then the gate."""
    z = s.view(s.shape[0], 1, -1)
    if _is(eca, _CECA):
        z = F.pad(z, (eca.padding, eca.padding), mode="circular")
    z = eca.conv(z)
    if getattr(eca, "conv2", None) is not None:
        z = eca.conv2(eca.act(z))
    return eca.gate(z).view(s.shape[0], -1)


def _tail_gate(se: Optional[nn.Module], drop_path: Optional[nn.Module], y: Tensor) -> Optional[Gate]:
    """The factor block_tail applies per (n, c) when there is attention: the gate, times drop_path's per-sample
    factor drawn after it (timm's RNG order)."""
    if se is None:
        return None
    gate_of = _se_gate if _is(se, _SE) else _eca_gate

    def gate(s: Tensor) -> Tensor:
        factor = gate_of(se, s)
        keep = _keep(drop_path, y)
        return factor if keep is None else factor * keep.view(-1, 1)
    return gate


def _keep(drop_path: Optional[nn.Module], y: Tensor) -> Optional[Tensor]:
    if drop_path is None or type(drop_path) is nn.Identity:
        return None
    return drop_path_mask(y, drop_path.drop_prob, drop_path.training, drop_path.scale_by_keep)


def preact_tail_reason(y: Tensor, drop_path: nn.Module, shortcut: Tensor) -> Optional[str]:
    """Why ``drop_path(y) + shortcut`` cannot run as ``preact_drop_path_tail`` in this call, or None."""
    if shortcut.dtype != y.dtype:
        # under autocast timm's out-of-place add promotes the sum to the wider dtype; block_tail returns y's
        return f"a {shortcut.dtype} shortcut added to a {y.dtype} conv output"
    return drop_path_reason(drop_path)


def preact_drop_path_tail(y: Tensor, drop_path: nn.Module, shortcut: Tensor, route: Route) -> Tensor:
    """``drop_path(y) + shortcut`` through block_tail without BN or ReLU: one pass, y * keep[n] + shortcut."""
    return block_tail(y, shortcut, training=False, keep=_keep(drop_path, y), relu=False, backend=route[1])


def fused_tail(y: Tensor, bn: nn.Module, se: Optional[nn.Module], drop_path: Optional[nn.Module],
               shortcut: Tensor, route: Route) -> Tensor:
    """``relu(drop_path(se(bn(y))) + shortcut)`` through block_tail, for parts ``tail_reason`` accepted."""
    if shortcut.dtype != y.dtype:
        shortcut = shortcut.to(y.dtype)
    gate = _tail_gate(se, drop_path, y)
    keep = _keep(drop_path, y) if se is None else None  # with attention the gate draws it, after itself
    if uses_batch_stats(bn):
        momentum, running_mean, running_var = batch_stats_args(bn)
        training = True
    else:
        momentum, running_mean, running_var, training = 0.0, bn.running_mean, bn.running_var, False
    return block_tail(y, shortcut, bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps, training,
                      gate=gate, keep=keep, relu=True, backend=route[1])
