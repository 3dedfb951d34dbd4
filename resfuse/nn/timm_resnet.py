"""Converted timm ResNets: the stem's conv-norm-act runs fused, in timm's ResNet and in its Sequentials.

- ``ConvNormActSequential``: an ``nn.Sequential`` re-classed in place whose forward runs each conv -> BN -> ReLU
  triple (timm's deep and tiered stems, ``conv1``; ``replace_stem_pool``'s ``maxpool``) and each conv ->
  BatchNormAct2d pair (resnetv2's ``stem``) as one fused op, and every other child as it is. Its children and
  state_dict keys do not change.
- ``TimmResNet``: timm's ``timm.models.resnet.ResNet`` whose ``forward_features`` runs the stem's last conv
  (``conv1``, or ``conv1[-1]`` of a deep stem) -> ``bn1`` -> ``act1`` as one fused op, like torchvision's stem
  in fused_resnet.py, reading the children on every call. Everything else is timm's own:
  ``forward_head``, ``forward_intermediates`` (which calls conv1, bn1 and act1 itself: there the stem's last
  triple runs as modules, the blocks fused), ``set_grad_checkpointing``, ``reset_classifier``, features.

Both classes keep nothing of their own, so ``revert()`` gives back the classes and a bit-identical state_dict.
The model class is made on first use and named in this module (pickle finds it through ``__getattr__``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .routing import (
    Route,
    check_block_input,
    conv_reason,
    fused_conv_bn_act,
    modules_reason,
    relu_reason,
    resolve_route,
    run_forward_pre_hooks,
    traced_by_fx,
    warn_module_path_once,
)
from .timm_blocks import (
    BACKEND_ATTR,
    fusable_norm_type,
    is_batch_norm_act,
    is_timm_class,
    norm_act_reason,
    norm_act_relu,
)

_classes: dict[str, type] = {}


def _fused_step(children: list, i: int, x: Tensor, route: Route) -> Optional[tuple[Tensor, int]]:
    """(output, children used) when ``children[i:]`` starts with a fusable conv -> BN -> ReLU or
    conv -> BatchNormAct2d, else None."""
    conv = children[i]
    if type(conv) is not nn.Conv2d or i + 1 >= len(children):
        return None
    norm = children[i + 1]
    if is_batch_norm_act(norm):
        if modules_reason((("conv", conv),), ()) or norm_act_reason(norm, "norm"):
            return None
        used, relu = 2, norm_act_relu(norm)
    elif i + 2 < len(children) and type(children[i + 2]) is nn.ReLU:
        if modules_reason((("conv", conv),), (("norm", norm),), (("act", children[i + 2]),)):
            return None
        used, relu = 3, True
    else:
        return None
    check_block_input(x, conv)
    return fused_conv_bn_act(run_forward_pre_hooks(conv, x), conv, norm, None, relu, route), used


def run_children(seq: nn.Sequential, x: Tensor, end: int, route: Optional[Route]) -> Tensor:
    """``seq``'s first ``end`` children on ``x``, conv-norm-act runs fused (``route`` None: all as modules)."""
    children = list(seq._modules.values())[:end]
    i = 0
    while i < len(children):
        step = _fused_step(children, i, x, route) if route is not None else None
        if step is None:
            x, i = children[i](x), i + 1
        else:
            x, i = step[0], i + step[1]
    return x


def _sequence_route(owner: nn.Module, x: Tensor) -> Optional[Route]:
    if traced_by_fx(owner):
        return None
    route = resolve_route(x, owner.__dict__.get(BACKEND_ATTR))
    return None if route[1] == "reference" else route


class ConvNormActSequential(nn.Sequential):
    """An nn.Sequential whose conv -> BN -> ReLU and conv -> BatchNormAct2d runs are fused ops (children and
    state_dict keys unchanged); made by ``resfuse.convert()`` by re-classing timm's stem Sequentials."""

    def forward(self, x: Tensor) -> Tensor:
        return run_children(self, x, len(self), _sequence_route(self, x))


def fusable_sequence(seq: nn.Module) -> bool:
    """Whether ``seq`` is a plain nn.Sequential holding a conv -> BN -> ReLU or conv -> BatchNormAct2d run."""
    if type(seq) is not nn.Sequential:
        return False
    children = list(seq.children())
    for i, conv in enumerate(children[:-1]):
        if type(conv) is not nn.Conv2d:
            continue
        norm = children[i + 1]
        if is_batch_norm_act(norm) or (fusable_norm_type(norm) and i + 2 < len(children)
                                       and type(children[i + 2]) is nn.ReLU):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# The model


