"""``python -m resfuse.bench``: eager vs resfuse ResNet-18 BasicBlocks on the device at hand.

Times an identity BasicBlock at each ResNet-18 stage (C64@56², C128@28², C256@14², C512@7²) in eval
(no-grad forward) and train (forward + backward) mode, for the eager reference block and every fused resfuse
backend available on the device, and prints a table: median ms, speedup over eager, and the relative error
against the fp32 eager block on the same input. ``--out DIR`` also writes the run as JSON (the format of
``benchmarks/results``) and a markdown table generated from it.

Defaults: a GPU if one is visible (bf16, N=128), else the CPU (fp32, N=4, about half a minute).
Method: warm-up outside the timed region; the median of ``--repeats`` timings, CUDA events on a GPU and
``time.perf_counter`` on the CPU; every provider timed in this one process.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

import resfuse
from resfuse import reference

STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resfuse.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--mode", choices=["eval", "train", "both"], default="both")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on a GPU, 4 on the CPU")
    parser.add_argument("--stages", default=None,
                        help="comma-separated channel counts of the stages to run, e.g. 64,512 (default: all)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated resfuse backends (default: every fused one available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 50 GPU, 5 CPU)")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--out", default=None, help="folder for the JSON record and its markdown table")
    return parser.parse_args(argv)


def _time_cuda(fn: Callable[[], None], repeats: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    # a large buffer to overwrite between repetitions, so the L2 cache does not flatter small shapes
    flush = torch.empty(64 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for i in range(repeats):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_cpu(fn: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], None], device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        return statistics.median(_time_cuda(fn, repeats))
    return statistics.median(_time_cpu(fn, repeats))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        def run():
            with torch.no_grad():
                block(x)
        return run

    def run():
        x.grad = None
        block(x).backward(grad)
    return run


def bench_stage(channels: int, size: int, args, device: str, dtype: torch.dtype, train: bool,
                backends: list[str]) -> list[dict]:
    torch.manual_seed(0)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    eager = reference.BasicBlock(channels, channels).to(device, memory_format=fmt).train(train)
    x32 = torch.randn(args.batch, channels, size, size, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        expected = copy.deepcopy(eager)(x32)
    x = x32.to(dtype).requires_grad_(train)
    grad = torch.randn_like(x)
    providers: list[tuple[str, torch.nn.Module]] = [("eager", eager.to(dtype))]
    for backend in backends:
        providers.append((f"resfuse_{backend}", resfuse.convert(copy.deepcopy(eager), backend=backend)))

    records = []
    for name, block in providers:
        with torch.no_grad():
            err = _rel_err(copy.deepcopy(block).train(train)(x.detach()), expected)
        ms = median_ms(_step(block, x, grad, train), device, args.repeats, warmup=args.warmup)
        records.append({
            "bench": "basicblock", "mode": "train" if train else "eval", "stage": f"C{channels}_H{size}",
            "N": args.batch, "C": channels, "H": size, "W": size, "stride": 1,
            "dtype": args.dtype, "layout": args.layout, "provider": name,
            "median_ms": round(ms, 4), "rel_err": float(f"{err:.3g}"),
        })
    return records


def environment(argv) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except Exception:
        sha = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "resfuse": sha or resfuse.__version__, "date": datetime.date.today().isoformat(),
        "command": "python -m resfuse.bench " + " ".join(argv),
    }


def markdown_table(records: list[dict]) -> str:
    """One row per (mode, stage): median ms per provider and its speedup over eager."""
    providers = list(dict.fromkeys(r["provider"] for r in records))
    rows = {}
    for r in records:
        rows.setdefault((r["mode"], r["stage"]), {})[r["provider"]] = r
    header = ["mode", "stage"] + [f"{p} ms (x eager, rel_err)" for p in providers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (mode, stage), by_provider in rows.items():
        eager = by_provider.get("eager", {}).get("median_ms")
        cells = [mode, stage]
        for p in providers:
            r = by_provider.get(p)
            if r is None:
                cells.append("-")
                continue
            speedup = f"{eager / r['median_ms']:.2f}x" if eager else "-"
            cells.append(f"{r['median_ms']:.3f} ({speedup}, {r['rel_err']:.1e})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("nvidia-", "")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device == "cuda"
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.batch = args.batch or (128 if on_gpu else 4)
    args.repeats = args.repeats or (50 if on_gpu else 5)
    args.warmup = 10 if on_gpu else 2
    dtype = DTYPES[args.dtype]
    fused = [b for b in resfuse.available_backends(device) if b != "reference"]
    backends = args.backends.split(",") if args.backends else fused
    if not on_gpu:  # the Triton interpreter is a test vehicle: never time it
        backends = [b for b in backends if b != "triton"]
    stages = STAGES
    if args.stages:
        wanted = {int(c) for c in args.stages.split(",")}
        stages = [s for s in STAGES if s[0] in wanted]
    modes = [False, True] if args.mode == "both" else [args.mode == "train"]

    env = environment(argv)
    print(f"resfuse {resfuse.__version__} | torch {env['torch']} | device {env['gpu'] or device} | "
          f"{args.dtype} {args.layout} N={args.batch} | backends: {', '.join(backends) or 'none fused'}",
          flush=True)
    records = []
    total = len(stages) * len(modes)
    progress_end = "\r" if sys.stderr.isatty() else "\n"
    for i, (train, (channels, size)) in enumerate(((t, s) for t in modes for s in stages), 1):
        print(f"[{i}/{total}] {'train' if train else 'eval'} C{channels}@{size}x{size} ...", end=progress_end,
              file=sys.stderr, flush=True)
        records += bench_stage(channels, size, args, device, dtype, train, backends)
    if progress_end == "\r":
        print(" " * 60, end="\r", file=sys.stderr)
    table = markdown_table(records)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"{_slug(env['gpu'] or 'cpu')}-{env['date'].replace('-', '')}"
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"meta": env, "records": records}, f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(f"# resfuse BasicBlock benchmark: {env['gpu'] or 'CPU'}\n\n")
            f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n" + table + "\n")
        print(f"wrote {os.path.join(args.out, name)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
