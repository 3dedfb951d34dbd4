"""A converted torchvision ResNet: its stem (conv1 -> bn1 -> relu) runs as one fused op.

``convert()`` re-classes the model in place to ``TorchvisionResNet``, a subclass of torchvision's ResNet whose
forward differs only in the stem: it reads ``self.conv1``, ``self.bn1`` and ``self.relu`` on every call, like
the blocks read theirs, and runs them fused when routing.py accepts them, as modules otherwise. The three
modules keep their classes, parameters and hooks: nothing links one module to another, so swapping conv1 for a
grayscale one, ``nn.SyncBatchNorm.convert_sync_batchnorm``, ``nn.DataParallel``'s replicas, pickling and
``revert()`` all see a plain torchvision model plus one overridden method.

The class is made on first use (torchvision stays an optional dependency) and named in this module, so pickle
finds it again (the module ``__getattr__`` below).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .routing import (
    check_block_input,
    fused_conv_bn_act,
    modules_reason,
    resolve_route,
    run_forward_pre_hooks,
    traced_by_fx,
    warn_module_path_once,
)
from .scripting import refuse_scripting

BACKEND_ATTR = "_resfuse_backend"
_classes: dict[str, type] = {}


def stem_forward(model: nn.Module, x: Tensor) -> Tensor:
    """relu(bn1(conv1(x))) of ``model``: fused, or its three modules called as eager PyTorch calls them."""
    conv, bn, relu = model.conv1, model.bn1, model.relu
    if not traced_by_fx(model):
        check_block_input(x, conv)
        route = resolve_route(x, model.__dict__.get(BACKEND_ATTR))
        if route[1] != "reference":
            reason = modules_reason((("conv1", conv),), (("bn1", bn),), (("relu", relu),))
            if reason is None:
                return fused_conv_bn_act(run_forward_pre_hooks(conv, x), conv, bn, None, True, route)
            warn_module_path_once(model, f"stem: {reason}")
    return relu(bn(conv(x)))


def _torchvision_resnet() -> type:
    cls = _classes.get("TorchvisionResNet")
    if cls is not None:
        return cls
    from torchvision.models.resnet import ResNet

    class TorchvisionResNet(ResNet):
        """torchvision's ResNet whose stem runs fused (resfuse.nn.fused_resnet); everything else is its own."""

        def __prepare_scriptable__(self) -> nn.Module:
            refuse_scripting(self)

        def _forward_impl(self, x: Tensor) -> Tensor:
            x = self.maxpool(stem_forward(self, x))
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    TorchvisionResNet.__module__ = __name__
    TorchvisionResNet.__qualname__ = TorchvisionResNet.__name__
    _classes["TorchvisionResNet"] = TorchvisionResNet
    return TorchvisionResNet


def fused_model_class(cls: type) -> Optional[type]:
    """The fused class for a model of class ``cls`` (exactly torchvision's ResNet), or None."""
    if cls.__name__ == "ResNet" and cls.__module__ == "torchvision.models.resnet":
        return _torchvision_resnet()
    return None


def is_fused_model(module: nn.Module) -> bool:
    return type(module) in _classes.values()


def __getattr__(name: str):
    if name == "TorchvisionResNet":
        return _torchvision_resnet()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
