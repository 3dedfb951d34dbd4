"""``bn_squeeze``: BatchNorm's batch statistics and the per-sample squeeze of its normalised input, in one pass.

With P = H*W positions and M = N*P values per channel:

    mean[c] = sum(x[:, c]) / M          var[c] = sum((x[:, c] - mean)^2) / M      invstd = 1 / sqrt(var + eps)
    squeeze[n, c] = (mean_hw(x)[n, c] - mean[c]) * invstd[c]        = mean_hw((x - mean) * invstd)[n, c]
    running_mean / running_var updated in place as in bn_act (unbiased variance)

It is the first half of the SE / ECA / drop_path tail of a training block (resfuse/ops/block_tail.py); the
second is ``bn_scale_act``. ``squeeze * weight + bias`` is what an SE or ECA gate reads, eager's
``bn(y).mean((2, 3))``, without bn(y) being written. All three outputs are differentiable: the gate's gradient
reaches x through the squeeze, and bn_scale_act's through mean and invstd. The backward is one elementwise pass,
given Q1 = sum_n grad_squeeze and Q2 = sum_n grad_squeeze * squeeze per channel:

    grad_x = grad_squeeze[n, c] * invstd / P + (grad_mean - invstd * Q1) / M
             - (x - mean) * invstd^2 * (invstd * grad_invstd + Q2) / M

Flavours: ``resfuse::bn_squeeze`` (C++: csrc/cpu, csrc/cuda) and ``resfuse::bn_squeeze_triton``
(triton_kernels/bn_squeeze.py), backward ops ``resfuse::_bn_squeeze_backward`` and
``resfuse::_bn_squeeze_backward_triton``. The statistics and the squeeze are fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _loader
from ..layout import memory_format_of, stats_dtype
from ..reference import bn_squeeze_ref
from . import _autograd
from ._autograd import call_backward, grad_needed
from ._checks import check_activation, check_channel_vector
from .backend import requested_backend, resolve_backend

_SCHEMA = ("(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) "
           "-> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor? grad_squeeze, Tensor? grad_mean, Tensor? grad_invstd, Tensor input, Tensor mean, "
                    "Tensor invstd, Tensor squeeze) -> Tensor")


def bn_squeeze_triton(input, running_mean, running_var, momentum, eps):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_squeeze_fwd(input, running_mean, running_var, momentum, eps)


def _bn_squeeze_backward_triton(grad_squeeze, grad_mean, grad_invstd, input, mean, invstd, squeeze):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_squeeze_bwd(grad_squeeze, grad_mean, grad_invstd, input, mean, invstd, squeeze)


def bn_squeeze_backward_differentiable(grad_squeeze, grad_mean, grad_invstd, input, mean, invstd, squeeze):
    """The backward in torch ops, for create_graph=True. The statistics and the squeeze are recomputed from
    ``input`` so that second-order gradients flow through them; the saved invstd gives the value of
    rsqrt(var + eps), written as rsqrt(var - var.detach() + invstd**-2) (as bn_act's)."""
    acc = stats_dtype(input)
    fmt = memory_format_of(input)
    x = input.to(acc)
    n, c = x.shape[:2]
    p = x.shape[2] * x.shape[3]
    m = n * p
    if m == 0:
        return torch.zeros_like(input, memory_format=fmt)
    dims = (0, 2, 3)
    mu = x.mean(dims)
    xc = x - mu.view(1, -1, 1, 1)
    var = xc.square().mean(dims)
    inv = torch.rsqrt(var - var.detach() + invstd.detach().to(acc).reciprocal().square())
    s0 = (x.mean((2, 3)) - mu) * inv
    q = grad_squeeze.to(acc) if grad_squeeze is not None else x.new_zeros((n, c))
    gm = grad_mean.to(acc) if grad_mean is not None else x.new_zeros(c)
    gi = grad_invstd.to(acc) if grad_invstd is not None else x.new_zeros(c)
    a = q * inv / p + (gm - inv * q.sum(0)) / m
    b = inv * inv * (inv * gi + (q * s0).sum(0)) / m
    grad = a[:, :, None, None] - xc * b.view(1, -1, 1, 1)
    return grad.to(input.dtype).contiguous(memory_format=fmt)


def _register(name: str, backward_name: str) -> None:
    """Fake kernels + the Python autograd kernel of one flavour; the latter only where
    csrc/bn_squeeze_autograd.cpp did not register the same formula (a build without the C++ extension)."""
    backward_op = getattr(torch.ops.resfuse, backward_name).default

    @torch.library.register_fake(f"resfuse::{name}", lib=_autograd._lib)
    def _fake(input, running_mean, running_var, momentum, eps):
        acc = stats_dtype(input)
        stats = input.new_empty((input.shape[1],), dtype=acc)
        return input.new_empty(tuple(input.shape[:2]), dtype=acc), stats, stats.clone()

    @torch.library.register_fake(f"resfuse::{backward_name}", lib=_autograd._lib)
    def _fake_backward(grad_squeeze, grad_mean, grad_invstd, input, mean, invstd, squeeze):
        return _autograd.empty_activation(input)

    if torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse::{name}", "Autograd"):
        return
    op = getattr(torch.ops.resfuse, name).default

    class _Function(torch.autograd.Function):
        # Unlike the other ops' kernels (_autograd._register_autograd_kernel), every output is differentiable.
        @staticmethod
        def forward(ctx, input, running_mean, running_var, momentum, eps):
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
            with torch._C._AutoDispatchBelowAutograd():
                squeeze, mean, invstd = op(input, running_mean, running_var, momentum, eps)
            ctx.save_for_backward(input, mean, invstd, squeeze)
            return squeeze, mean, invstd

        @staticmethod
        def backward(ctx, grad_squeeze, grad_mean, grad_invstd):
            if not ctx.needs_input_grad[0] or all(g is None for g in (grad_squeeze, grad_mean, grad_invstd)):
                return (None,) * 5
            grad = call_backward(backward_op, grad_squeeze, grad_mean, grad_invstd, *ctx.saved_tensors)
            return grad, None, None, None, None

    def autograd_kernel(input, running_mean, running_var, momentum, eps):
        if grad_needed(input):
            outputs = _Function.apply(input, running_mean, running_var, momentum, eps)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                outputs = op(input, running_mean, running_var, momentum, eps)
        for stat in (running_mean, running_var):
            if stat is not None:
                torch.autograd.graph.increment_version(stat)
        return outputs

    _autograd._lib.impl(name, autograd_kernel, "Autograd")


_autograd.define_triton_op("bn_squeeze_triton", _SCHEMA, bn_squeeze_triton)
_autograd.define_triton_op("_bn_squeeze_backward_triton", _BACKWARD_SCHEMA, _bn_squeeze_backward_triton)
_register("bn_squeeze_triton", "_bn_squeeze_backward_triton")
_autograd.register_backward_autograd("_bn_squeeze_backward_triton", bn_squeeze_backward_differentiable)
if _loader.extension is not None:
    _register("bn_squeeze", "_bn_squeeze_backward")
    _autograd.register_backward_autograd("_bn_squeeze_backward", bn_squeeze_backward_differentiable)


def bn_squeeze(
    x: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(squeeze [N, C], mean [C], invstd [C]) of training-mode BatchNorm over (N, H, W); see the module doc.

    ``running_mean``/``running_var``, when given, are updated in place like nn.BatchNorm2d in training mode
    (``momentum`` is the exponential-average factor; pass ``1 / num_batches_tracked`` for momentum=None).
    """
    check_bn_squeeze_args(x, running_mean, running_var)
    return run_bn_squeeze(x, running_mean, running_var, momentum, eps, resolve_backend(requested_backend(backend),
                                                                                      x.device))


def check_bn_squeeze_args(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    check_activation(x)
    check_channel_vector(x, running_mean, "running_mean")
    check_channel_vector(x, running_var, "running_var")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    n = x.numel() // max(x.shape[1], 1)
    if n <= 1 and x.numel() > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def run_bn_squeeze(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                   eps: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """``bn_squeeze`` on checked arguments with the backend resolved (``cuda``, ``triton`` or ``reference``)."""
    if impl == "reference":
        return bn_squeeze_ref(x, running_mean, running_var, momentum, eps)
    op = torch.ops.resfuse.bn_squeeze if impl == "cuda" else torch.ops.resfuse.bn_squeeze_triton
    return op(x, running_mean, running_var, float(momentum), float(eps))
