"""What ``python -m resfuse.bench.gpu_check`` reports: the results read back from its folder, ``summary.md``, the
dry run's plan, and the packing of OUT_DIR (at most 8 files of at most 16 MiB; the rest in one tarball).

``collect`` reads the step's files (the environment probe, JUnit XML, the benches' result JSON, the profile);
``render_summary`` turns what it read into markdown and reads nothing itself, so the summary of any run can be
rendered again from its ``gpu_check.json``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import tarfile
import xml.etree.ElementTree as ET
from typing import Optional

from .records import comparison_key, fmt_ms, group_of, row_label

ENVIRONMENT = "environment.json"
PROFILE = "profile.txt"
BLOCKS_TAG = "gpucheck-blocks"
MODELS_TAG = "gpucheck-models"
SUMMARY = "summary.md"
DATA = "gpu_check.json"
TARBALL = "gpu_check.tar.gz"
MAX_FILES = 8  # what can be brought back from a lent machine
MAX_BYTES = 16 * 2**20

# The key ratios: each resfuse provider against the baselines a user would otherwise pick (eval: cuDNN's fused
# convs and Inductor with freezing; train: eager and torch.compile; both: torch.compile with CUDA graphs).
RESFUSE_PROVIDERS = ("resfuse_cuda", "resfuse_auto", "resfuse_triton", "resfuse_compile",
                     "resfuse_compile_cudagraphs")
BASELINES = {"eval": ("cudnn_fused", "compile_freezing", "compile_cudagraphs"),
             "train": ("eager", "compile", "compile_cudagraphs")}
FAILED_LISTED = 40  # failing tests named in the summary (all are in the JUnit files of the tarball)
LOG_TAIL_LINES = 15  # of each command that failed, in the summary


# ---------------------------------------------------------------------------------------------------------
# on the GPU machine, after the build


def probe(path: str) -> None:
    """Write what the run is measuring with (GPU, versions, what the extension was built with) to ``path``."""
    import platform

    import torch

    import resfuse
    from resfuse import _loader

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                  "gpu": None, "extension_error": _loader.extension_error}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cudnn"] = torch.backends.cudnn.version()
        info["backends"] = resfuse.available_backends("cuda")
    for name in ("triton", "torchvision", "timm"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:
            info[name] = f"not importable ({type(exc).__name__})"
    ext = _loader.extension
    if ext is not None:
        info.update(with_cuda=bool(ext.with_cuda()), cuda_version=ext.cuda_version(),
                    with_cutlass=bool(ext.with_cutlass()), sm90_build_reason=ext.sm90_build_reason())
        if ext.with_cuda():
            info["cuda_arch_list"] = ext.cuda_arch_list()
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------------------
# reading the results


def junit_counts(path: str) -> Optional[dict]:
    """Counts and failing test ids from a JUnit XML file (None when pytest wrote none: it was killed)."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failing = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failing"] = failing
    return counts


def selected_count(log_path: Optional[str]) -> Optional[int]:
    """How many tests pytest selected, from its log (xdist: ``8 workers [N items]``; else ``collected N``)."""
    if not log_path or not os.path.exists(log_path):
        return None
    with open(log_path, errors="replace") as f:
        text = f.read()
    m = re.search(r"workers \[(\d+) items?\]", text) or re.search(r"collected (\d+) items?", text)
    if m is None:
        return None
    deselected = re.search(r"(\d+) deselected", text)
    selected = int(m.group(1))
    return selected - int(deselected.group(1)) if deselected and "collected" in m.group(0) else selected


def bench_file(work: str, tag: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(work, f"*-{tag}.json")))
    return found[-1] if found else None


PROFILE_LINE = re.compile(r"^(?P<where>.+ (?P<stage>C\d+_H\d+) N=\d+ \S+ (?P<provider>\S+)): kernels "
                          r"(?P<kernels>[\d.]+) ms in (?P<launches>\d+) launches, wall (?P<wall>[\d.]+) ms")
PROFILE_OTHER = re.compile(r"^(?P<where>.+ (?P<stage>C\d+_H\d+) N=\d+ \S+ (?P<provider>\S+)): "
                           r"(?P<what>skipped|FAILED) ?(?P<why>.*)$")


