"""resfuse's ops by the function they compute: each export route writes one function per op, and every flavour
of that op (the C++ op, the Triton op, the named CUDA kernels) computes the same function and shares it."""
from __future__ import annotations

from typing import Callable

import torch

# op -> its flavours' registered names
FLAVOURS: dict[str, tuple[str, ...]] = {
    "conv_bn_act": ("conv_bn_act", "conv_bn_act_igemm", "conv_bn_act_sm90", "conv_bn_act_triton"),
    "bn_eval_act": ("bn_eval_act", "bn_eval_act_triton"),
    "_fold_bn": ("_fold_bn", "_fold_bn_triton"),
    "bn_scale_act": ("bn_scale_act", "bn_scale_act_triton"),
}

# Ops with no function to write: they update the running statistics in place (BatchNorm with batch statistics,
# a training op), so torch.export calls them through its ``auto_functionalized`` wrapper, which neither torch
# 2.14's ONNX exporter nor ``run_decompositions`` opens. Serving runs in eval mode, where a converted model
# whose BatchNorms track running statistics calls neither.
TRAINING_ONLY: dict[str, tuple[str, ...]] = {
    "bn_act": ("bn_act", "bn_act_triton"),
    "bn_squeeze": ("bn_squeeze", "bn_squeeze_triton"),
}


def by_overload(functions: dict[str, Callable]) -> dict:
    """``{op overload: function}`` for every flavour of each op in ``functions`` (keyed by FLAVOURS' ops) that
    this build registers (the C++ flavours exist only with the extension, the named CUDA kernels only with CUDA)."""
    return {getattr(torch.ops.resfuse, name).default: fn
            for op, fn in functions.items() for name in FLAVOURS[op] if hasattr(torch.ops.resfuse, name)}
