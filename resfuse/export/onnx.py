"""ONNX translations of resfuse's ops for torch.onnx's exporter (``dynamo=True``): standard ONNX only.

    onnx_program = torch.onnx.export(model, (x,), dynamo=True,
                                     custom_translation_table=resfuse.export.onnx_translations())

The exporter meets resfuse's registered ops in the exported program and asks this table how to write each one
in ONNX; what comes out is ordinary Conv / BatchNormalization / Add / Relu nodes, so any ONNX runtime runs the
model with no custom op and nothing of resfuse installed. One function per op, in onnxscript (traced:
attributes arrive as the Python values the exported program holds); an op's flavours share it (flavours.py).

- ``conv_bn_act``: its inputs are the folded weight and bias (the fold is torch ops before it, on the model's
  initializers): Conv(x, W', b') [+ residual] [-> Relu].
- ``bn_eval_act``: BatchNormalization (inference mode: the running statistics) [+ residual] [-> Relu].
- ``_fold_bn``: the fold written out: (W * scale, bn_bias + (conv_bias - running_mean) * scale) with
  scale = bn_weight / sqrt(running_var + eps), computed in float (double for a double conv weight) and cast to
  the op's dtype. Its layout argument names how the kernel stores W' in memory; ONNX tensors have none.
- ``bn_scale_act`` (the end of an SE / ECA / drop_path block, resfuse/ops/block_tail.py): elementwise Sub,
  Mul, Add (BN from the given mean and invstd), Mul by the [N, C] factor unsqueezed to [N, C, 1, 1], Add of the
  residual, Relu. In eval the gate before it (torch's mean over H, W and the SE / ECA layers) is ordinary torch
  ops, which the exporter translates itself.
- ``bn_act`` and ``bn_squeeze`` (BatchNorm with batch statistics: training mode, or
  ``track_running_stats=False``) have none: they update the running statistics in place, so torch.export calls
  them through its ``auto_functionalized`` wrapper, and torch 2.14's ONNX exporter fails on that wrapper before
  it looks up any translation (a KeyError naming ``resfuse.bn_act`` or ``resfuse.bn_squeeze``). Serving runs
  in eval mode; eager PyTorch's own export of a model in training mode normalises with the running statistics
  instead, a different function from the model's.
"""
from __future__ import annotations

from typing import Callable

from onnxscript import ir
from onnxscript import opset18 as op

from .flavours import by_overload


def conv_bn_act(input, weight, bias, residual, stride, padding, dilation, groups, relu):
    """act(conv2d(input, weight) + bias [+ residual])."""
    conv_inputs = (input, weight) if bias is None else (input, weight, bias)
    out = op.Conv(*conv_inputs, strides=list(stride), pads=[*padding, *padding], dilations=list(dilation),
                  group=groups)
    if residual is not None:
        out = op.Add(out, residual)
    return op.Relu(out) if relu else out


def _ones_or(value, like):
    """``value``, or ones shaped and typed like ``like`` where the op was given None (BN without an affine)."""
    return op.Expand(op.CastLike(1.0, like), op.Shape(like)) if value is None else value


def _zeros_or(value, like):
    return op.Expand(op.CastLike(0.0, like), op.Shape(like)) if value is None else value


def bn_eval_act(input, weight, bias, residual, running_mean, running_var, eps, relu):
    """act(BatchNorm(input) with the running statistics [+ residual])."""
    scale = _ones_or(weight, running_mean if bias is None else bias)
    shift = _zeros_or(bias, scale)
    out = op.BatchNormalization(input, scale, shift, running_mean, running_var, epsilon=eps, training_mode=0)
    if residual is not None:
        out = op.Add(out, residual)
    return op.Relu(out) if relu else out


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype, layout):
    """(W', b'): the eval BatchNorm folded into the conv before it, in the op's dtype (``layout`` is storage)."""
    acc = ir.DataType.DOUBLE if conv_weight.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    mean, var = op.Cast(running_mean, to=acc), op.Cast(running_var, to=acc)
    scale = op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(eps, var))))
    if bn_weight is not None:
        scale = op.Mul(scale, op.Cast(bn_weight, to=acc))
    shift = op.Neg(mean) if conv_bias is None else op.Sub(op.Cast(conv_bias, to=acc), mean)
    shift = op.Mul(shift, scale)
    if bn_bias is not None:
        shift = op.Add(shift, op.Cast(bn_bias, to=acc))
    per_out_channel = op.Reshape(scale, op.Constant(value_ints=[-1, 1, 1, 1]))
    weight = op.Mul(op.Cast(conv_weight, to=acc), per_out_channel)
    return op.Cast(weight, to=dtype), op.Cast(shift, to=dtype)


def _per_channel(v, acc):
    """A [C] vector as [C, 1, 1] in ``acc``, which broadcasts over an [N, C, H, W] activation."""
    return op.Reshape(op.Cast(v, to=acc), op.Constant(value_ints=[-1, 1, 1]))


def bn_scale_act(input, weight, bias, mean, invstd, scale, residual, relu):
    """act(((x - mean) * invstd * weight + bias) * scale[n, c] + residual), each None the identity: the
    op's terms in its order, in float (double for double input) and cast to the input's dtype, as the op
    computes. ``invstd`` is 1 / sqrt(var + eps), not a variance, so BatchNormalization does not take it."""
    acc = ir.DataType.DOUBLE if input.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    out = op.Cast(input, to=acc)
    if mean is not None:
        out = op.Sub(out, _per_channel(mean, acc))
    if invstd is not None:
        out = op.Mul(out, _per_channel(invstd, acc))
    if weight is not None:
        out = op.Mul(out, _per_channel(weight, acc))
    if bias is not None:
        out = op.Add(out, _per_channel(bias, acc))
    if scale is not None:  # [N, C] -> [N, C, 1, 1]
        out = op.Mul(out, op.Unsqueeze(op.Cast(scale, to=acc), op.Constant(value_ints=[2, 3])))
    if residual is not None:
        out = op.Add(out, op.Cast(residual, to=acc))
    if relu:
        out = op.Relu(out)
    return op.Cast(out, to=input.dtype)


# resfuse's op -> its translation, which its flavours share (flavours.py).
TRANSLATIONS: dict[str, Callable] = {
    "conv_bn_act": conv_bn_act,
    "bn_eval_act": bn_eval_act,
    "_fold_bn": fold_bn,
    "bn_scale_act": bn_scale_act,
}


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: each resfuse op this build
    registers, mapped to its translation."""
    return by_overload(TRANSLATIONS)