def profile_rows(path: str) -> list:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, errors="replace") as f:
        for line in f:
            m = PROFILE_LINE.match(line.strip())
            if m:
                rows.append({"stage": m["stage"], "provider": m["provider"], "kernels_ms": float(m["kernels"]),
                             "launches": int(m["launches"]), "wall_ms": float(m["wall"])})
                continue
            m = PROFILE_OTHER.match(line.strip())
            if m:
                rows.append({"stage": m["stage"], "provider": m["provider"], "note": f"{m['what']} {m['why']}"})
    return rows


def collect(work: str, steps: list) -> dict:
    """Everything the summary shows, read from the run's folder. ``steps``: the run's steps as dicts."""
    results: dict = {"environment": None, "tests": [], "benches": {}, "profile": []}
    path = os.path.join(work, ENVIRONMENT)
    if os.path.exists(path):
        with open(path) as f:
            results["environment"] = json.load(f)
    for step in steps:
        if step["name"] != "tests":
            continue
        for cmd in step["commands"]:
            junit = next((a.split("=", 1)[1] for a in cmd["argv"] if a.startswith("--junitxml=")), None)
            counts = junit_counts(junit) if junit else None
            results["tests"].append({"name": cmd["name"], "counts": counts, "selected": selected_count(cmd["log"]),
                                     "rc": cmd["rc"], "timed_out": cmd["timed_out"], "ran": cmd["rc"] is not None})
    for tag in (BLOCKS_TAG, MODELS_TAG):
        path = bench_file(work, tag)
        if path:
            with open(path) as f:
                data = json.load(f)
            results["benches"][tag] = {"file": os.path.basename(path), "meta": data.get("meta", {}),
                                       "records": data.get("records", []), "failed": data.get("failed", []),
                                       "skipped": len(data.get("skipped", []))}
    results["profile"] = profile_rows(os.path.join(work, PROFILE))
    results["log_tails"] = {f"{step['name']}/{cmd['name']}": log_tail(cmd["log"])
                            for step in steps for cmd in step["commands"] if cmd["rc"] not in (None, 0)}
    return results


def log_tail(path: Optional[str], lines: int = LOG_TAIL_LINES) -> str:
    if not path or not os.path.exists(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:]).rstrip()


def key_ratios(records: list) -> dict:
    """(group, mode) -> rows {label, provider, ms, img_s, ratios: {baseline: its median / this median}}: above 1,
    the resfuse provider is faster than the baseline, timed in the same comparison."""
    medians = {(comparison_key(r), r["provider"]): r["median_ms"] for r in records}
    tables: dict = {}
    for r in records:
        if r["provider"] not in RESFUSE_PROVIDERS:
            continue
        ratios = {}
        for baseline in BASELINES[r["mode"]]:
            base = medians.get((comparison_key(r), baseline))
            ratios[baseline] = base / r["median_ms"] if base and r["median_ms"] else None
        tables.setdefault((group_of(r), r["mode"]), []).append(
            {"label": row_label(r), "provider": r["provider"], "ms": r["median_ms"], "img_s": r.get("img_s"),
             "ratios": ratios})
    return tables


# ---------------------------------------------------------------------------------------------------------
# the summary


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _environment_lines(env: Optional[dict], run: dict) -> list:
    if not env:
        return ["- environment: not known (the probe step failed: its log is below)"]
    lines = [f"- {env.get('gpu') or 'no GPU visible'} (sm {env.get('capability')}), torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, triton {env.get('triton')}, torchvision "
             f"{env.get('torchvision')}, timm {env.get('timm')}, Python {env.get('python')}"]
    if env.get("extension_error"):
        lines.append(f"- **extension not loaded**: {env['extension_error']}")
    else:
        lines.append(f"- extension: CUDA kernels {'yes' if env.get('with_cuda') else '**no**'} (CUDA "
                     f"{env.get('cuda_version')}, architectures {env.get('cuda_arch_list')}); backends on the GPU: "
                     f"{', '.join(env.get('backends') or [])}")
        if env.get("with_cutlass"):
            lines.append("- CUTLASS: the sm90 conv is built in")
        else:
            given = run.get("cutlass_wheels")
            lines.append("- CUTLASS: **the build left out the sm90 conv** ("
                         + (f"wheel folder {given}" if given else "no nvidia-cutlass wheel folder was given: "
                            "--cutlass-wheels DIR or RESFUSE_CUTLASS_WHEELS") + f"; {env.get('sm90_build_reason')})")
    return lines


