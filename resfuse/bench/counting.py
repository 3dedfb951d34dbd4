"""FLOPs and bytes of each benchmark, written from the shapes (no profiler), for TFLOP/s, GB/s and the roofline.

FLOPs: ``2 * N * OH * OW * C_out * C_in / groups * KH * KW`` per convolution (a multiply-add is two), plus
``2 * N * in * out`` for a model's classifier; BatchNorm, ReLU and the residual add are not counted in rows with
convolutions (they are a few FLOPs per element against hundreds). Train mode (forward + backward) counts three
times the forward: the backward computes the input gradient and the weight gradient, each as costly as the
forward.

Bytes: the least memory traffic of the fused ops, each reading its inputs once and writing its outputs once:

- a convolution with its BN and ReLU fused (``conv_bn_act``): its input, its weight, the residual where there
  is one, its output. Train adds the backward's compulsory traffic: it reads the output gradient, the saved
  input and the weight, and writes the input and weight gradients (and the residual's gradient).
- ``bn_act`` (memory-bound, no convolution): eval reads x (and the residual) and writes out; train's forward
  reads x and the residual and writes out, its backward reads the output gradient, x and out (the ReLU mask)
  and writes the gradients of x and of the residual. Its nominal FLOPs are ``7`` per element forward and ``10``
  backward (statistics, normalise and affine, add, ReLU; then two reductions and the input gradient).
- a block with SE / ECA attention (or a drop_path that drops) in a whole model: its last conv writes y (no
  residual), then the fused tail's passes over y-sized tensors (``TAIL_PASSES``, ``block_tail_bytes``).

Per-channel vectors (BN parameters, running statistics, folded bias) are left out: they are a few kB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from .shapes import ActShape, BlockShape

TRAIN_FLOP_FACTOR = 3
BN_ACT_FWD_FLOPS_PER_ELEMENT = 7
BN_ACT_BWD_FLOPS_PER_ELEMENT = 10


def conv_flops(n: int, c_in: int, c_out: int, out_h: int, out_w: int, kh: int, kw: int, groups: int = 1) -> int:
    """Forward FLOPs of one 2-D convolution (2 per multiply-add)."""
    return 2 * n * out_h * out_w * c_out * (c_in // groups) * kh * kw


@dataclass(frozen=True)
class Conv:
    """A square convolution as ResNets use them: padding ``kernel // 2``, so ``out = (in - 1) // stride + 1``."""

    c_in: int
    c_out: int
    kernel: int
    stride: int
    in_size: int
    groups: int = 1
    residual: bool = False  # the block's last conv, whose epilogue adds the shortcut

    @property
    def out_size(self) -> int:
        return (self.in_size - 1) // self.stride + 1

    def flops(self, n: int) -> int:
        return conv_flops(n, self.c_in, self.c_out, self.out_size, self.out_size, self.kernel, self.kernel,
                          self.groups)

    def elements(self, n: int) -> tuple[int, int, int]:
        """(input, output, weight) element counts."""
        return (n * self.c_in * self.in_size ** 2, n * self.c_out * self.out_size ** 2,
                self.c_out * (self.c_in // self.groups) * self.kernel ** 2)

    def bytes(self, n: int, itemsize: int, train: bool) -> int:
        x, y, w = self.elements(n)
        r = y if self.residual else 0
        fwd = x + w + r + y
        if not train:
            return fwd * itemsize
        # backward: read grad_out, the saved input and the weight; write grad_input, grad_weight (and the
        # residual's gradient)
        bwd = y + x + w + x + w + r
        return (fwd + bwd) * itemsize


def block_convs(shape: BlockShape) -> list[Conv]:
    """The convolutions of one block, in torchvision's layout (ResNet v1.5: the stride sits on the 3x3 conv)."""
    s, out = shape.size, shape.out_size
    if shape.block == "basicblock":
        convs = [Conv(shape.inplanes, shape.planes, 3, shape.stride, s),
                 Conv(shape.planes, shape.planes, 3, 1, out, residual=True)]
    else:
        width = shape.planes
        convs = [Conv(shape.inplanes, width, 1, 1, s),
                 Conv(width, width, 3, shape.stride, s),
                 Conv(width, shape.out_channels, 1, 1, out, residual=True)]
    if shape.downsample:
        convs.append(Conv(shape.inplanes, shape.out_channels, 1, shape.stride, s))
    return convs


def convs_flops(convs: Iterable[Conv], n: int, train: bool) -> int:
    return sum(c.flops(n) for c in convs) * (TRAIN_FLOP_FACTOR if train else 1)


def convs_bytes(convs: Iterable[Conv], n: int, itemsize: int, train: bool) -> int:
    return sum(c.bytes(n, itemsize, train) for c in convs)


def block_flops(shape: BlockShape, n: int, train: bool) -> int:
    return convs_flops(block_convs(shape), n, train)


def block_bytes(shape: BlockShape, n: int, itemsize: int, train: bool) -> int:
    return convs_bytes(block_convs(shape), n, itemsize, train)


def op_conv(shape: ActShape) -> Conv:
    """The convolution that the ``conv_bn_act`` benchmark runs on an activation shape."""
    return Conv(shape.channels, shape.channels, 3, 1, shape.size, residual=True)


def conv_bn_act_flops(shape: ActShape, n: int, train: bool = False) -> int:
    return convs_flops([op_conv(shape)], n, train)


def conv_bn_act_bytes(shape: ActShape, n: int, itemsize: int, train: bool = False) -> int:
    return convs_bytes([op_conv(shape)], n, itemsize, train)


def bn_act_flops(shape: ActShape, n: int, train: bool) -> int:
    per_element = BN_ACT_FWD_FLOPS_PER_ELEMENT + (BN_ACT_BWD_FLOPS_PER_ELEMENT if train else 0)
    return per_element * n * shape.channels * shape.size ** 2


def bn_act_bytes(shape: ActShape, n: int, itemsize: int, train: bool, residual: bool = True) -> int:
    numel = n * shape.channels * shape.size ** 2
    r = 1 if residual else 0
    tensors = 2 + r  # forward: read x (+ residual), write out
    if train:
        tensors += 3 + 1 + r  # backward: read grad_out, x, out; write grad_x (+ grad_residual)
    return tensors * numel * itemsize


@dataclass(frozen=True)
class Tail:
    """A block end that runs the fused SE / ECA / drop_path tail on its last conv's output (``block_tail_bytes``);
    that conv is then counted without the residual, which the tail reads."""

    channels: int
    size: int
    drop_path: bool = False


@dataclass
class ModelCount:
    convs: list
    fc: Optional[tuple[int, int]]  # (in_features, out_features)
    tails: list = field(default_factory=list)

    def flops(self, n: int, train: bool) -> int:
        fc = 2 * n * self.fc[0] * self.fc[1] if self.fc else 0
        return (sum(c.flops(n) for c in self.convs) + fc) * (TRAIN_FLOP_FACTOR if train else 1)

    def bytes(self, n: int, itemsize: int, train: bool) -> int:
        fc = 0
        if self.fc:
            i, o = self.fc
            fc = (n * i + i * o + n * o) * (3 if train else 1) * itemsize
        tails = sum(block_tail_bytes(ActShape(0, t.channels, t.size), n, itemsize, train, t.drop_path)
                    for t in self.tails)
        return convs_bytes(self.convs, n, itemsize, train) + fc + tails


def count_model(model, resolution: int) -> ModelCount:
    """The convolutions (and classifier) of a model, found by running it once on the meta device, and the
    blocks whose end is the fused SE / ECA / drop_path tail: those with attention (``se``) or a DropPath that
    drops, as resfuse.convert() fuses them (resfuse/nn/timm_tail.py)."""
    import copy

    import torch
    from torch import nn

    meta = copy.deepcopy(model).to("meta")
    convs: list[Conv] = []
    fc: list[tuple[int, int]] = []
    tails: list[Tail] = []
    last_conv_of_block: set[int] = set()
    tail_of_conv: dict[int, bool] = {}  # id(last conv) -> whether its block's drop_path drops
    for module in meta.modules():
        # the conv whose output receives the shortcut: the last conv of a torchvision-style block
        if type(module).__name__ in ("BasicBlock", "Bottleneck"):
            last = getattr(module, "conv3", None) or getattr(module, "conv2", None)
            if last is None:
                continue
            drop_path = getattr(module, "drop_path", None)
            drops = type(drop_path).__name__ == "DropPath" and drop_path.drop_prob > 0
            if getattr(module, "se", None) is not None or drops:
                tail_of_conv[id(last)] = drops
            else:
                last_conv_of_block.add(id(last))

    def on_conv(module, args, _output):
        (x,) = args[:1]
        conv = Conv(module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0], x.shape[-1],
                    module.groups, residual=id(module) in last_conv_of_block)
        convs.append(conv)
        if id(module) in tail_of_conv:
            tails.append(Tail(conv.c_out, conv.out_size, tail_of_conv[id(module)]))

    def on_linear(module, _args, _output):
        fc.append((module.in_features, module.out_features))

    hooks = []
    for module in meta.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(on_linear))
    try:
        with torch.no_grad():
            meta.eval()(torch.empty(1, 3, resolution, resolution, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return ModelCount(convs, fc[-1] if fc else None, tails)


# Passes over an activation-sized tensor (each read or write of one counts once) from a block's conv3 output y
# to its output, for the SE / ECA / drop_path tail (resfuse/ops/block_tail.py has the derivation).
# (train, drop_path) -> (eager, fused); drop_path is the identity in eval. Eager is timm's sequence: bn3, the
# SE/ECA mean, x * gate, [x * keep], x += shortcut, ReLU, and autograd's backward of it; in eval bn3 runs
# unfolded, as in timm's model.
TAIL_PASSES = {
    (False, False): (10, 4),
    (True, False): (11 + 16, 4 + 10),
    (True, True): (13 + 18, 4 + 10),
}


def block_tail_bytes(shape: ActShape, n: int, itemsize: int, train: bool, drop_path: bool = False,
                     fused: bool = True) -> int:
    """Least memory traffic of a block's SE / ECA tail on an activation ``shape`` (the [N, C] gate is left
    out: C values per sample against C*H*W): fused (bn_squeeze + bn_scale_act) or eager (timm's ops)."""
    eager_passes, fused_passes = TAIL_PASSES[(bool(train), bool(drop_path and train))]
    numel = n * shape.channels * shape.size ** 2
    return (fused_passes if fused else eager_passes) * numel * itemsize
