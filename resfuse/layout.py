"""The two rules every resfuse op follows, shared by its Python face, fake kernels and Triton launchers.

- ``memory_format_of(x)``: the layout an op writes its output in, the input's suggested one (as ATen's
  ``Tensor.suggest_memory_format``): channels_last stays channels_last, anything else comes back contiguous.
- ``stats_dtype(x)``: the accumulation and statistics dtype, fp32, or fp64 for fp64 input.

The C++ kernels state the same rules in csrc/common.h (``suggest_memory_format``, ``accumulate_dtype``).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch._prims_common import are_strides_like_channels_last_or_false, suggest_memory_format


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
    if x.dim() == 4 and torch.jit.is_tracing():
        # torch.jit.trace hands out sizes as 0-dim tensors, which torch's rule cannot compare. The layout picked
        # here is a constant of the trace, as the one a module picks its weight's layout by: numbers never
        # depend on it, so the tracer's warning about reading a size is not the user's concern.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            shape = [int(size) for size in x.shape]
        return torch.channels_last if are_strides_like_channels_last_or_false(shape, x.stride()) \
            else torch.contiguous_format
    return suggest_memory_format(x)
