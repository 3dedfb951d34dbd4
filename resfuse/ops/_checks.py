"""Input checks shared by the ops: a clear error that names what was expected and what came."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_activation(x: Tensor, what: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be floating-point (float16, bfloat16, float32 or float64), got {x.dtype}")


def check_like(x: Tensor, other: Optional[Tensor], what: str) -> None:
    """``other`` (a residual) must match ``x`` in shape, dtype and device."""
    check_matches(other, tuple(x.shape), x.dtype, x.device, what)


def check_matches(other: Optional[Tensor], shape: tuple, dtype: torch.dtype, device: torch.device,
                  what: str) -> None:
    """``other`` must have this shape, dtype and device (the output's, for a residual)."""
    if other is None:
        return
    if other.device != device:
        raise RuntimeError(f"{what} is on {other.device} but the input is on {device}")
    if tuple(other.shape) != tuple(shape):
        raise ValueError(f"{what} must have the output's shape {tuple(shape)}, got {tuple(other.shape)}")
    if other.dtype != dtype:
        raise RuntimeError(f"{what} has dtype {other.dtype} but the input has dtype {dtype}")


def check_channel_vector(x: Tensor, v: Optional[Tensor], what: str, allow_fp32: bool = True,
                         channels: Optional[int] = None) -> None:
    """Per-channel parameters: shape [C], same device, the input's dtype (or fp32 for BN's mixed precision).
    ``channels``: C when it is not x's (a conv's output channels)."""
    if v is None:
        return
    channels = x.shape[1] if channels is None else channels
    if v.device != x.device:
        raise RuntimeError(f"{what} is on {v.device} but the input is on {x.device}")
    if v.dim() != 1 or v.shape[0] != channels:
        raise ValueError(f"{what} must have shape [{channels}] (one value per channel), got {tuple(v.shape)}")
    if v.dtype != x.dtype and not (allow_fp32 and v.dtype == torch.float32):
        raise RuntimeError(f"{what} has dtype {v.dtype} but the input has dtype {x.dtype}")
