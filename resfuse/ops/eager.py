"""Eager PyTorch's own ops for each fused op: the candidate ``auto`` measures against the C++ kernels on CPU.

These are the calls a model that resfuse did not convert makes for the same step (nn.BatchNorm2d's
``F.batch_norm``, the block's ``+=`` of the shortcut, nn.ReLU; nn.Conv2d's ``F.conv2d``), so where ``auto``
runs them the numbers are eager's bit for bit: outputs, gradients (autograd records them, double backward
included), running statistics. They are no ``backend=`` a caller names: only ``auto`` picks them
(autoselect.py), when they measured faster.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _tail(out: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    # In place on the norm's or conv's own output, as torchvision's blocks (`out += identity`, ReLU(inplace)):
    # neither op's backward reads that output, so autograd allows it and no tensor is allocated.
    if residual is not None:
        out += residual
    return torch.relu_(out) if relu else out


def bn_act_eager(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                 relu: bool) -> Tensor:
    """nn.BatchNorm2d in training (``momentum`` already the factor it would pass), + residual, ReLU."""
    return _tail(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps), residual, relu)


def bn_act_eager_forward_backward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                  residual: Optional[Tensor], running_mean: Optional[Tensor],
                                  running_var: Optional[Tensor], momentum: float, eps: float, relu: bool,
                                  grad_out: Tensor) -> tuple[Tensor, ...]:
    """The kernels ``bn_act_eager`` and its backward run on CPU, called without autograd, for timing against
    the fused op's forward and backward ops called the same way: native_batch_norm (where F.batch_norm ends),
    the add, the ReLU, threshold_backward and native_batch_norm_backward."""
    out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                                   True, momentum, eps)
    out = _tail(out, residual, relu)
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    return torch.ops.aten.native_batch_norm_backward(g, x, weight, running_mean, running_var, save_mean,
                                                     save_invstd, True, eps,
                                                     [True, weight is not None, bias is not None])


def bn_eval_act_eager(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                      running_mean: Tensor, running_var: Tensor, eps: float, relu: bool) -> Tensor:
    """nn.BatchNorm2d in eval (its running statistics, left as they are), + residual, ReLU."""
    return _tail(F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps), residual, relu)


def conv_bn_act_eager(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                      stride: list[int], padding: list[int], dilation: list[int], groups: int,
                      relu: bool) -> Tensor:
    """nn.Conv2d with the given weight and bias (a BN-folded pair, or a conv's own), + residual, ReLU."""
    return _tail(F.conv2d(x, weight, bias, stride, padding, dilation, groups), residual, relu)
