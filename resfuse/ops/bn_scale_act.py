"""``bn_scale_act``: BatchNorm with given statistics, a per-(sample, channel) factor, the shortcut and ReLU.

    z = (x - mean) * invstd * weight + bias                 (any of them None: the identity)
    out = act(z * scale[n, c] + residual)                     act = ReLU or identity, residual optional

One elementwise pass: read x (and the residual), write out. ``scale`` [N, C] is an SE / ECA gate's output, a
drop_path mask (timm's per-sample keep / keep_prob, broadcast over C), or their product; ``mean``/``invstd``
are the batch statistics from ``bn_squeeze`` in training, the running ones in eval, or None when the conv's
weight already carries the folded BN. It is the last pass of the tail in resfuse/ops/block_tail.py.

Backward, one pass over the activation (read grad_out, out for the ReLU mask, and x; write grad_x and
grad_residual), with g = grad_out masked by the ReLU and, per (n, c), S1 = sum_hw g, S2 = sum_hw g*(x - mean):

    grad_x = g * scale * weight * invstd          grad_residual = g
    grad_scale[n, c] = weight * invstd * S2 + bias * S1         (= sum_hw g * z)
    grad_weight = sum_n scale * invstd * S2        grad_bias = sum_n scale * S1
    grad_mean = -sum_n scale * weight * invstd * S1              grad_invstd = sum_n scale * weight * S2

grad_x is only the direct term: in training, the gradients of mean and invstd reach x through bn_squeeze's
backward, and autograd adds the two.

Flavours: ``resfuse::bn_scale_act`` (C++: csrc/cpu, csrc/cuda) and ``resfuse::bn_scale_act_triton``
(triton_kernels/bn_scale_act.py); backward ops ``resfuse::_bn_scale_act_backward`` and
``resfuse::_bn_scale_act_backward_triton``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _loader
from ..layout import memory_format_of, stats_dtype
from ..reference import bn_scale_act_ref
from . import _autograd
from ._autograd import call_backward
from ._checks import check_activation, check_channel_vector, check_like
from .backend import requested_backend, resolve_backend

_SCHEMA = ("(Tensor input, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, Tensor? scale, "
           "Tensor? residual, bool relu) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, "
                    "Tensor? scale, Tensor out, bool relu, bool[] output_mask) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
# The differentiable arguments, in the order of the backward's outputs and output_mask.
GRAD_NAMES = ("input", "weight", "bias", "mean", "invstd", "scale", "residual")


def bn_scale_act_triton(input, weight, bias, mean, invstd, scale, residual, relu):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_scale_act_fwd(input, weight, bias, mean, invstd, scale, residual, relu)


def _bn_scale_act_backward_triton(grad_out, input, weight, bias, mean, invstd, scale, out, relu, output_mask):
    kernels = _loader.require_triton_kernels()
    return kernels.bn_scale_act_bwd(grad_out, input, weight, bias, mean, invstd, scale, out, relu,
                                    [bool(m) for m in output_mask])


def _empty_grads(input, weight, bias, mean, invstd, scale, output_mask):
    """What each output of the backward is when output_mask does not ask for it: an empty tensor of its dtype."""
    like = (input, weight, bias, mean, invstd, scale, input)
    return [input.new_empty((0,), dtype=t.dtype if t is not None else torch.float32) for t in like]


def bn_scale_act_backward_differentiable(grad_out, input, weight, bias, mean, invstd, scale, out, relu,
                                         output_mask):
    """The backward in torch ops, for create_graph=True: autograd records it, so second-order gradients flow
    through every argument. The ReLU mask (from ``out``) is piecewise constant."""
    acc = stats_dtype(input)
    fmt = memory_format_of(input)
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out.detach() <= 0, 0.0, g)  # threshold_backward's mask: NaN outputs pass g

    def channel(v, identity):
        return identity if v is None else v.to(acc).view(1, -1, 1, 1)

    xc = input.to(acc) - channel(mean, 0.0)
    i, w, b = channel(invstd, 1.0), channel(weight, 1.0), channel(bias, 0.0)
    f = 1.0 if scale is None else scale.to(acc)[:, :, None, None]
    gf = g * f
    dims = (0, 2, 3)
    results = _empty_grads(input, weight, bias, mean, invstd, scale, output_mask)
    if output_mask[0]:
        results[0] = (gf * w * i).to(input.dtype).contiguous(memory_format=fmt)
    if output_mask[1]:
        results[1] = (gf * xc * i).sum(dims).to(weight.dtype)
    if output_mask[2]:
        results[2] = gf.sum(dims).to(bias.dtype)
    if output_mask[3]:
        results[3] = -(gf * w * i).sum(dims).to(mean.dtype)
    if output_mask[4]:
        results[4] = (gf * xc * w).sum(dims).to(invstd.dtype)
    if output_mask[5]:
        results[5] = (g * (xc * i * w + b)).sum((2, 3)).to(scale.dtype)
    if output_mask[6]:
        # a fresh tensor: an op's output must not alias its grad_out
        results[6] = g.to(input.dtype).clone(memory_format=fmt)
    return tuple(results)


def _register(name: str, backward_name: str) -> None:
    """Fake kernels + the Python autograd kernel of one flavour; the latter only where
    csrc/bn_scale_act_autograd.cpp did not register the same formula (a build without the C++ extension)."""
    backward_op = getattr(torch.ops.resfuse, backward_name).default

    @torch.library.register_fake(f"resfuse::{name}", lib=_autograd._lib)
    def _fake(input, weight, bias, mean, invstd, scale, residual, relu):
        return _autograd.empty_activation(input)

    @torch.library.register_fake(f"resfuse::{backward_name}", lib=_autograd._lib)
    def _fake_backward(grad_out, input, weight, bias, mean, invstd, scale, out, relu, output_mask):
        results = _empty_grads(input, weight, bias, mean, invstd, scale, output_mask)
        for k, t in enumerate((input, weight, bias, mean, invstd, scale, input)):
            if output_mask[k]:
                results[k] = _autograd.empty_activation(input) if k in (0, 6) else t.new_empty(t.shape)
        return tuple(results)

    def setup_context(ctx, inputs, output):
        input, weight, bias, mean, invstd, scale, residual, relu = inputs
        ctx.save_for_backward(input, weight, bias, mean, invstd, scale, output)
        ctx.relu = relu
        ctx.given = [t is not None for t in inputs[:7]]

    def backward(ctx, grad_out):
        input, weight, bias, mean, invstd, scale, out = ctx.saved_tensors
        mask = [given and needs for given, needs in zip(ctx.given, ctx.needs_input_grad[:7])]
        if grad_out is None or not any(mask):
            return (None,) * 8
        grads = call_backward(backward_op, grad_out.contiguous(memory_format=memory_format_of(out)), input,
                              weight, bias, mean, invstd, scale, out, ctx.relu, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)

    _autograd._register_autograd_kernel(name, setup_context, backward)


_autograd.define_triton_op("bn_scale_act_triton", _SCHEMA, bn_scale_act_triton)
_autograd.define_triton_op("_bn_scale_act_backward_triton", _BACKWARD_SCHEMA, _bn_scale_act_backward_triton)
_register("bn_scale_act_triton", "_bn_scale_act_backward_triton")
_autograd.register_backward_autograd("_bn_scale_act_backward_triton", bn_scale_act_backward_differentiable)
if _loader.extension is not None:
    _register("bn_scale_act", "_bn_scale_act_backward")
    _autograd.register_backward_autograd("_bn_scale_act_backward", bn_scale_act_backward_differentiable)


def bn_scale_act(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    mean: Optional[Tensor] = None,
    invstd: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(((x - mean) * invstd * weight + bias) * scale[n, c] + residual)`` in one pass; see the module doc."""
    check_bn_scale_act_args(x, weight, bias, mean, invstd, scale, residual)
    return run_bn_scale_act(x, weight, bias, mean, invstd, scale, residual, relu,
                            resolve_backend(requested_backend(backend), x.device))


