"""cuDNN's own fused convolution + bias (+ residual) + ReLU: one of what ``auto`` may run for eval convs on GPUs.

With BN folded into the conv, ``torch.cudnn_convolution_relu`` and ``torch.cudnn_convolution_add_relu`` were
the fastest eval path measured on an H100 at every ResNet-18 stage (benchmarks/results/
h100-80gb-hbm3-20261123-blocks.json, ``cudnn_fused`` rows: 0.09-0.17 ms per BasicBlock, against 0.16-0.35 ms
for resfuse's ``cuda`` backend and 0.33-0.65 ms for its ``triton`` backend). The ``cuda`` and ``triton``
backends stay resfuse's own kernels; only ``auto`` comes here, and only when

- the tensors are CUDA tensors in fp16, bf16 or fp32 and cuDNN is enabled;
- a ReLU follows (torch exposes no fused conv + bias + add without one);
- no gradient is needed (these ops have no autograd formula; resfuse's op has);
- the call is not being traced by torch.compile (the compiler sees resfuse's registered op);
- cuDNN has not refused this configuration before: a RuntimeError from it is remembered per configuration,
  and that configuration takes resfuse's op from then on.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..layout import memory_format_of
from ._autograd import grad_needed

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# configurations cuDNN refused: (device, dtype, layout, weight shape, stride, padding, dilation, groups, residual)
_refused: set = set()


def _device_reason(x: Tensor) -> Optional[str]:
    if not x.is_cuda:
        return "not a CUDA tensor"
    if x.dtype not in _DTYPES:
        return f"{x.dtype} is not one of cuDNN's fused-convolution dtypes"
    if not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        return "cuDNN is not available or disabled"
    return None


def unusable_reason(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    relu: bool) -> Optional[str]:
    """Why this call cannot take cuDNN's fused convolution (None: it can try)."""
    reason = _device_reason(x)
    if reason is not None:
        return reason
    if not relu:
        return "no ReLU: torch has no fused conv + bias without one"
    if grad_needed(x, weight, bias, residual):
        return "a gradient is needed, and cuDNN's fused ops have no autograd formula"
    if torch.compiler.is_compiling():
        return "traced by torch.compile, which sees resfuse's registered op instead"
    return None


def _config(x: Tensor, fmt: torch.memory_format, weight: Tensor, residual: Optional[Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> tuple:
    return (x.device, x.dtype, fmt, tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation), groups,
            residual is not None)


def run(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], groups: int) -> Optional[Tensor]:
    """relu(conv(x, weight) + bias [+ residual]) through cuDNN, in x's layout; None when cuDNN refuses the
    configuration (now or before)."""
    fmt = memory_format_of(x)
    if _refused and _config(x, fmt, weight, residual, stride, padding, dilation, groups) in _refused:
        return None
    # cuDNN picks its layout from both operands: a weight in the input's layout keeps the output in it.
    weight = weight.contiguous(memory_format=fmt)
    args = (list(stride), list(padding), list(dilation), groups)
    try:
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, *args)
        return torch.cudnn_convolution_add_relu(x, weight, residual.contiguous(memory_format=fmt), 1.0, bias, *args)
    except torch.cuda.OutOfMemoryError:
        raise  # not a refusal of the configuration
    except RuntimeError as exc:
        _refused.add(_config(x, fmt, weight, residual, stride, padding, dilation, groups))
        warnings.warn(f"resfuse: cuDNN refused its fused convolution for {x.dtype} {fmt} input, weight "
                      f"{tuple(weight.shape)}, stride {tuple(stride)}, dilation {tuple(dilation)}, groups {groups} "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); backend 'auto' runs "
                      f"resfuse's own op for this configuration from now on", stacklevel=3)
        return None
