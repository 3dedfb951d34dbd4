"""What the serving tests share: the README's snippets, converted models beside their eager twins, and a
separate serving process."""
from __future__ import annotations

import collections
import copy
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import randn, randomize_bn_, resfuse
from resfuse.export.flavours import TRAINING_ONLY

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_snippet(containing: str) -> str:
    """The one Python block of the README's "Serving" section that contains ``containing``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Serving")
    section = readme[start:readme.index("\n## ", start)]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} Serving snippets contain {containing!r}"
    return blocks[0]


def run_snippet(code: str, **names) -> dict:
    """Run a README snippet with ``names`` (``model``, ``x``) defined; returns its namespace."""
    namespace = {"torch": torch, **names}
    exec(compile(code, "README.md (Serving)", "exec"), namespace)
    return namespace


def eager_and_converted(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(``model`` in eval mode with randomized BN statistics, a converted deep copy of it)."""
    eager = randomize_bn_(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", resfuse.ConversionWarning)
        converted = resfuse.convert(copy.deepcopy(eager))
    return eager, converted


def resfuse_op_count(graph: torch.fx.Graph) -> int:
    """Calls of resfuse's ops in an exported program's graph: a converted model's export must hold some, or
    its test tests torch's own export of an eager model."""
    return sum(1 for node in graph.nodes
               if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "resfuse")


def resfuse_ops_run_by_name(fn, *args) -> collections.Counter:
    """Which resfuse ops ``fn(*args)`` runs (eagerly), and how often: ``{"bn_scale_act": 8, ...}``."""
    names = collections.Counter()

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "resfuse":
                names[func._schema.name.split("::", 1)[1]] += 1
            return func(*args, **(kwargs or {}))

    with _Record(), torch.no_grad():
        fn(*args)
    return names


def small_converted_seresnext(x: torch.Tensor) -> tuple[nn.Module, nn.Module, collections.Counter]:
    """timm's seresnext26d_32x4d with its stage widths cut 4x (as tests/test_timm_resnet.py), and a converted
    copy whose forward on ``x`` ends each of its 8 SE blocks in one bn_scale_act: (eager, converted, the resfuse
    ops that forward runs, by name)."""
    timm = pytest.importorskip("timm", reason="timm models need timm (the test extra)")
    eager, converted = eager_and_converted(timm.create_model(
        "seresnext26d_32x4d", pretrained=False, num_classes=8, channels=(16, 32, 64, 128), stem_width=16))
    ops = resfuse_ops_run_by_name(converted, x)
    assert sum(n for name, n in ops.items() if name.startswith("bn_scale_act")) == 8, ops  # one per block
    return eager, converted, ops


def resfuse_ops_run(fn, *args) -> int:
    """How many resfuse ops ``fn(*args)`` runs (eagerly)."""
    return sum(resfuse_ops_run_by_name(fn, *args).values())


def ops_left_out_of(table: dict) -> list[str]:
    """The resfuse ops this build registers that a forward calls by name (all but the private ones, with a
    leading underscore: backward ops, the fold, synchronised BN's pieces) and that ``table`` (an export route's
    ``{op overload: function}``) leaves out, other than the training-only ones (resfuse/export/flavours.py)."""
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("resfuse::")}
    # with or without the C++ extension: the Triton flavours are always registered
    assert {"resfuse::bn_scale_act_triton", "resfuse::bn_squeeze_triton"} <= registered
    given = {overload.name() for overload in table}
    training_only = {f"resfuse::{name}" for names in TRAINING_ONLY.values() for name in names}
    assert not given & training_only, "a training-only op has a function"
    return sorted(name for name in registered - given - training_only if not name.startswith("resfuse::_"))


def serve(snippet: str, x: torch.Tensor, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """Run a README serving snippet in a fresh Python process in ``cwd`` (where the snippet's artifact is),
    with ``x`` given; it saves ``out`` to ``cwd / "out.pt"`` and prints whether resfuse was imported."""
    torch.save(x, cwd / "x.pt")
    script = (f"import sys, torch\nx = torch.load('x.pt')\n{snippet}\ntorch.save(out, 'out.pt')\n"
              f"print('resfuse imported:', 'resfuse' in sys.modules)\n")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600)


# Modules that call one of resfuse's ops directly, for the translations and decompositions of ops a converted
# model calls on some devices only.


class EvalBNAct(nn.Module):
    """resfuse.ops.bn_eval_act on a BatchNorm2d's parameters and running statistics."""

    def __init__(self, bn, affine, relu, backend):
        super().__init__()
        self.bn, self.affine, self.relu, self.backend = bn, affine, relu, backend

    def forward(self, x, residual):
        bn = self.bn
        weight, bias = (bn.weight, bn.bias) if self.affine else (None, None)
        return resfuse.ops.bn_eval_act(x, weight, bias, residual, bn.running_mean, bn.running_var, bn.eps,
                                       relu=self.relu, backend=self.backend)