def _tests_lines(tests: list) -> list:
    if not tests:
        return ["Not run."]
    rows, failing = [], []
    for t in tests:
        c = t["counts"]
        state = "not run" if not t["ran"] else ("cut at its time limit" if t["timed_out"] else f"exit {t['rc']}")
        if c is None:
            rows.append([t["name"], t["selected"] or "?", "?", "?", "?", "?", state + " (no JUnit file)"])
            continue
        rows.append([t["name"], t["selected"] or "?", c["passed"], c["failures"], c["errors"], c["skipped"], state])
        failing += c["failing"]
    lines = _table(["run", "selected", "passed", "failed", "errors", "skipped", "status"], rows)
    if failing:
        lines += ["", f"Failing ({len(failing)}):", ""] + [f"- `{name}`" for name in failing[:FAILED_LISTED]]
        if len(failing) > FAILED_LISTED:
            lines.append(f"- ... and {len(failing) - FAILED_LISTED} more (JUnit files in the tarball)")
    return lines


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _bench_lines(bench: Optional[dict], what: str) -> list:
    if bench is None:
        return [f"No result file: the {what} bench did not run or wrote nothing."]
    meta = bench["meta"]
    lines = [f"`{bench['file']}` ({len(bench['records'])} records, {bench['skipped']} skipped cases"
             + (", **cut at its time limit**: the problems it did not reach are missing" if meta.get("complete")
                is False else "") + f"; {meta.get('wall_s')} s)."]
    for (group, mode), rows in key_ratios(bench["records"]).items():
        baselines = BASELINES[mode]
        lines += ["", f"**{group}, {mode}**: baseline's median / resfuse's (above 1: resfuse is faster)", ""]
        body = []
        for row in rows:
            value = fmt_ms(row["ms"]) + (f" ({row['img_s']:.0f} img/s)" if row.get("img_s") else "")
            body.append([row["label"], row["provider"], value] + [_ratio(row["ratios"][b]) for b in baselines])
        lines += _table(["", "resfuse", "ms"] + [f"vs {b}" for b in baselines], body)
    if bench["failed"]:
        lines += ["", "Failed:", ""] + [f"- {f['bench']} {f['mode']} {f['stage']} `{f['provider']}`: {f['error']}"
                                        for f in bench["failed"]]
    return lines


def _profile_lines(rows: list) -> list:
    if not rows:
        return ["No profile (the step did not run, or printed nothing)."]
    body = []
    for r in rows:
        if "note" in r:
            body.append([r["stage"], r["provider"], r["note"], "", "", ""])
        else:
            body.append([r["stage"], r["provider"], f"{r['kernels_ms']:.3f}", r["launches"], f"{r['wall_ms']:.3f}",
                         f"{r['wall_ms'] / r['kernels_ms']:.2f}" if r["kernels_ms"] else "-"])
    return ["Training step, per iteration: the GPU kernels' sum and the wall time back to back (a wall well "
            "above the kernels: the host is the limit).", ""] + \
        _table(["stage", "provider", "kernels ms", "launches", "wall ms", "wall / kernels"], body)


def _command_state(c: dict) -> str:
    if c["rc"] is None:
        return "not run"
    return f"exit {c['rc']}{' (cut at its limit)' if c['timed_out'] else ''}, {c['seconds']:.0f} s"


def render_summary(data: dict) -> str:
    run, steps, results = data["run"], data["steps"], data.get("results") or {}
    env = results.get("environment")
    title = (env or {}).get("gpu") or "GPU machine"
    lines = [f"# gpu_check: {title}", "",
             f"`{' '.join(run['argv'])}`: {run['mode']} run, budget {run['budget_s']:.0f} s, "
             f"{run.get('elapsed_s', 0):.0f} s elapsed. Written by `python -m resfuse.bench.gpu_check`.", ""]
    lines += _environment_lines(env, run) + [""]
    lines += ["## Steps", ""]
    body = []
    for s in steps:
        cmds = "; ".join(f"{c['name']}: {_command_state(c)}" for c in s["commands"])
        body.append([s["name"], s["status"], "-" if s["seconds"] is None else f"{s['seconds']:.0f}",
                     "-" if s["limit_s"] is None else f"{s['limit_s']:.0f}", cmds])
    lines += _table(["step", "status", "s", "limit s", "commands"], body) + [""]
    names = {s["name"] for s in steps}
    if "tests" in names:
        lines += ["## Tests", ""] + _tests_lines(results.get("tests", [])) + [""]
    benches = results.get("benches", {})
    if "blocks" in names:
        lines += ["## Blocks", ""] + _bench_lines(benches.get(BLOCKS_TAG), "blocks") + [""]
    if "models" in names:
        lines += ["## Models", ""] + _bench_lines(benches.get(MODELS_TAG), "models") + [""]
    if "profile" in names:
        lines += ["## Profile", ""] + _profile_lines(results.get("profile", [])) + [""]
    tails = results.get("log_tails") or {}
    if tails:
        lines += ["## Logs of what failed", ""]
        for name, tail in tails.items():
            lines += [f"<details><summary>{name}: last lines</summary>", "", "```", tail, "```", "", "</details>",
                      ""]
    files = data.get("files")
    if files:
        lines += ["## Files", "", f"In OUT_DIR: {', '.join(files['top'])}. Everything else, logs included, is in "
                  f"`{TARBALL}`."]
        if files["left_out"]:
            lines.append(f"Left out of the tarball to keep it under {MAX_BYTES >> 20} MiB: "
                         + ", ".join(files["left_out"]))
        lines.append("")
    return "\n".join(lines)


