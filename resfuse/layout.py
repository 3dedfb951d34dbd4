"""The two rules every resfuse op follows, shared by its Python face, fake kernels and Triton launchers.

- ``memory_format_of(x)``: the layout an op writes its output in, the input's suggested one (as ATen's
  ``Tensor.suggest_memory_format``): channels_last stays channels_last, anything else comes back contiguous.
- ``stats_dtype(x)``: the accumulation and statistics dtype, fp32, or fp64 for fp64 input.

The C++ kernels state the same rules in csrc/common.h (``suggest_memory_format``, ``accumulate_dtype``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format


def stats_dtype(x: Tensor) -> torch.dtype:
    """Accumulation / statistics dtype: fp32, or fp64 for fp64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout resfuse writes an op's output in: the input's suggested one."""
    # Dense tensors in exactly one of the two layouts are decided by two C++ checks; torch's general rule costs
    # ~7 us of Python per call, which an eval block pays several times. Fake and functional tensors (tracing),
    # and tensors dense in both or neither layout, take the general rule.
    if x.dim() == 4 and (type(x) is Tensor or type(x) is nn.Parameter):
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if x.is_contiguous() != channels_last:
            return torch.channels_last if channels_last else torch.contiguous_format
    return suggest_memory_format(x)