class FoldedConv(nn.Module):
    """conv2d(x, W') + b' with (W', b') = resfuse.ops.fold_bn of a conv and an eval BatchNorm's buffers (the op
    is for calls autograd does not record: these tensors do not require grad)."""

    def __init__(self, conv, bn, impl, layout, dtype=None):
        super().__init__()
        for name, t in (("conv_weight", conv.weight), ("conv_bias", conv.bias), ("bn_weight", bn.weight),
                        ("bn_bias", bn.bias), ("running_mean", bn.running_mean), ("running_var", bn.running_var)):
            if t is None:  # an attribute: torch.export refuses None buffers
                setattr(self, name, None)
            else:
                self.register_buffer(name, t.detach().clone())
        self.eps, self.impl, self.layout, self.dtype = bn.eps, impl, layout, dtype

    def fold(self):
        return resfuse.ops.fold_bn(self.conv_weight, self.conv_bias, self.bn_weight, self.bn_bias,
                                   self.running_mean, self.running_var, self.eps, dtype=self.dtype,
                                   layout=self.layout, impl=self.impl)

    def forward(self, x):
        weight, bias = self.fold()
        return torch.nn.functional.conv2d(x, weight, bias, padding=1)


class ScaleAct(nn.Module):
    """resfuse.ops.bn_scale_act called directly with every argument given (with ReLU), to choose their dtypes."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x, mean, invstd, weight, bias, scale, residual):
        return resfuse.ops.bn_scale_act(x, weight, bias, mean, invstd, scale, residual, relu=True,
                                        backend=self.backend)


class Fold(FoldedConv):
    """(W', b') themselves, to see their dtype and strides."""

    def forward(self, x):
        return self.fold()


def conv_and_bn(conv_bias, affine):
    """A 3x3 conv (4 -> 6 channels) with random weights, and an eval BatchNorm2d with random statistics."""
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias)
    with torch.no_grad():
        conv.weight.copy_(randn(6, 4, 3, 3, seed=10))
        if conv_bias:
            conv.bias.copy_(randn(6, seed=11))
    return conv, randomize_bn_(nn.BatchNorm2d(6, affine=affine, eps=1e-3)).eval()


class SETail(nn.Module):
    """conv -> resfuse.ops.block_tail, as a converted SE / ECA block ends: act(bn(conv(x)) * gate(squeeze)[n, c]
    + shortcut(x)), with an SE-like gate in torch ops (1x1 convs on the [N, C] squeeze, ReLU, sigmoid). In eval
    with running statistics that is one bn_scale_act call; with batch statistics (training mode, or
    ``bn="batch"``: BN's rule) bn_squeeze then bn_scale_act. Which terms it has is chosen, to cover every
    branch of the ops' routes:

    - ``bn``: "running" (an affine BN with running statistics), "plain" (running statistics, no affine),
      "batch" (affine, ``track_running_stats=False``) or "folded" (no BN: the conv carries it, so bn_scale_act
      gets no mean, invstd, weight or bias);
    - ``gate`` (the SE gate, else no scale), ``residual`` (a 1x1 conv shortcut, else none), ``relu``.

    ``eager(x)`` computes the same function in torch ops, as timm's blocks do, for the routes to match. Input
    3 channels (the README's serving snippets feed [N, 3, H, W])."""

    def __init__(self, backend, bn="running", gate=True, residual=True, relu=True, channels=8):
        super().__init__()
        g = torch.Generator().manual_seed(20)
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=bn == "folded")
        self.shortcut = nn.Conv2d(3, channels, 1, bias=False) if residual else None
        self.bn = None if bn == "folded" else nn.BatchNorm2d(channels, affine=bn != "plain", eps=1e-3,
                                                            track_running_stats=bn != "batch")
        self.fc1, self.fc2 = nn.Conv2d(channels, 4, 1), nn.Conv2d(4, channels, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
            if self.bn is not None:
                randomize_bn_(self.bn)
            if self.bn is not None and self.bn.running_var is not None:
                # variances far from 1, so that invstd taken as a variance (or the other way round) is O(1) off
                self.bn.running_var.copy_(torch.rand(channels, generator=g) * 4 + 0.1)
        self.use_gate, self.relu, self.backend = gate, relu, backend

    def gate(self, squeeze):
        """The SE gate on the [N, C] squeeze: sigmoid(fc2(relu(fc1(squeeze)))), [N, C]."""
        s = squeeze[:, :, None, None]
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))[:, :, 0, 0]

    def forward(self, x):
        bn = self.bn
        stats = (None,) * 4 if bn is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        batch_stats = bn is not None and (self.training or bn.running_mean is None)  # as BatchNorm2d decides
        return resfuse.ops.block_tail(self.conv(x), None if self.shortcut is None else self.shortcut(x), *stats,
                                      eps=1e-3, training=batch_stats, gate=self.gate if self.use_gate else None,
                                      relu=self.relu, backend=self.backend)

    def eager(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.use_gate:
            y = y * self.gate(y.mean((2, 3)))[:, :, None, None]
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return torch.relu(y) if self.relu else y


class EagerTail(nn.Module):
    """An SETail's torch-ops twin, as a module (what the README snippets' checks call ``eager``)."""

    def __init__(self, tail):
        super().__init__()
        self.tail = tail

    def forward(self, x):
        return self.tail.eager(x)