def timm_stem_forward(model: nn.Module, x: Tensor) -> Tensor:
    """act1(bn1(conv1(x))) of a timm ResNet: the last conv with bn1 and act1 fused, a deep stem's earlier
    triples fused by run_children; or the three modules called as timm calls them."""
    conv1, bn1, act1 = model.conv1, model.bn1, model.act1
    route = _sequence_route(model, x)
    if route is not None:
        if type(conv1) is nn.Conv2d:
            head, last = x, conv1
        elif isinstance(conv1, nn.Sequential) and len(conv1) and type(conv1[-1]) is nn.Conv2d \
                and not conv1._forward_hooks and not conv1._forward_pre_hooks:
            head, last = run_children(conv1, x, len(conv1) - 1, route), conv1[-1]
        else:
            return act1(bn1(conv1(x)))
        reason = modules_reason((("conv1", last),), (("bn1", bn1),), (("act1", act1),))
        if reason is None:
            check_block_input(head, last)
            return fused_conv_bn_act(run_forward_pre_hooks(last, head), last, bn1, None, True, route)
        warn_module_path_once(model, f"stem: {reason}")
        return act1(bn1(last(head)))
    return act1(bn1(conv1(x)))


def _timm_resnet() -> type:
    cls = _classes.get("TimmResNet")
    if cls is not None:
        return cls
    from timm.models.resnet import ResNet

    class TimmResNet(ResNet):
        """timm's ResNet whose stem runs fused (resfuse.nn.timm_resnet); everything else is its own."""

        def forward_features(self, x: Tensor) -> Tensor:
            x = self.maxpool(timm_stem_forward(self, x))
            layers = [self.layer1, self.layer2, self.layer3, self.layer4]
            if self.grad_checkpointing and not torch.jit.is_scripting():
                from timm.models._manipulate import checkpoint_seq

                return checkpoint_seq(layers, x, flatten=True)
            for layer in layers:
                x = layer(x)
            return x

    TimmResNet.__module__ = __name__
    TimmResNet.__qualname__ = TimmResNet.__name__
    _classes["TimmResNet"] = TimmResNet
    return TimmResNet


def stem_static_reason(model: nn.Module) -> Optional[str]:
    """Why a timm ResNet's stem (conv1 -> bn1 -> act1) can never run fused as its children are, or None."""
    conv1, bn1, act1 = model.conv1, model.bn1, model.act1
    last = conv1[-1] if isinstance(conv1, nn.Sequential) and len(conv1) else conv1
    reason = conv_reason(last)
    if reason is not None:
        return f"conv1: {reason}"
    if not fusable_norm_type(bn1):
        return f"bn1: norm layer {type(bn1).__name__}"
    reason = relu_reason(act1)
    return None if reason is None else f"act1: {reason}"


def fused_timm_model_class(cls: type) -> Optional[type]:
    """The fused class for a model of exactly timm's ResNet class, or None."""
    if is_timm_class(cls, "timm.models.resnet", "ResNet"):
        return _timm_resnet()
    return None


def is_fused_timm_model(module: nn.Module) -> bool:
    return type(module) is _classes.get("TimmResNet")


def stem_sequences(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Sequentials of a timm ResNet / ResNetV2 (or its features_only wrapper) that hold a stem's
    conv-norm-act runs: conv1 and maxpool (resnet), stem (resnetv2)."""
    cls = type(model)
    if (is_timm_class(cls, "timm.models.resnet", "ResNet") or is_fused_timm_model(model)
            or is_timm_class(cls, "timm.models._features", "FeatureListNet")
            or is_timm_class(cls, "timm.models._features", "FeatureDictNet")):
        names = ("conv1", "maxpool")
    elif is_timm_class(cls, "timm.models.resnetv2", "ResNetV2"):
        names = ("stem",)
    else:
        return []
    return [(name, model._modules[name]) for name in names if name in model._modules]


def stage_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm ResNet (children of layer1..4) or ResNetV2 (stages[i].blocks), whatever
    their class: convert() names every one it does not fuse."""
    cls = type(model)
    if is_timm_class(cls, "timm.models.resnet", "ResNet") or is_fused_timm_model(model):
        stages = [model._modules.get(f"layer{i}") for i in range(1, 5)]
    elif is_timm_class(cls, "timm.models.resnetv2", "ResNetV2"):
        stages = [getattr(stage, "blocks", None) for stage in model.stages]
    else:
        return []
    return [block for stage in stages if stage is not None for block in stage.children()]


def __getattr__(name: str):
    if name == "TimmResNet":
        return _timm_resnet()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
