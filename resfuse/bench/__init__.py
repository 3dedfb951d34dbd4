"""``python -m resfuse.bench``: eager PyTorch, torch.compile, cuDNN's fused convolutions and resfuse's backends,
timed on the building blocks of ResNets on the device at hand (``--help`` for the presets and options).

- ``shapes``: the shape table (every ResNet-18/34/50 block shape), re-exported by ``benchmarks/shapes.py``.
- ``cases``: problems (bench x shape x mode x dtype, with their fp32 eager reference) and one runner per
  provider; the pytest-benchmark files in ``benchmarks/`` use the same ones.
- ``counting``: FLOPs and bytes from the shapes. ``timing``: medians after warm-up, and the ceilings.
- ``cli``: the command. ``report``: the markdown of a result file (``python -m resfuse.bench.report FILE``).
  ``plots``: its PNG plots (needs matplotlib).

The method is described in ``benchmarks/README.md``.
"""
from .cases import BENCHES, PROVIDERS, Unavailable, make_problem, make_runner, rel_err
from .cli import main, parse_args
from .shapes import BASICBLOCK_SHAPES, BOTTLENECK_SHAPES, OP_SHAPES, STAGES


def render_markdown(json_path: str) -> str:
    """The markdown report of a result file (see ``resfuse.bench.report``)."""
    from .report import render_markdown as render

    return render(json_path)


__all__ = ["main", "parse_args", "render_markdown", "make_problem", "make_runner", "rel_err", "Unavailable",
           "PROVIDERS", "BENCHES", "STAGES", "OP_SHAPES", "BASICBLOCK_SHAPES", "BOTTLENECK_SHAPES"]
