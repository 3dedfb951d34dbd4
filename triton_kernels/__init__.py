"""Triton kernels of resfuse (installed as resfuse.triton_kernels).

bn_act_fwd / bn_act_bwd: training-mode BatchNorm + residual + ReLU (ops bn_act and _bn_act_backward).
conv_epilogue_fwd / conv_epilogue_bwd: the bias + residual + ReLU epilogue of conv_bn_act and its backward.
Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors.
"""
from .bias_act import conv_epilogue_bwd, conv_epilogue_fwd
from .bn_act import LaunchConfig, bn_act_bwd, bn_act_fwd, launch_config, reduction_config
from .conv_bn_act import conv_bn_act_fwd

__all__ = [
    "bn_act_fwd",
    "bn_act_bwd",
    "conv_epilogue_fwd",
    "conv_epilogue_bwd",
    "launch_config",
    "reduction_config",
    "LaunchConfig",
]
