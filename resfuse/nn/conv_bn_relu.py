"""ConvBNReLU: a Conv2d (no bias) + BatchNorm2d (+ ReLU) unit that runs as one fused op."""
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


class ConvBNReLU(nn.Module):
    """``relu(bn(conv(x)) [+ residual])``; children ``conv`` and ``bn`` keep nn's state_dict keys."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        relu: bool = True,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module, relu: bool = True, *,
                     backend: Optional[str] = None) -> "ConvBNReLU":
        """Wrap existing modules (their parameters are shared, not copied)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv = conv
        module.bn = bn
        module.relu = relu
        module.backend = backend
        return module

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting(self, revertible=False)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        conv, bn = self.conv, self.bn
        if not traced_by_fx(self):
            check_block_input(x, conv)
            route = resolve_route(x, self.backend)
            if route[1] != "reference":
                reason = modules_reason((("conv", conv),), (("bn", bn),))
                if reason is None:
                    return fused_conv_bn_act(run_forward_pre_hooks(conv, x), conv, bn, residual, self.relu,
                                             route)
                warn_module_path_once(self, reason)
        out = bn(conv(x))
        if residual is not None:
            out = out + residual
        return torch.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend!r}"
