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
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import randomize_bn_, resfuse

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
