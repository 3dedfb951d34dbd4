"""The shape table of every benchmark: each distinct block of ResNet-18, ResNet-34 and ResNet-50 at 224x224.

``benchmarks/shapes.py`` re-exports this module, so the pytest-benchmark files and ``python -m resfuse.bench``
time the same shapes. A block shape is named by its input, ``C<in channels>_H<in size>``, with ``_down`` for
the first block of a stage (the one with a downsample shortcut: stride 2, or the 1x1 projection of ResNet-50's
layer1). ResNet-18 and ResNet-34 share their BasicBlock shapes; they differ only in how many of each they hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

# torchvision's block counts per stage (layer1..layer4)
MODEL_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
MODEL_BLOCK = {"resnet18": "basicblock", "resnet34": "basicblock", "resnet50": "bottleneck"}
MODELS = tuple(MODEL_LAYERS)
PLANES = (64, 128, 256, 512)  # planes of layer1..layer4, the same in all three models
INPUT_SIZE = 224


@dataclass(frozen=True)
class BlockShape:
    """One residual block: ``inplanes`` channels at ``size`` x ``size`` in, ``planes * expansion`` out."""

    block: str  # "basicblock" or "bottleneck"
    layer: int  # 1..4 (torchvision's layer1..layer4)
    inplanes: int
    planes: int
    stride: int
    size: int  # input height = width
    downsample: bool
    count: dict = field(default_factory=dict, compare=False, hash=False)  # model -> blocks of this shape

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    @property
    def out_size(self) -> int:
        return (self.size - 1) // self.stride + 1

    @property
    def stage(self) -> str:
        return f"C{self.inplanes}_H{self.size}" + ("_down" if self.downsample else "")


@dataclass(frozen=True)
class ActShape:
    """An activation (N, C, H, W) for the ops: ``conv_bn_act`` runs the 3x3 stride-1 conv of an identity
    BasicBlock's second half on it (C -> C, + residual, ReLU); ``bn_act`` normalises it (+ residual, ReLU)."""

    layer: int
    channels: int
    size: int

    @property
    def stage(self) -> str:
        return f"C{self.channels}_H{self.size}"


def _block_shapes(block: str, models: Sequence[str]) -> list[BlockShape]:
    expansion = 4 if block == "bottleneck" else 1
    shapes = []
    inplanes, size = 64, INPUT_SIZE // 4  # after the stem (stride-2 conv, stride-2 max pool)
    for layer, planes in enumerate(PLANES, 1):
        stride = 1 if layer == 1 else 2
        first_has_downsample = stride != 1 or inplanes != planes * expansion
        counts = {m: MODEL_LAYERS[m][layer - 1] for m in models}
        if first_has_downsample:
            shapes.append(BlockShape(block, layer, inplanes, planes, stride, size, True, {m: 1 for m in models}))
            counts = {m: c - 1 for m, c in counts.items()}
        inplanes, size = planes * expansion, (size - 1) // stride + 1
        shapes.append(BlockShape(block, layer, inplanes, planes, 1, size, False, counts))
    return shapes


BASICBLOCK_SHAPES: list[BlockShape] = _block_shapes("basicblock", ("resnet18", "resnet34"))
BOTTLENECK_SHAPES: list[BlockShape] = _block_shapes("bottleneck", ("resnet50",))
# the quick GPU preset and the ops: the identity BasicBlock of each stage
STAGES: list[tuple[int, int]] = [(s.inplanes, s.size) for s in BASICBLOCK_SHAPES if not s.downsample]
OP_SHAPES: list[ActShape] = [ActShape(layer, c, h) for layer, (c, h) in enumerate(STAGES, 1)]


def block_shapes(block: str) -> list[BlockShape]:
    return {"basicblock": BASICBLOCK_SHAPES, "bottleneck": BOTTLENECK_SHAPES}[block]


def _matches(shape, token: str) -> bool:
    token = token.strip()
    planes = shape.planes if isinstance(shape, BlockShape) else shape.channels
    return token in (str(planes), f"layer{shape.layer}", shape.stage)


def select(shapes: Iterable, tokens: Optional[Sequence[str]], identity_only: bool = False) -> list:
    """The shapes a ``--stages`` list names. A token is a stage's planes (``64``..``512``: its layer in every
    model), ``layer1``..``layer4``, or a stage name (``C64_H56``, ``C256_H56_down``). No tokens: all of them."""
    shapes = [s for s in shapes if not (identity_only and getattr(s, "downsample", False))]
    if not tokens:
        return shapes
    return [s for s in shapes if any(_matches(s, t) for t in tokens)]


def stage_tokens() -> list[str]:
    """Every token ``select`` understands (for ``--help`` and error messages)."""
    names = [str(p) for p in PLANES] + [f"layer{i}" for i in range(1, 5)]
    names += [s.stage for s in BASICBLOCK_SHAPES + BOTTLENECK_SHAPES]
    return list(dict.fromkeys(names))
