"""What the pytest-benchmark files share: the device's settings and ``run_case``, which builds one problem and
one provider through ``resfuse.bench.cases`` (the code ``python -m resfuse.bench`` times) and hands its step to
pytest-benchmark.

On a GPU: bf16 (``RESFUSE_BENCH_DTYPES=bf16,fp16,fp32`` for more), N=128, models at B=256 and 224x224, every
shape of the table. On CPU (CI, ``--benchmark-disable``): fp32, N=2, models at B=2 and 64x64, two block shapes
per bench and one activation per op, so the files run in a few minutes on two cores and cannot rot.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from resfuse.bench import cases, timing

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [d.strip() for d in os.environ.get("RESFUSE_BENCH_DTYPES", "bf16" if ON_GPU else "fp32").split(",")]
LAYOUT = "channels_last"
BATCH = 128 if ON_GPU else 2
MODEL_BATCH = 256 if ON_GPU else 2
RESOLUTION = 224 if ON_GPU else 64
PROVIDERS = list(cases.PROVIDERS)
# (bench, provider) pairs the CPU run leaves to GPU sessions. torch.compile of a whole ResNet takes 4-40 s per
# case on two CPU cores (measured: 140 s for the nine model cases, cold cache, against 50 s for the whole run
# without them); compiling the ops and blocks is cheap.
CPU_SKIPS: dict[tuple[str, str], str] = {
    ("model", p): "GPU-only: compiling a whole ResNet takes minutes on a small CPU" for p in cases.COMPILED
}
GPU_WARMUP_CALLS = 3
# rounds on a GPU: as many as fit GPU_TARGET_S, within bounds (as python -m resfuse.bench does)
GPU_TARGET_S, GPU_MIN_ROUNDS, GPU_MAX_ROUNDS = 0.25, 25, 500
if ON_GPU:  # as python -m resfuse.bench: every provider's convolutions use cuDNN's measured-fastest algorithm
    torch.backends.cudnn.benchmark = True

_last: dict = {}


def _problem(bench, shape, mode, dtype, batch) -> cases.Problem:
    """The problem of the previous test when it is the same (providers vary fastest): one reference each."""
    key = (bench, shape, mode, dtype, batch)
    if _last.get("key") != key:
        previous = _last.pop("problem", None)
        if previous is not None:
            previous.free()
        _last.clear()
        if ON_GPU:
            torch.cuda.empty_cache()
        _last["problem"] = cases.make_problem(bench, shape, mode, batch, DEVICE, dtype, LAYOUT, RESOLUTION)
        _last["key"] = key
    return _last["problem"]


def run_case(benchmark, bench: str, shape, mode: str, dtype: str, provider: str, batch: int = BATCH) -> None:
    """Time ``provider`` on one problem: skip with the reason when it cannot run here, fail when its output is
    garbage, else warm up (compilation, autotuning) and let pytest-benchmark time the step; on a GPU each round
    is the step and ``torch.cuda.synchronize()``, after an untimed overwrite of a buffer larger than the L2."""
    if not ON_GPU and (bench, provider) in CPU_SKIPS:
        pytest.skip(CPU_SKIPS[bench, provider])
    try:
        problem = _problem(bench, shape, mode, dtype, batch)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    reason = cases.provider_unavailable(problem, provider)
    if reason is not None:
        pytest.skip(reason)
    try:
        runner = cases.make_runner(problem, provider)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    try:
        outputs = runner.step()
        err, limit = cases.rel_err(outputs, problem.reference64()), problem.accuracy_limit()
        benchmark.extra_info.update({"bench": problem.bench, "mode": mode, "stage": problem.stage, "N": batch,
                                     "dtype": dtype, "layout": LAYOUT, "provider": provider,
                                     "backend": runner.backend, "rel_err": err, "max_rel_err": limit, "flops": problem.flops,
                                     "bytes": problem.bytes})
        assert err is not None and err <= limit, \
            f"{provider} rel_err {err} against float64 is more than twice eager's own allows ({limit:.3g})"
        step = runner.step
        if not ON_GPU:
            benchmark(step)
            return

        def timed():
            step()
            torch.cuda.synchronize()

        start = time.perf_counter()
        for _ in range(GPU_WARMUP_CALLS):
            timed()
        per_call = (time.perf_counter() - start) / GPU_WARMUP_CALLS
        flush = torch.empty(timing.L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)

        def flush_l2():  # before each round, untimed: small shapes are not timed from a warm L2
            flush.zero_()
            torch.cuda.synchronize()

        rounds = int(min(max(GPU_TARGET_S / max(per_call, 1e-6), GPU_MIN_ROUNDS), GPU_MAX_ROUNDS))
        benchmark.pedantic(timed, setup=flush_l2, rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        runner.close()
