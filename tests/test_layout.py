"""The output layout rules (``memory_format_of`` and the Triton kernels' own) against torch's, on dense, strided
and size-1 tensors."""
import itertools

import pytest
import torch
from torch._prims_common import suggest_memory_format

from resfuse.layout import memory_format_of


def _tensors():
    for shape in itertools.product((1, 2, 3), (1, 3, 8), (1, 4), (1, 5)):
        base = torch.randn(shape)
        yield base
        yield base.contiguous(memory_format=torch.channels_last)
        yield base.permute(0, 1, 3, 2)          # strided in neither layout
        yield base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        yield torch.randn(shape[0], shape[1] * 2, shape[2], shape[3])[:, ::2]  # a channel slice
        yield torch.randn(shape[0], shape[2], shape[3], shape[1] * 2).permute(0, 3, 1, 2)[:, ::2]
        yield base.expand(shape[0], shape[1], shape[2], shape[3])


def test_memory_format_of_matches_torch():
    seen = set()
    for t in _tensors():
        assert memory_format_of(t) == suggest_memory_format(t), (tuple(t.shape), t.stride())
        seen.add(memory_format_of(t))
    assert seen == {torch.contiguous_format, torch.channels_last}


def test_triton_kernels_layout_matches_torch():
    pytest.importorskip("triton")
    from resfuse.triton_kernels.bn_act import suggest_memory_format as triton_layout

    for t in _tensors():
        assert triton_layout(t) == suggest_memory_format(t), (tuple(t.shape), t.stride())
