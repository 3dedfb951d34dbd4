"""The ``python -m resfuse.bench`` command: presets, the run loop, the progress bar, the table, the files."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from .. import __version__
from . import cases, shapes, timing
from .records import achieved, comparison_key, fmt_mib, fmt_ms, provider_label, speedups
from .cases import BENCH_MODES, DTYPES, LAYOUTS, PROVIDERS, Unavailable

BENCH_CHOICES = ("conv_bn_act", "bn_act", "basicblock", "bottleneck", "models")
PROVIDER_ALIASES = {"cuda": "resfuse_cuda", "triton": "resfuse_triton", "auto": "resfuse_auto",
                    "freezing": "compile_freezing", "cudnn": "cudnn_fused"}
CPU_PRESET_LEFT_OUT = {
    p: "not in the CPU preset: torch.compile takes minutes to compile on a small CPU (name it in --providers, or "
       "use --full)" for p in cases.COMPILED
}

DESCRIPTION = """\
Time eager PyTorch, torch.compile, cuDNN's fused convolutions and resfuse's backends on the building blocks of
ResNets, on the device at hand, and report median ms, speedup over eager, error against the fp32 eager
reference, achieved TFLOP/s or GB/s and the fraction of the roofline (ceilings measured in the same run).

Presets:
  GPU (default on a GPU, ~1-2 min): identity BasicBlock of each ResNet stage, eval + train, bf16
      channels_last, N=128, every provider available. Add --models resnet18,resnet50 for whole-model img/s.
  CPU (default without a GPU, well under a minute): BasicBlocks of each stage and the two fused ops, fp32,
      N=2: eager vs resfuse's CPU kernels.
  --full: every bench (conv_bn_act, bn_act, basicblock, bottleneck, models), every ResNet-18/34/50 block
      shape (identity and downsampling), resnet18/34/50, every provider.
