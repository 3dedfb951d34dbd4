"""The benchmarks' one shape table, re-exported from ``resfuse.bench.shapes`` so that ``python -m resfuse.bench``
(which cannot import this folder) and the pytest-benchmark files time the same shapes.

- ``BASICBLOCK_SHAPES``: every BasicBlock shape of ResNet-18/34 (identity and downsampling, each stage).
- ``BOTTLENECK_SHAPES``: every Bottleneck shape of ResNet-50.
- ``OP_SHAPES``: one activation per stage for ``conv_bn_act`` and ``bn_act``.
- ``MODELS``: the torchvision models timed whole.
"""
from resfuse.bench.shapes import (
    BASICBLOCK_SHAPES,
    BOTTLENECK_SHAPES,
    INPUT_SIZE,
    MODEL_BLOCK,
    MODEL_LAYERS,
    MODELS,
    OP_SHAPES,
    PLANES,
    STAGES,
    ActShape,
    BlockShape,
    block_shapes,
    select,
)

__all__ = ["BASICBLOCK_SHAPES", "BOTTLENECK_SHAPES", "INPUT_SIZE", "MODEL_BLOCK", "MODEL_LAYERS", "MODELS", "OP_SHAPES",
           "PLANES", "STAGES", "ActShape", "BlockShape", "block_shapes", "select"]