def check_bn_scale_act_args(x, weight, bias, mean, invstd, scale, residual) -> None:
    check_activation(x)
    check_like(x, residual, "residual")
    for name, v in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
        check_channel_vector(x, v, name)
    if scale is not None:
        if scale.device != x.device:
            raise RuntimeError(f"scale is on {scale.device} but the input is on {x.device}")
        if tuple(scale.shape) != tuple(x.shape[:2]):
            raise ValueError(f"scale must have shape [N, C] = {list(x.shape[:2])} (one factor per sample and "
                             f"channel), got {tuple(scale.shape)}")
        if scale.dtype not in (x.dtype, stats_dtype(x)):
            raise RuntimeError(f"scale has dtype {scale.dtype} but the input has dtype {x.dtype}")


def run_bn_scale_act(x, weight, bias, mean, invstd, scale, residual, relu: bool, impl: str) -> Tensor:
    """``bn_scale_act`` on checked arguments with the backend resolved (``cuda``, ``triton`` or ``reference``)."""
    if impl == "reference":
        return bn_scale_act_ref(x, weight, bias, mean, invstd, scale, residual, relu)
    op = torch.ops.resfuse.bn_scale_act if impl == "cuda" else torch.ops.resfuse.bn_scale_act_triton
    return op(x, weight, bias, mean, invstd, scale, residual, bool(relu))
