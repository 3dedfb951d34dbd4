"""ONNX translations of resfuse's ops for torch.onnx's exporter (``dynamo=True``): standard ONNX only.

    onnx_program = torch.onnx.export(model, (x,), dynamo=True,
                                     custom_translation_table=resfuse.export.onnx_translations())

The exporter meets resfuse's registered ops in the exported program and asks this table how to write each one
in ONNX; what comes out is ordinary Conv / Add / Relu nodes, so any ONNX runtime runs the model with no custom
op and nothing of resfuse installed. One function per op, in onnxscript (traced: attributes arrive as the
Python values the exported program holds). Every flavour of an op (C++, Triton, the named CUDA kernels)
computes the same function and shares its translation.

- ``conv_bn_act``: its inputs are the folded weight and bias (the fold is torch ops before it, on the model's
  initializers): Conv(x, W', b') [+ residual] [-> Relu].
- ``bn_act`` (BatchNorm with batch statistics: training mode, or ``track_running_stats=False``) has none: it
  updates the running statistics in place, so torch.export calls it through its ``auto_functionalized``
  wrapper, and torch 2.14's ONNX exporter fails on that wrapper before it looks up any translation (a
  KeyError naming ``resfuse.bn_act``). Serving runs in eval mode; eager PyTorch's own export of a model in
  training mode normalises with the running statistics instead, a different function from the model's.
"""
from __future__ import annotations

from typing import Callable

import torch
from onnxscript import opset18 as op


def conv_bn_act(input, weight, bias, residual, stride, padding, dilation, groups, relu):
    """act(conv2d(input, weight) + bias [+ residual])."""
    conv_inputs = (input, weight) if bias is None else (input, weight, bias)
    out = op.Conv(*conv_inputs, strides=list(stride), pads=[*padding, *padding], dilations=list(dilation),
                  group=groups)
    if residual is not None:
        out = op.Add(out, residual)
    return op.Relu(out) if relu else out


# resfuse's op name -> its translation (flavours share their op's). Ops this build does not register are
# skipped.
TRANSLATIONS: dict[str, Callable] = {
    "conv_bn_act": conv_bn_act,
    "conv_bn_act_igemm": conv_bn_act,
    "conv_bn_act_sm90": conv_bn_act,
    "conv_bn_act_triton": conv_bn_act,
}


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: each resfuse op this build
    registers, mapped to its translation."""
    return {getattr(torch.ops.resfuse, name).default: fn for name, fn in TRANSLATIONS.items()
            if hasattr(torch.ops.resfuse, name)}
