"""The markdown report (and plots) of a result file, generated from its JSON only.

    python -m resfuse.bench.report benchmarks/results/h100-80gb-hbm3-20261124.json   # rewrites the .md + .png

``render_markdown(json_path)`` returns the markdown; ``write_report(json_path)`` writes it beside the JSON as
``<stem>.md``, with the plots ``<stem>-speedup.png`` and ``<stem>-roofline.png`` when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .records import (PROVIDER_ORDER, achieved, fmt_mib, fmt_ms, group_of, provider_label, row_label,
                      speedups)

def _providers(records: list[dict]) -> list[str]:
    present = {r["provider"] for r in records}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _sections(records: list[dict]) -> dict:
    sections: dict = {}
    for r in records:
        sections.setdefault((group_of(r), r["mode"]), []).append(r)
    return sections


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def load(json_path: str) -> dict:
    with open(json_path) as f:
        return json.load(f)


def render_markdown(json_path: str) -> str:
    """The report of one result file: where and how it was measured, then per bench and mode a speedup table
    (median ms and speedup over eager per provider) and a detail table (rel_err, TFLOP/s or GB/s, roofline)."""
    data = load(json_path)
    meta, records = data["meta"], data.get("records", [])
    stem = os.path.splitext(os.path.basename(json_path))[0]
    title = meta.get("gpu") or f"CPU ({meta.get('cpu') or 'unknown'})"
    lines = [f"# resfuse benchmarks: {title}, {meta.get('date')}", "",
             f"Generated from `{stem}.json` by `python -m resfuse.bench.report`; do not edit by hand.", ""]
    if meta.get("complete") is False:
        lines += ["**Incomplete run**: the command stopped before its end; the tables hold what it measured.", ""]
    lines += [f"- command: `{meta.get('command')}`",
              f"- resfuse {meta.get('resfuse')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
              f"CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}, torchvision {meta.get('torchvision')}, "
              f"Python {meta.get('python')}",
              f"- device: {meta.get('device')}, {meta.get('cpu_threads')} CPU threads, "
              f"preset {meta.get('preset')}, {meta.get('wall_s')} s"]
    ceilings = meta.get("ceilings")
    if ceilings:
        lines.append(f"- ceilings measured in this run: copy {ceilings['copy_gbps']:.0f} GB/s, "
                     f"matmul {ceilings['matmul_tflops']:.3g} TFLOP/s ({ceilings['matmul_dtype']})")
    lines += ["", "Median of timed repetitions after warm-up; speedup = eager's median / the provider's, timed in "
              "the same run; rel_err = ||out - ref|| / ||ref|| against the same step in float64 on the same input "
              "(train: the largest over the output and the input gradients; models: the logits), which may be at "
              "most twice eager's own plus a floor (files from before this rule compared with fp32 eager); roofline = the "
              "time the measured ceilings allow for the row's FLOPs and bytes / the measured time; peak MiB = the "
              "most one call allocates on the GPU above what is resident before it (files from before this "
              "column show '-'); compile s = the first call (compilation, autotuning). Method: "
              "`benchmarks/README.md`.", ""]

    up = speedups(records)
    for (group, mode), rows in _sections(records).items():
        providers = _providers(rows)
        first = rows[0]
        lines += [f"## {group}, {mode}", "",
                  f"N={first['N']} ({'batch' if group == 'models' else 'images'}), {first['dtype']}, "
                  f"{first['layout']}. " + ("Images/s" if group == "models" else "Median ms") + " (speedup over eager):", ""]
        by_row: dict = {}
        for r in rows:
            by_row.setdefault(row_label(r), {})[r["provider"]] = r
        table = []
        for label, cells in by_row.items():
            row = [label]
            for p in providers:
                r = cells.get(p)
                if r is None:
                    row.append("-")
                    continue
                s = up[id(r)]
                value = f"{r['img_s']:.0f} img/s" if r.get("img_s") else fmt_ms(r["median_ms"])
                row.append(value + (f" ({s:.2f}x)" if s and p != "eager" else ""))
            table.append(row)
        lines += _table(["stage" if group != "models" else "model"] + providers, table) + [""]
        detail = []
        for r in rows:
            s = up[id(r)]
            extra = f", {r['img_s']:.0f} img/s" if r.get("img_s") else ""
            detail.append([row_label(r), provider_label(r),
                           fmt_ms(r["median_ms"]) + extra, f"{s:.2f}x" if s else "-",
                           "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}", achieved(r),
                           f"{100 * r['roofline_frac']:.0f}%" if r.get("roofline_frac") is not None else "-",
                           fmt_mib(r.get("peak_mib")),
                           "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"])
        lines += ["<details><summary>detail</summary>", ""]
        lines += _table(["stage", "provider", "ms", "vs eager", "rel_err", "achieved", "roofline", "peak MiB",
                         "compile s"], detail)
        lines += ["", "</details>", ""]

    skipped = data.get("skipped", [])
    if skipped:
        lines += ["## Skipped", ""]
        grouped: dict = {}
        for s in skipped:
            grouped.setdefault((s["provider"], s["reason"]), []).append(f"{s['bench']} {s['mode']}")
        for (provider, reason), where in grouped.items():
            lines.append(f"- `{provider}`: {reason} ({', '.join(sorted(set(where)))})")
        lines.append("")
    failed = data.get("failed", [])
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- {f['bench']} {f['mode']} {f['stage']} `{f['provider']}`: {f['error']}" for f in failed]
        lines.append("")
    plots = [(kind, f"{stem}-{kind}.png") for kind in ("speedup", "roofline")]
    plots = [(k, name) for k, name in plots if os.path.exists(os.path.join(os.path.dirname(json_path), name))]
    if plots:
        lines += ["## Plots", ""] + [f"![{kind}]({name})" for kind, name in plots] + [""]
    return "\n".join(lines)


def write_report(json_path: str, plots: bool = True, stream=None) -> list[str]:
    """Write ``<stem>.md`` (and the plots, when matplotlib is importable) beside ``json_path``; return the paths
    written."""
    stream = stream or sys.stdout
    base = os.path.splitext(json_path)[0]
    written = []
    if plots:
        try:
            from . import plots as plotting

            written += plotting.write_plots(load(json_path), base)
        except ImportError as exc:
            print(f"no plots: matplotlib is not installed ({exc}); pip install matplotlib", file=stream)
    with open(base + ".md", "w") as f:
        f.write(render_markdown(json_path))
    return [base + ".md"] + written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resfuse.bench.report",
                                     description="Regenerate the markdown report (and plots) of result files.")
    parser.add_argument("json", nargs="+", help="result files written by python -m resfuse.bench --out DIR")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    for path in args.json:
        print("wrote " + ", ".join(write_report(path, plots=not args.no_plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
