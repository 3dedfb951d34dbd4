"""What the serving tests share: the README's snippets, converted models beside their eager twins, and a
separate serving process."""
from __future__ import annotations

import copy
import pathlib
import re
import subprocess
import sys
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import randn, randomize_bn_, resfuse

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


def resfuse_ops_run(fn, *args) -> int:
    """How many resfuse ops ``fn(*args)`` runs (eagerly)."""
    names = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.namespace)
            return func(*args, **(kwargs or {}))

    with _Record(), torch.no_grad():
        fn(*args)
    return names.count("resfuse")


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
