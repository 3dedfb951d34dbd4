"""The eager truth: one ``*_ref`` function per fused op, in plain PyTorch.

Everything resfuse computes is checked against this file, and nothing else lives here: it depends on nothing it
checks, and no fast path routes through it. Each function states the math of its op, computed in fp32 (fp64 for
fp64 input) and cast back to the input's dtype and suggested layout, and is differentiable by autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


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
    normalises, the unbiased one goes into running_var. An empty batch has no statistics: as nn.BatchNorm2d, it
    leaves the running statistics untouched (the returned mean and invstd are zeros).
    """
    acc = _acc_dtype(x)
    xf = x.to(acc)
    n = x.numel() // max(x.shape[1], 1)
    if n == 0:
        mean = var = invstd = xf.new_zeros(x.shape[1])  # the output is empty; its graph still reaches w, b
    else:
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
    if running_mean is not None and running_var is not None and n > 0:
        with torch.no_grad():
            unbiased = var.detach() * (n / max(n - 1, 1))
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    out = y.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))
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
    acc = _acc_dtype(x)
    yf = y.to(acc)
    if bias is not None:
        yf = yf + _channel(bias.to(acc))
    if residual is not None:
        yf = yf + residual.to(acc)
    if relu:
        yf = torch.relu(yf)
    return yf.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))


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


def bn_eval_act_ref(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    relu: bool,
) -> Tensor:
    """Eval-mode BatchNorm (normalised by the running statistics, which are left as they are), + residual,
    + ReLU: act((x - running_mean) * rsqrt(running_var + eps) * weight + bias [+ residual])."""
    invstd = torch.rsqrt(running_var.to(_acc_dtype(x)) + eps)
    return bn_act_apply_ref(x, running_mean, invstd, weight, bias, residual, relu)


# bn_act's passes one at a time, as synchronised BatchNorm runs them (resfuse/ops/sync_bn_act.py): the local
# statistics, the apply pass with given statistics, and the backward's local sums and elementwise pass.


def bn_stats_ref(x: Tensor) -> Tensor:
    """Local statistics packed for one all-gather: [mean | M2 | count] (2C + 1 values, float64 for every input),
    M2 the sum of squared deviations from the local mean. An empty batch gives zeros, count 0 included."""
    c = x.shape[1]
    n = x.numel() // max(c, 1)
    if n == 0:
        return x.new_zeros(2 * c + 1, dtype=torch.float64)
    xf = x.detach().to(torch.float64)
    mean = xf.mean(dim=(0, 2, 3))
    m2 = (xf - _channel(mean)).square().sum(dim=(0, 2, 3))
    return torch.cat([mean, m2, mean.new_full((1,), float(n))])


def bn_act_apply_ref(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], relu: bool) -> Tensor:
    """act((x - mean) * invstd * weight + bias [+ residual]) with the statistics given."""
    acc = _acc_dtype(x)
    y = (x.to(acc) - _channel(mean.to(acc))) * _channel(invstd.to(acc))
    if weight is not None:
        y = y * _channel(weight.to(acc))
    if bias is not None:
        y = y + _channel(bias.to(acc))
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))


def _masked_grad(grad_out: Tensor, out: Tensor, relu: bool, acc: torch.dtype) -> Tensor:
    g = grad_out.to(acc)
    return torch.where(out <= 0, 0.0, g) if relu else g  # threshold_backward's mask: NaN outputs pass g


def bn_act_backward_reduce_ref(grad_out: Tensor, x: Tensor, out: Tensor, mean: Tensor, invstd: Tensor,
                               relu: bool) -> Tensor:
    """Local [sum g | sum g * xhat] (2C values), g the ReLU-masked grad_out, xhat = (x - mean) * invstd."""
    acc = _acc_dtype(x)
    g = _masked_grad(grad_out, out, relu, acc)
    xhat = (x.to(acc) - _channel(mean.to(acc))) * _channel(invstd.to(acc))
    return torch.cat([g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))])


def bn_act_backward_elemt_ref(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], out: Tensor, mean: Tensor,
                              invstd: Tensor, grad_means: Tensor, relu: bool,
                              output_mask: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_residual) given grad_means = [sum g | sum g * xhat] / count (global sums and count):
    grad_input = (g - grad_means[:C] - xhat * grad_means[C:]) * invstd * weight, grad_residual = g. Entries
    output_mask does not ask for are empty tensors."""
    acc = _acc_dtype(x)
    c = x.shape[1]
    fmt = suggest_memory_format(x)
    g = _masked_grad(grad_out, out, relu, acc)
    empty = x.new_empty((0,))
    grad_input = grad_residual = empty
    if output_mask[0]:
        inv = invstd.to(acc)
        xhat = (x.to(acc) - _channel(mean.to(acc))) * _channel(inv)
        a = inv if weight is None else inv * weight.to(acc)
        gm = grad_means.to(acc)
        grad_input = ((g - _channel(gm[:c]) - xhat * _channel(gm[c:])) * _channel(a)).to(x.dtype)
        grad_input = grad_input.contiguous(memory_format=fmt)
    if output_mask[1]:
        grad_residual = g.to(x.dtype).contiguous(memory_format=fmt)
    return grad_input, grad_residual if output_mask[1] else empty.clone()


def bn_squeeze_ref(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's batch statistics and the per-sample squeeze of its normalised output.

    Returns (squeeze, mean, invstd): ``squeeze[n, c]`` is the mean over (H, W) of ``(x - mean) * invstd``, the
    input of an SE/ECA gate before BN's affine; all three are differentiable functions of x, in fp32 (fp64 for
    fp64 input). Running statistics are updated as in bn_act_ref; an empty input returns zeros and leaves them.
    """
    acc = _acc_dtype(x)
    xf = x.to(acc)
    n = x.numel() // max(x.shape[1], 1)
    if n == 0:
        # Zeros, as the kernels return, still on x's graph: an empty batch's gradient is an empty tensor.
        return xf.sum(dim=(2, 3)), xf.sum(dim=(0, 2, 3)), xf.sum(dim=(0, 2, 3))
    mean = xf.mean(dim=(0, 2, 3))
    var = xf.var(dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + eps)
    squeeze = (xf.mean(dim=(2, 3)) - mean) * invstd
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var.detach() * (n / max(n - 1, 1))
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return squeeze, mean, invstd


def bn_scale_act_ref(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Optional[Tensor],
    invstd: Optional[Tensor],
    scale: Optional[Tensor],
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    """``act(((x - mean) * invstd * weight + bias) * scale[n, c] + residual)``: BatchNorm with given statistics
    (batch or running ones; none when the conv already carries the folded BN), a per-sample per-channel factor
    (an SE/ECA gate, a drop_path mask, or both multiplied), the shortcut and ReLU. Every None is the identity."""
    acc = _acc_dtype(x)
    y = x.to(acc)
    if mean is not None:
        y = y - _channel(mean.to(acc))
    if invstd is not None:
        y = y * _channel(invstd.to(acc))
    if weight is not None:
        y = y * _channel(weight.to(acc))
    if bias is not None:
        y = y + _channel(bias.to(acc))
    if scale is not None:
        y = y * scale.to(acc)[:, :, None, None]
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))
