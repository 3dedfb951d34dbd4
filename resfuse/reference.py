"""The eager truth: reference blocks and ``*_ref`` functions in plain PyTorch.

Everything resfuse computes is checked against this file. The blocks mirror torchvision's ResNet blocks (same
constructor, attribute names and state_dict keys) without importing torchvision, which is only an optional
extra. The ``*_ref`` functions state the math of each fused op, computed in fp32 (fp64 for fp64 input) and cast
back, and are differentiable by autograd.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format


def stats_dtype(x: Tensor) -> torch.dtype:
    """Accumulation / statistics dtype: fp32, or fp64 for fp64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout resfuse writes an op's output in: the input's suggested one (as ATen's
    ``Tensor.suggest_memory_format``), so channels_last stays channels_last and anything else is contiguous."""
    # Dense tensors in exactly one of the two layouts are decided by two C++ checks; torch's general rule costs
    # ~7 us of Python per call, which an eval block pays several times. Fake and functional tensors (tracing),
    # and tensors dense in both or neither layout, take the general rule.
    if x.dim() == 4 and (type(x) is Tensor or type(x) is nn.Parameter):
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if x.is_contiguous() != channels_last:
            return torch.channels_last if channels_last else torch.contiguous_format
    return suggest_memory_format(x)


def bn_act_ref(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with batch statistics, + residual, + ReLU. Returns (out, batch mean, batch invstd).

    Running statistics, when given, are updated in place as nn.BatchNorm2d does: the biased variance
    normalises, the unbiased one goes into running_var.
    """
    acc = stats_dtype(x)
    xf = x.to(acc)
    n = x.numel() // max(x.shape[1], 1)
    mean = xf.mean(dim=(0, 2, 3))
    var = xf.var(dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + eps)
    y = (xf - _channel(mean)) * _channel(invstd)
    if weight is not None:
        y = y * _channel(weight.to(acc))
    if bias is not None:
        y = y + _channel(bias.to(acc))
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var.detach() * (n / max(n - 1, 1))
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    out = y.to(x.dtype).contiguous(memory_format=memory_format_of(x))
    return out, mean.detach(), invstd.detach()


def conv_bn_act_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> Tensor:
    """act(conv2d(x, weight) + bias + residual): the eval-mode block with BN already folded in."""
    y = F.conv2d(x, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    acc = stats_dtype(x)
    yf = y.to(acc)
    if bias is not None:
        yf = yf + _channel(bias.to(acc))
    if residual is not None:
        yf = yf + residual.to(acc)
    if relu:
        yf = torch.relu(yf)
    return yf.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def fold_bn_ref(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """BN(conv(x)) in eval mode is conv(x, W') + b': returns (W', b') in the conv weight's dtype.

    The fold is computed in fp32 (fp64 for fp64 weights) so half-precision models lose no more than one
    rounding of W' and b'.
    """
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(acc) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    folded_weight = (conv_weight.to(acc) * scale.view(-1, 1, 1, 1)).to(conv_weight.dtype)
    return folded_weight, shift.to(conv_weight.dtype)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, padded so that stride 1 keeps the spatial size."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
        groups=groups, bias=False, dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: conv3x3-BN-ReLU, conv3x3-BN, + identity (or downsample), ReLU."""

    expansion: int = 1

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
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet-50+ block (v1.5: the stride sits on the 3x3 conv): 1x1, 3x3 (grouped, dilated), 1x1 expand."""

    expansion: int = 4

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
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)