def write_summary(out: str, data: dict) -> str:
    text = render_summary(data)
    with open(os.path.join(out, SUMMARY), "w") as f:
        f.write(text)
    with open(os.path.join(out, DATA), "w") as f:
        json.dump(data, f, indent=1, default=str)
    return text


# ---------------------------------------------------------------------------------------------------------
# OUT_DIR


def pack(out: str, work: str, work_name: str) -> dict:
    """Put every file of ``work`` into ``out/TARBALL`` (the largest left out until it is under MAX_BYTES),
    then move the benches' result files into ``out`` beside the two summary files, MAX_FILES in all, and
    delete ``work``. Returns {top: the files left in out, left_out: what the tarball could not hold}."""
    files = sorted((os.path.join(dp, f) for dp, _, fs in os.walk(work) for f in fs), key=os.path.getsize)
    tarball = os.path.join(out, TARBALL)
    left_out: list = []
    while True:
        with tarfile.open(tarball, "w:gz") as tar:
            for path in files:
                tar.add(path, arcname=os.path.join(work_name, os.path.relpath(path, work)))
        if os.path.getsize(tarball) <= MAX_BYTES or not files:
            break
        left_out.append(os.path.relpath(files.pop(), work))
    top = [SUMMARY, DATA]
    wanted = []
    for tag in (BLOCKS_TAG, MODELS_TAG):
        path = bench_file(work, tag)
        if path:
            stem = path[:-len(".json")]
            wanted += [stem + ".json", stem + ".md"]
    path = bench_file(work, BLOCKS_TAG)
    if path:
        wanted.append(path[:-len(".json")] + "-speedup.png")
    for path in wanted:
        if len(top) >= MAX_FILES - 1:
            break
        if os.path.exists(path) and os.path.getsize(path) <= MAX_BYTES:
            shutil.move(path, os.path.join(out, os.path.basename(path)))
            top.append(os.path.basename(path))
    shutil.rmtree(work)
    return {"top": top + [TARBALL], "left_out": left_out}


# ---------------------------------------------------------------------------------------------------------
# the dry run


def render_plan(data: dict) -> str:
    run = data["run"]
    lines = [f"# gpu_check plan ({run['mode']}, budget {run['budget_s']:.0f} s): dry run, nothing built or timed",
             "", f"Repository root: `{run['root']}`; pytest-xdist workers: {run['workers']}; CUTLASS wheels: "
             f"{run['cutlass_wheels'] or 'none given'}.", "", "## Steps", ""]
    for s in data["steps"]:
        limit = (f"at most {s['fixed_s']:.0f} s" if s.get("fixed_s")
                 else f"{s['share']:.0%} of the time left when it starts")
        lines.append(f"- **{s['name']}** ({limit}): {s['what']}")
        for c in s["commands"]:
            env = "".join(f"{k}={v} " for k, v in c["env"].items())
            redirect = f" > {c['stdout']}" if c["stdout"] else ""
            lines.append(f"  - {c['name']}: `{env}{shlex.join(c['argv'])}{redirect}`")
    lines += ["", "## Checks", ""]
    for c in data["checks"]:
        lines.append(f"- {'ok' if c['ok'] else '**FAILED**'} {c['check']}: {c['detail']}")
    return "\n".join(lines) + "\n"
