"""PNG plots of a result file: speedup over eager per stage and provider, and a roofline chart.

matplotlib is optional (``pip install matplotlib``, or the ``bench`` extra): importing this module without it
raises ImportError, which the report turns into a message. Only matplotlib's object-oriented API is used, so
the plots never touch the caller's pyplot state or backend.
"""
from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .records import PROVIDER_ORDER, row_label, speedups
from .report import _providers, _sections

_COLORS = {p: c for p, c in zip(PROVIDER_ORDER, ("#555555", "#1f77b4", "#17becf", "#9467bd", "#d62728",
                                                 "#ff7f0e", "#2ca02c", "#8c564b", "#aec7e8", "#e377c2"))}
_MARKERS = {"conv_bn_act": "s", "bn_act": "v", "basicblock": "o", "bottleneck": "D", "models": "*"}


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def speedup_figure(data: dict) -> Figure:
    records = data["records"]
    up = speedups(records)
    sections = [(k, v) for k, v in _sections(records).items() if any(r["provider"] != "eager" for r in v)]
    cols = 2 if len(sections) > 1 else 1
    rows = max(1, math.ceil(len(sections) / cols))
    fig = Figure(figsize=(7 * cols, 3.4 * rows))
    for i, ((group, mode), recs) in enumerate(sections):
        ax = fig.add_subplot(rows, cols, i + 1)
        labels = list(dict.fromkeys(row_label(r) for r in recs))
        providers = [p for p in _providers(recs) if p != "eager"]
        width = 0.8 / max(len(providers), 1)
        for j, p in enumerate(providers):
            xs, ys = [], []
            for r in recs:
                if r["provider"] == p and up[id(r)]:
                    xs.append(labels.index(row_label(r)) + (j - (len(providers) - 1) / 2) * width)
                    ys.append(up[id(r)])
            ax.bar(xs, ys, width, label=p, color=_COLORS.get(p))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup over eager")
        first = recs[0]
        ax.set_title(f"{group}, {mode} (N={first['N']}, {first['dtype']})", fontsize=10)
        ax.legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"resfuse: speedup over eager, {meta.get('gpu') or 'CPU'}, {meta.get('date')}")
    fig.tight_layout()
    return fig


def roofline_figure(data: dict) -> Figure:
    records = [r for r in data["records"] if r.get("flops") and r.get("bytes")]
    ceilings = data["meta"].get("ceilings") or {}
    peak, bandwidth = ceilings.get("matmul_tflops"), ceilings.get("copy_gbps")
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    intensities = [r["flops"] / r["bytes"] for r in records] or [1.0]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    if peak and bandwidth:
        knee = peak * 1e12 / (bandwidth * 1e9)
        lo, hi = min(lo, knee / 4), max(hi, knee * 4)
        xs = [lo * (hi / lo) ** (k / 200) for k in range(201)]
        ax.plot(xs, [min(peak, x * bandwidth / 1e3) for x in xs], color="black", linewidth=1.2,
                label=f"roofline: {bandwidth:.0f} GB/s, {peak:.3g} TFLOP/s ({ceilings.get('matmul_dtype')})")
    seen = set()
    for r in records:
        p, group = r["provider"], ("models" if r["bench"].startswith("model:") else r["bench"])
        key = (p, group)
        ax.scatter(r["flops"] / r["bytes"], r["tflops"], color=_COLORS.get(p), marker=_MARKERS.get(group, "o"),
                   s=28, alpha=0.85, label=f"{p} / {group}" if key not in seen else None)
        seen.add(key)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, minimal traffic)")
    ax.set_ylabel("achieved TFLOP/s")
    meta = data["meta"]
    ax.set_title(f"resfuse roofline, {meta.get('gpu') or 'CPU'}, {meta.get('date')}", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    return fig


def write_plots(data: dict, base: str) -> list[str]:
    """Write ``<base>-speedup.png`` and ``<base>-roofline.png``; return their paths."""
    if not data.get("records"):
        return []
    return [_save(speedup_figure(data), base + "-speedup.png"), _save(roofline_figure(data), base + "-roofline.png")]
