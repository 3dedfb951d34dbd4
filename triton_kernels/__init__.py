"""Triton kernels of resfuse (installed as resfuse.triton_kernels).

bn_act_fwd / bn_act_bwd (bn_act.py): training-mode BatchNorm + residual + ReLU (ops bn_act_triton and
    _bn_act_backward_triton).
bn_stats / bn_act_apply / bn_act_backward_reduce / bn_act_backward_elemt (bn_act_passes.py): bn_act's passes one
    at a time, for synchronised BatchNorm (ops _bn_stats_triton and the like).
conv_bn_act_fwd (conv_bn_act.py): implicit-GEMM conv with the bias + residual + ReLU epilogue (conv_bn_act_triton).
bn_squeeze_fwd / bn_squeeze_bwd (bn_squeeze.py): batch statistics + the per-sample squeeze of the normalised
    input (ops bn_squeeze_triton and _bn_squeeze_backward_triton).
bn_scale_act_fwd / bn_scale_act_bwd (bn_scale_act.py): BN with given statistics * a per-(sample, channel) factor
    + residual + ReLU (ops bn_scale_act_triton and _bn_scale_act_backward_triton).
conv_epilogue_bwd (conv_epilogue.py): the epilogue's backward, before ATen's conv backward
    (_conv_bn_act_backward_triton).
bn_eval_act_fwd / bn_eval_act_bwd (bn_eval_act.py): eval-mode BatchNorm + residual + ReLU (ops bn_eval_act_triton
    and _bn_eval_act_backward_triton).
fold_bn_fwd (fold_bn.py): the eval-mode BN fold into the conv weight and bias, one launch (_fold_bn_triton).
Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors (INTERPRETING says which).
"""
from ._interpret import INTERPRETING
from .bn_act import LaunchConfig, bn_act_bwd, bn_act_fwd, launch_config, reduction_config
from .bn_act_passes import bn_act_apply, bn_act_backward_elemt, bn_act_backward_reduce, bn_stats
from .bn_scale_act import bn_scale_act_bwd, bn_scale_act_fwd
from .bn_squeeze import bn_squeeze_bwd, bn_squeeze_fwd
from .conv_bn_act import conv_bn_act_fwd
from .conv_epilogue import conv_epilogue_bwd
from .bn_eval_act import bn_eval_act_bwd, bn_eval_act_fwd
from .fold_bn import fold_bn_fwd

__all__ = [
    "INTERPRETING",
    "conv_bn_act_fwd",
    "bn_act_fwd",
    "bn_act_bwd",
    "bn_stats",
    "bn_act_apply",
    "bn_act_backward_reduce",
    "bn_act_backward_elemt",
    "bn_squeeze_fwd",
    "bn_squeeze_bwd",
    "bn_scale_act_fwd",
    "bn_scale_act_bwd",
    "conv_epilogue_bwd",
    "bn_eval_act_fwd",
    "bn_eval_act_bwd",
    "fold_bn_fwd",
    "launch_config",
    "reduction_config",
    "LaunchConfig",
]