"""

EPILOG = """\
examples:
  python -m resfuse.bench                                  # the preset of this machine
  python -m resfuse.bench --models resnet18,resnet50       # + whole-model eval and train-step img/s
  python -m resfuse.bench --full --out benchmarks/results  # everything, as JSON + markdown + plots
  python -m resfuse.bench --bench bottleneck --stages 64,C1024_H14 --providers eager,cuda --mode eval
  python -m resfuse.bench.report benchmarks/results/FILE.json   # regenerate the markdown and plots
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m resfuse.bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every bench, shape, model and provider")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--mode", choices=["eval", "train", "both"], default="both")
    p.add_argument("--providers", "--backends", dest="providers", default=None,
                   help="comma-separated providers: " + ", ".join(PROVIDERS) + " (cuda, triton, auto stand for "
                   "resfuse_*); eager, the baseline, is always timed. Default: every provider.")
    p.add_argument("--bench", default=None,
                   help="comma-separated benches: " + ", ".join(BENCH_CHOICES) +
                   " (default: basicblock on a GPU, basicblock,conv_bn_act,bn_act on CPU; all with --full)")
    p.add_argument("--stages", default=None,
                   help="comma-separated stages: planes (64,128,256,512), layer1..layer4 or stage names "
                   "(C64_H56, C256_H56_down). Default: all; without --full only identity blocks unless a _down "
                   "stage is named")
    p.add_argument("--models", default=None,
                   help="comma-separated models to time whole: torchvision's " + ", ".join(shapes.MODELS) +
                   " or timm:<name> (e.g. timm:resnet50d; random weights); adds the models bench")
    p.add_argument("--batch", type=int, default=None, help="N of the ops and blocks (default: 128 GPU, 2 CPU)")
    p.add_argument("--model-batch", type=int, default=None, help="batch of the models (default: 256 GPU, 2 CPU)")
    p.add_argument("--resolution", type=int, default=None, help="models' input size (default: 224 GPU, 64 CPU)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="channels_last")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions per case (default: as many as fit 0.25 s on a GPU, 25..500; "
                   "0.1 s on CPU, 3..20)")
    p.add_argument("--rounds", type=int, default=None,
                   help="the providers of one comparison are timed round-robin: each one's repetitions in this many "
                   "slices, interleaved with the others' (default: 10 on a GPU, 3 on CPU; 1: one after another)")
    p.add_argument("--out", default=None, help="folder for <device>-<YYYYMMDD>[-<tag>].json, .md and plots")
    p.add_argument("--tag", default=None, help="suffix of the result file name")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="keep torch.backends.cudnn.benchmark off (default on a GPU: on, so every provider's ATen and "
                   "cuDNN convolutions run the algorithm cuDNN measures fastest; the search is part of warm-up)")
    args = p.parse_args(argv)
    try:
        resolve(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _split(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def resolve(args: argparse.Namespace) -> None:
    """Fill in the preset's defaults and check the names."""
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    on_gpu = args.device.type == "cuda"
    args.preset = "full" if args.full else ("gpu" if on_gpu else "cpu")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.batch = args.batch or (128 if on_gpu else 2)
    args.model_batch = args.model_batch or (256 if on_gpu else 2)
    args.resolution = args.resolution or (224 if on_gpu else 64)

    models = _split(args.models)
    for m in models:
        cases.check_model_name(m)
    benches = _split(args.bench)
    for b in benches:
        if b not in BENCH_CHOICES:
            raise ValueError(f"unknown bench {b!r}: expected one of {', '.join(BENCH_CHOICES)}")
    if not benches:
        if args.full:
            benches = list(BENCH_CHOICES)
        else:
            benches = ["basicblock"] if on_gpu else ["basicblock", "conv_bn_act", "bn_act"]
    if models and "models" not in benches:
        benches.append("models")
    if "models" in benches and not models:
        models = list(shapes.MODELS) if args.full else ["resnet18", "resnet50"]
    args.benches, args.model_names = benches, models

    named = []
    for name in _split(args.providers):
        name = PROVIDER_ALIASES.get(name, name)
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}: expected one of {', '.join(PROVIDERS)}")
        named.append(name)
    args.provider_names = ["eager"] + [p for p in dict.fromkeys(named or PROVIDERS) if p != "eager"]
    # providers the preset leaves out (only when none were named)
    args.left_out = {}
    if not named and not args.full and not on_gpu:
        args.left_out = dict(CPU_PRESET_LEFT_OUT)

    tokens = _split(args.stages)
    valid = set(shapes.stage_tokens())
    for t in tokens:
        if t not in valid:
            raise ValueError(f"unknown stage {t!r}: expected planes, layer1..4 or one of "
                             f"{', '.join(s for s in shapes.stage_tokens() if s.startswith('C'))}")
    args.stage_tokens = tokens
    args.identity_only = not args.full and not any(t.endswith("_down") for t in tokens)
    args.modes = ["eval", "train"] if args.mode == "both" else [args.mode]


@dataclass
class Item:
    bench: str  # cases.BENCHES
    shape: object
    mode: str
    batch: int


def plan(args: argparse.Namespace) -> list[Item]:
    items = []
    for bench in args.benches:
        if bench == "models":
            items += [Item("model", m, mode, args.model_batch) for m in args.model_names for mode in args.modes]
            continue
        if bench in ("conv_bn_act", "bn_act"):
            selected = shapes.select(shapes.OP_SHAPES, args.stage_tokens)
        else:
            selected = shapes.select(shapes.block_shapes(bench), args.stage_tokens, args.identity_only)
        for mode in args.modes:
            if mode in BENCH_MODES[bench]:
                items += [Item(bench, s, mode, args.batch) for s in selected]
    return items


# ---------------------------------------------------------------------------------------------------------
# progress on stderr


class Progress:
    """tqdm when installed; else a text bar redrawn in place on a terminal, or one line per case in a log."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=self.stream, unit="case", dynamic_ncols=True, leave=False)
            except Exception:
                self.bar = None
        self.last_label = None

    def step(self, label: str, provider: str) -> None:
        """Announce the case about to run."""
        if self.bar is not None:
            self.bar.set_description_str(f"{label} {provider}")
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s "
                    f"{label} {provider}")
            self.stream.write(line[:119].ljust(119))
            self.stream.flush()
        elif label != self.last_label:
            self.stream.write(f"[{self.done:>3}/{self.total}] {elapsed:5.0f}s {label}\n")
            self.stream.flush()
        self.last_label = label

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            self.stream.write("\r" + " " * 119 + "\r")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------------------
# records


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def make_record(problem: cases.Problem, provider: str, result: timing.Timing, err: Optional[float],
                ceilings: timing.Ceilings, runner: cases.Runner, limit: Optional[float] = None) -> dict:
    ms = result.median_ms
    seconds = ms * 1e-3
    t_compute = problem.flops / (ceilings.matmul_tflops * 1e12)
    t_memory = problem.bytes / (ceilings.copy_gbps * 1e9)
    record = problem.base_record()
    record.update({
        "provider": provider, "median_ms": _sig(ms), "rel_err": None if err is None else _sig(err, 3),
        "max_rel_err": None if limit is None else _sig(limit, 3),
        "flops": problem.flops, "bytes": problem.bytes,
        "tflops": _sig(problem.flops / seconds / 1e12), "gbps": _sig(problem.bytes / seconds / 1e9),
        "bound": "compute" if t_compute >= t_memory else "memory",
        "roofline_frac": _sig(max(t_compute, t_memory) / seconds, 3),
        "compile_s": round(result.first_call_s, 2) if runner.compiles else None,
        "repeats": result.repeats, "backend": runner.backend,
        "peak_mib": None if result.peak_bytes is None else _sig(result.peak_bytes / 2**20),
    })
    if problem.kind == "model":
        record["img_s"] = _sig(problem.n / seconds)
    if runner.converted:
        record["convert"] = runner.converted
    return record


def _git_sha() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, cwd=here, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def _resfuse_env() -> str:
    """The RESFUSE_* settings of this run (backend, CUDA conv kernel) as a command prefix: they change what runs."""
    return "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(os.environ.items()) if k.startswith("RESFUSE_"))


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, which CPU result files must give (Linux: /proc/cpuinfo's "model name"); elsewhere
    what ``platform`` knows."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(argv: list[str], args: argparse.Namespace) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except Exception:
        torchvision_version = None
    on_gpu = args.device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(args.device) if on_gpu else None,
        "cpu": cpu_name(),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "resfuse": _git_sha() or __version__, "date": datetime.date.today().isoformat(),
        "command": _resfuse_env() + "python -m resfuse.bench" + (" " + shlex.join(argv) if argv else ""),
        "torchvision": torchvision_version, "python": platform.python_version(),
        "device": str(args.device), "cpu_threads": torch.get_num_threads(), "preset": args.preset,
    }


def _slug(text: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in text.lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    slug = slug.strip("-")
    return slug[len("nvidia-"):] if slug.startswith("nvidia-") else slug


def result_stem(meta: dict, tag: Optional[str]) -> str:
    """``<gpu-slug>-<YYYYMMDD>[-<tag>]`` (``cpu-...`` without a GPU), the name RESULTS.md asks for."""
    name = f"{_slug(meta['gpu'] or 'cpu')}-{meta['date'].replace('-', '')}"
    return name + (f"-{_slug(tag)}" if tag else "")


# ---------------------------------------------------------------------------------------------------------
# the terminal table


def text_table(records: list[dict]) -> str:
    header = ["bench", "mode", "stage", "N", "provider", "ms", "vs eager", "rel_err", "achieved", "roofline",
              "peak MiB", "compile s"]
    up = speedups(records)
    rows, previous = [], None
    for r in records:
        key = comparison_key(r)
        first = key != previous
        previous = key
        s = up[id(r)]
        rows.append([r["bench"] if first else "", r["mode"] if first else "", r["stage"] if first else "",
                     str(r["N"]) if first else "", provider_label(r),
                     fmt_ms(r["median_ms"]) + (f" ({r['img_s']:.0f} img/s)" if r.get("img_s") else ""),
                     f"{s:.2f}x" if s else "-",
                     "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}", achieved(r),
                     f"{100 * r['roofline_frac']:.0f}%", fmt_mib(r.get("peak_mib")),
                     "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {3, 5, 6, 7, 8, 9, 10, 11}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def summarize_skips(skipped: list[dict]) -> list[str]:
    grouped: dict = {}
    for s in skipped:
        grouped.setdefault((s["provider"], s["reason"]), set()).add(f"{s['bench']} {s['mode']}")
    return [f"  {provider}: {reason} [{', '.join(sorted(where))}]" for (provider, reason), where in grouped.items()]


# ---------------------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    env = environment(argv, args)
    items = plan(args)
    device = args.device
    print(f"resfuse {env['resfuse']} | torch {env['torch']} | {env['gpu'] or 'CPU ' + env['cpu']} | preset "
          f"{args.preset} | {args.dtype} {args.layout} | providers: {', '.join(args.provider_names)}", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    ceilings = timing.measure_ceilings(device, DTYPES[args.dtype])
    env["ceilings"] = ceilings.as_dict()
    print(f"ceilings, measured now: copy {ceilings.copy_gbps:.0f} GB/s, matmul {ceilings.matmul_tflops:.3g} TFLOP/s "
          f"({ceilings.matmul_dtype})", flush=True)
    data = {"meta": env, "records": [], "skipped": [], "failed": []}
    budget = timing.Budget.for_device(device, args.repeats, args.rounds)
    env["rounds"] = budget.rounds
    progress = Progress(len(items) * len(args.provider_names))
    started = time.perf_counter()
    out_json = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out_json = os.path.join(args.out, result_stem(env, args.tag) + ".json")

    def where(item) -> dict:
        return {"bench": cases.bench_name(item.bench, item.shape), "mode": item.mode,
                "stage": f"{args.resolution}px" if item.bench == "model" else item.shape.stage}

    for item in items:
        label = " ".join(where(item).values())
        problem = None
        try:
            problem = cases.make_problem(item.bench, item.shape, item.mode, item.batch, device, args.dtype,
                                         args.layout, args.resolution)
            expected, limit = problem.reference64(), problem.accuracy_limit()
        except Unavailable as exc:
            for provider in args.provider_names:
                data["skipped"].append({**where(item), "provider": provider, "reason": str(exc)})
                progress.advance()
            continue
        except Exception as exc:
            _report_failure(data, where(item), "(setup)", exc)
            for _ in args.provider_names:
                progress.advance()
            continue
        # every provider of the comparison is built first, then all are timed together, round-robin
        if any(p in cases.COMPILED for p in args.provider_names):
            torch._dynamo.reset()  # no compiled graph of an earlier problem is reused
        runners: dict = {}
        for provider in args.provider_names:
            progress.step(label, provider)
            reason = args.left_out.get(provider) or cases.provider_unavailable(problem, provider)
            try:
                if reason is None:
                    runners[provider] = cases.make_runner(problem, provider, reset_compiler=False)
            except Unavailable as exc:
                reason = str(exc)
            except Exception as exc:
                _report_failure(data, where(item), provider, exc)
            if reason is not None:
                data["skipped"].append({**where(item), "provider": provider, "reason": reason})
        progress.step(label, "timing " + ",".join(runners))
        try:
            results = timing.time_round_robin({p: r.step for p, r in runners.items()}, device, budget)
            for provider, result in results.items():
                if isinstance(result, BaseException):
                    _report_failure(data, where(item), provider, result)
                    continue
                err = cases.rel_err(result.outputs, expected)
                runner = runners[provider]
                if runner.describe is not None:
                    runner.backend = runner.describe()
                data["records"].append(make_record(problem, provider, result, err, ceilings, runner, limit))
                if err is None or not err <= limit:  # a NaN error fails too
                    data["failed"].append({**where(item), "provider": provider,
                                           "error": f"wrong numbers: rel_err {err} against float64, more than "
                                                    f"twice eager's own error allows ({limit:.3g})"})
        finally:
            for runner in runners.values():
                runner.close()
            runners = results = None
        for _ in args.provider_names:
            progress.advance()
        problem.free()
        _release(device)
        if out_json:  # after every comparison, so a run cut short keeps what it measured
            env["wall_s"] = round(time.perf_counter() - started, 1)
            env["complete"] = False
            _write_json(out_json, data)
    progress.close()
    env["wall_s"] = round(time.perf_counter() - started, 1)
    env["complete"] = True
    data["path"] = out_json
    return data


def _report_failure(data: dict, where: dict, provider: str, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    data["failed"].append({**where, "provider": provider, "error": message})
    print(f"\nFAILED {where['bench']} {where['mode']} {where['stage']} {provider}:", file=sys.stderr)
    traceback.print_exception(type(exc), exc, exc.__traceback__, limit=-4, file=sys.stderr)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write_json(path: str, data: dict) -> None:
    payload = {k: v for k, v in data.items() if k != "path"}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    data = run(args, argv)
    records = data["records"]
    print()
    print(text_table(records) if records else "(no measurements)")
    if data["skipped"]:
        print("\nskipped (provider: reason [where]):")
        print("\n".join(summarize_skips(data["skipped"])))
    if data["failed"]:
        print("\nFAILED:")
        print("\n".join(f"  {f['bench']} {f['mode']} {f['stage']} {f['provider']}: {f['error']}"
                        for f in data["failed"]))
    print(f"\n{data['meta']['wall_s']:.0f} s in all; speedups against eager in the same run, rel_err against "
          "the same step in float64, roofline: time at the measured ceilings / measured time")
    if data["path"]:
        from . import report

        _write_json(data["path"], data)
        written = [data["path"]] + report.write_report(data["path"], plots=not args.no_plots)
        print("wrote " + ", ".join(written))
    return 1 if data["failed"] else 0
