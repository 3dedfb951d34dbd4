"""Tiles of the [N, C, P] sample view (P = H*W) for the kernels whose parameters vary per (sample, channel):
bn_squeeze.py and bn_scale_act.py.

An activation made contiguous in its suggested memory format holds element (n, c, p) at
    NCHW (contiguous):    (n * C + c) * P + p
    NHWC (channels_last): (n * P + p) * C + c
A tile is BLOCK_P positions x BLOCK_C channels of one sample; bn_act.py's [outer, C, inner] view folds N into
`outer` for NHWC and so cannot say which sample a row belongs to. Offsets are int64.

Launch shapes: the elementwise kernels run one program per tile (grid N * p_tiles x c_blocks); the per-(n, c)
reductions one program per (sample, channel block), which walks that sample's tiles in order (deterministic);
the per-channel finalisers one program per channel block, which walks the samples BLOCK_N at a time.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..layout import memory_format_of
from ._interpret import INTERPRETING
from .bn_act import _np2


class SampleLayout(NamedTuple):
    fmt: torch.memory_format
    N: int
    C: int
    P: int
    channels_last: bool


def sample_layout(x: torch.Tensor) -> SampleLayout:
    fmt = memory_format_of(x)
    n, c, h, w = x.shape
    return SampleLayout(fmt, n, c, h * w, fmt == torch.channels_last)


class SampleConfig(NamedTuple):
    BLOCK_P: int     # positions per tile
    BLOCK_C: int     # channels per tile
    p_tiles: int     # tiles per sample
    c_blocks: int    # channel blocks
    BLOCK_N: int     # samples per step of the finalisers
    num_warps: int


@functools.lru_cache(maxsize=1024)
def sample_config(N: int, C: int, P: int, channels_last: bool) -> SampleConfig:
    """Block sizes from the shape. Under the interpreter the tiles are tiny, which keeps CI fast and still
    exercises the multi-tile and masked paths; on a GPU a tile holds about 2K elements, channels contiguous in
    NHWC (64-channel rows) and positions contiguous in NCHW. Not tuned on a GPU yet."""
    if INTERPRETING:
        BLOCK_P, BLOCK_C, BLOCK_N = min(_np2(P), 16), min(_np2(C), 8), 2
    elif channels_last:
        BLOCK_C = min(_np2(C), 64)
        BLOCK_P = min(_np2(P), max(16, 2048 // BLOCK_C))
        BLOCK_N = 32
    else:
        BLOCK_P = min(_np2(P), 1024)
        BLOCK_C = min(_np2(C), max(1, 2048 // BLOCK_P))
        BLOCK_N = 32
    num_warps = 4 if BLOCK_P * BLOCK_C <= 2048 else 8
    return SampleConfig(BLOCK_P, BLOCK_C, triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C), BLOCK_N, num_warps)


@triton.jit
def _sample_tile(n, t, c0, C, P, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (int64), mask and valid-position count of tile t of sample n, channels [c0, c0 + BLOCK_C)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    p0 = t * BLOCK_P
    ps = p0 + tl.arange(0, BLOCK_P)
    pmask = ps < P
    n64 = n.to(tl.int64)
    if CHANNELS_LAST:
        offs = (n64 * P + ps[:, None]) * C + cols[None, :]
    else:
        offs = (n64 * C + cols[None, :]) * P + ps[:, None]
    mask = pmask[:, None] & cmask[None, :]
    cnt = tl.minimum(P - p0, BLOCK_P)
    return offs, mask, cnt


@triton.jit
def _elementwise_tile(C, P, p_tiles, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of an elementwise program (grid N * p_tiles x c_blocks): its sample, channels, channel mask,
    offsets and mask."""
    n = tl.program_id(0) // p_tiles
    t = tl.program_id(0) - n * p_tiles
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs, mask, _ = _sample_tile(n, t, c0, C, P, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    return n, cols, cmask, offs, mask
