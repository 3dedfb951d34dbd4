"""resfuse's ops written as ATen ops in an exported program: a program that needs only torch to run.

``torch.export.export`` of a converted model keeps resfuse's registered ops (``resfuse::conv_bn_act``...), so
whatever runs the program calls resfuse's kernels: the process must have imported resfuse, and an AOTInductor
package of it loads only where resfuse's Python extension is loaded (its ``_C`` needs the Python interpreter,
so a C++-only runtime cannot load it). ``decompose(ep)`` rewrites each such call as the ATen ops it computes
(conv + add + relu, eval-mode batch_norm, the BN fold's arithmetic), which AOTInductor compiles and the ONNX
exporter translates like any model's.

One function per op, in torch ops; an op's flavours share it (flavours.py).
``bn_act`` and ``bn_squeeze`` (BatchNorm with batch statistics, training ops) are not among them: they update
the running statistics in place, so the exported program calls them through torch's ``auto_functionalized``
wrapper, which ``run_decompositions`` does not open. A program that still calls a resfuse op after decomposing
is an error that says which and why.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..layout import memory_format_of
from ..ops.fold_bn import storage_order
from .flavours import TRAINING_ONLY, by_overload


def conv_bn_act(input, weight, bias, residual, stride, padding, dilation, groups, relu):
    """act(conv2d(input, weight) + bias [+ residual]): the op's math, as ATen's conv and pointwise ops."""
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def bn_eval_act(input, weight, bias, residual, running_mean, running_var, eps, relu):
    """act(eval-mode batch_norm(input) [+ residual]): ATen's BatchNorm with the running statistics."""
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype, layout):
    """(W', b'): the eval BatchNorm folded into the conv before it, computed in float32 (float64 for a
    float64 conv weight), written in ``dtype`` and stored as ``layout`` stores it."""
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) if conv_bias is None else conv_bias.to(acc) - running_mean.to(acc)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    weight = (conv_weight.to(acc) * scale.view(-1, 1, 1, 1)).to(dtype)
    order = storage_order(layout)
    stored = weight.permute(order).contiguous().permute([order.index(d) for d in range(4)])
    return stored, shift.to(dtype)


def bn_scale_act(input, weight, bias, mean, invstd, scale, residual, relu):
    """act(((x - mean) * invstd * weight + bias) * scale[n, c] + residual), each None the identity: the op's
    terms in its order, in float32 (float64 for float64 input), written in the input's dtype and layout."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32

    def per_channel(v):
        return v.to(acc).view(1, -1, 1, 1)

    out = input.to(acc)
    if mean is not None:
        out = out - per_channel(mean)
    if invstd is not None:
        out = out * per_channel(invstd)
    if weight is not None:
        out = out * per_channel(weight)
    if bias is not None:
        out = out + per_channel(bias)
    if scale is not None:
        out = out * scale.to(acc)[:, :, None, None]
    if residual is not None:
        out = out + residual.to(acc)
    if relu:
        out = torch.relu(out)
    return out.to(input.dtype).contiguous(memory_format=memory_format_of(input))


# resfuse's op -> its decomposition, which its flavours share (flavours.py).
DECOMPOSITIONS: dict[str, Callable] = {
    "conv_bn_act": conv_bn_act,
    "bn_eval_act": bn_eval_act,
    "_fold_bn": fold_bn,
    "bn_scale_act": bn_scale_act,
}


def decomposition_table() -> dict:
    """``{op overload: decomposition}`` for ``ExportedProgram.run_decompositions``: resfuse's ops only, so the
    rest of the program stays as exported."""
    return by_overload(DECOMPOSITIONS)


def resfuse_calls(graph_module: torch.fx.GraphModule) -> Iterator[str]:
    """The names of the resfuse ops ``graph_module`` (and its subgraphs) calls, directly or through a wrapper
    such as ``auto_functionalized`` (which names the op as its first argument)."""
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            for target in (node.target, *node.args[:1]):
                if isinstance(target, torch._ops.OpOverload) and target.namespace == "resfuse":
                    yield target.name()


def decompose(exported_program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``exported_program`` with every resfuse op rewritten as ATen ops (see the module docstring)."""
    program = exported_program.run_decompositions(decomposition_table())
    left = sorted(set(resfuse_calls(program.graph_module)))
    if left:
        training_only = {f"resfuse::{name}" for names in TRAINING_ONLY.values() for name in names}
        raise RuntimeError(
            f"resfuse.export.decompose: the program still calls {', '.join(left)}, which has no decomposition"
            + (" (BatchNorm with batch statistics, as in training mode or with track_running_stats=False: it "
               "updates running statistics in place)"
               if training_only & set(left) else "")
            + ". Export the model in eval mode (model.eval()), or resfuse.revert(model) before exporting it")
    return program
