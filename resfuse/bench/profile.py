"""Where the time of one benchmark problem goes: its GPU kernels, per provider, from torch.profiler.

    python -m resfuse.bench.profile --bench basicblock --stages C256_H14 --mode train --providers eager,cuda,triton

For each provider it prints the kernels of one iteration (time per iteration and launches), the sum of kernel
times and the iteration's wall time when run back to back: a wall time well above the kernel sum means the
host (Python, launches) is the limit, not the GPU.
"""
from __future__ import annotations

import argparse
import collections
import time
import traceback
from typing import Optional

import torch

from . import cases
from .shapes import OP_SHAPES, block_shapes


def _shape(bench: str, stage: str):
    if bench in ("conv_bn_act", "bn_act"):
        table = {s.stage: s for s in OP_SHAPES}
    elif bench == "model":
        return stage
    else:
        table = {s.stage: s for s in block_shapes(bench)}
    if stage not in table:
        raise SystemExit(f"unknown stage {stage!r} for {bench}: one of {', '.join(table)}")
    return table[stage]


def kernel_table(step, iters: int) -> tuple[list[tuple[str, float, int]], float]:
    """(name, us per iteration, launches per iteration) of every GPU kernel, and the wall ms per iteration."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    totals: dict = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            totals[evt.name][0] += evt.device_time
            totals[evt.name][1] += 1
    rows = sorted(((n, t / iters, c // iters) for n, (t, c) in totals.items()), key=lambda r: -r[1])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return rows, (time.perf_counter() - t0) * 1e3 / iters


def _host_profile(step, iters: int, top: int) -> None:
    """The Python functions (and the C++ entry points they call) that take the host's time per iteration."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    print("\n".join("    " + line for line in text.getvalue().splitlines() if line.strip()))


def _cpu_op_profile(step, iters: int, top: int) -> None:
    """Host time per iteration of each operator (self and total), from torch.profiler's CPU events. Unlike
    cProfile this sees the autograd engine's thread, where a training step's backward ops run."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / iters
    print(f"    host: {total:.1f} us of operator self time per iteration")
    for e in rows[:top]:
        print(f"    {e.self_cpu_time_total / iters:8.1f} us self {e.cpu_time_total / iters:8.1f} us total "
              f"x{e.count // iters:<3d} {e.key[:90]}")


SHORT_NAMES = {"cuda": "resfuse_cuda", "triton": "resfuse_triton", "auto": "resfuse_auto"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The profile's arguments, checked (stages and provider names) without a GPU."""
    p = argparse.ArgumentParser(prog="python -m resfuse.bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="basicblock", choices=[b for b in cases.BENCHES])
    p.add_argument("--stages", default="C64_H56", help="comma-separated stage names (or a model name)")
    p.add_argument("--mode", default="train", choices=["eval", "train"])
    p.add_argument("--providers", default="eager,cuda,triton")
    p.add_argument("--dtype", default="bf16", choices=sorted(cases.DTYPES))
    p.add_argument("--layout", default="channels_last", choices=sorted(cases.LAYOUTS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=12, help="kernels listed per provider")
    p.add_argument("--host", action="store_true", help="also profile the host side (cProfile, by own time)")
    p.add_argument("--cpu-ops", action="store_true",
                   help="also list the ATen/custom ops by host time (torch.profiler, backward's thread included)")
    args = p.parse_args(argv)
    args.shapes = [_shape(args.bench, stage) for stage in args.stages.split(",")]
    args.provider_names = [SHORT_NAMES.get(name, name) for name in args.providers.split(",")]
    for name in args.provider_names:
        if name not in cases.PROVIDERS:
            p.error(f"unknown provider {name!r}: expected one of {', '.join(cases.PROVIDERS)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the profile reads GPU kernel times: it needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    failed = 0
    for stage, shape in zip(args.stages.split(","), args.shapes):
        problem = cases.make_problem(args.bench, shape, args.mode, args.batch, "cuda", args.dtype, args.layout)
        for provider in args.provider_names:
            where = label(problem.bench, args.mode, stage, args.batch, args.dtype, provider)
            try:
                runner = cases.make_runner(problem, provider)
            except cases.Unavailable as exc:
                print(f"\n{where}: skipped ({exc})")
                continue
            try:  # one provider's failure is reported, and the others are still profiled
                _profile_provider(runner, where, args)
            except Exception as exc:
                failed += 1
                print(f"\n{where}: FAILED {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
                traceback.print_exc()
            finally:
                runner.close()
        problem.free()
    return 1 if failed else 0


def label(bench: str, mode: str, stage: str, batch: int, dtype: str, provider: str) -> str:
    return f"{bench} {mode} {stage} N={batch} {dtype} {provider}"


def summary_line(where: str, kernels_ms: float, launches: int, wall_ms: float) -> str:
    """One provider's line (``python -m resfuse.bench.gpu_check`` reads these back into its summary)."""
    return f"{where}: kernels {kernels_ms:.3f} ms in {launches} launches, wall {wall_ms:.3f} ms per iteration"


def _profile_provider(runner: cases.Runner, where: str, args: argparse.Namespace) -> None:
    for _ in range(3):  # compilation, autotuning, cuDNN's algorithm search
        runner.step()
    rows, wall_ms = kernel_table(runner.step, args.iters)
    gpu_ms = sum(r[1] for r in rows) / 1e3
    launches = sum(r[2] for r in rows)
    print("\n" + summary_line(where, gpu_ms, launches, wall_ms))
    for kname, us, count in rows[: args.top]:
        print(f"  {us:9.1f} us  x{count:<3d} {kname[:110]}")
    if args.host:
        _host_profile(runner.step, args.iters, args.top)
    if args.cpu_ops:
        _cpu_op_profile(runner.step, args.iters, args.top)


if __name__ == "__main__":
    raise SystemExit(main())
