"""Timing: medians of many repetitions after warm-up, and the machine's ceilings measured the same way.

On a GPU each repetition is bracketed by CUDA events, and a buffer larger than the L2 cache is overwritten
before it (outside the events), so small shapes are not timed from a warm cache. On the CPU each repetition is
timed with ``time.perf_counter``. The number of repetitions follows from the warm-up's time per call unless it
is fixed.

The providers of one comparison are timed round-robin (``time_round_robin``): each one's repetitions are split
into rounds and the rounds interleaved, so that a slow drift of the host (other processes, clocks, the
allocator's state) shifts every provider's median alike instead of whichever one ran during it. Where a step is
bound by host time, as a ResNet block's is at N=128 beyond the first stage, that drift was measured at up to 2x
between two providers running the same kernels one after the other.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

# overwritten before each timed repetition on a GPU: more than any current GPU's L2 (50 MB on H100/H200)
L2_FLUSH_BYTES = 256 * 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    repeats: int
    first_call_s: float  # the first call, synchronised: compilation, autotuning, cuDNN set-up
    outputs: Any  # what the first call returned (compared with the reference)
    peak_bytes: Optional[int] = None  # GPU: the most one call allocates above what is resident before it


@dataclass
class Budget:
    """How much to warm up and time: fixed ``repeats``, or as many as fit ``target_s`` within the bounds."""

    warmup_s: float
    min_warmup: int
    target_s: float
    min_repeats: int
    max_repeats: int
    repeats: Optional[int] = None
    rounds: int = 1  # time_round_robin: how many slices each provider's repetitions are split into

    @classmethod
    def for_device(cls, device: torch.device, repeats: Optional[int] = None,
                   rounds: Optional[int] = None) -> "Budget":
        if device.type == "cuda":
            return cls(warmup_s=0.05, min_warmup=3, target_s=0.25, min_repeats=25, max_repeats=500,
                       repeats=repeats, rounds=rounds or 10)
        return cls(warmup_s=0.0, min_warmup=0, target_s=0.1, min_repeats=3, max_repeats=20, repeats=repeats,
                   rounds=rounds or 3)


def _time_cuda(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    for i in range(repeats):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_cpu(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _warm_up(fn: Callable[[], Any], device: torch.device, budget: Budget) -> tuple[Any, float, int]:
    """Call ``fn`` once (timed apart: compilation, autotuning, cuDNN's search), then warm it up; return its
    first outputs, the first call's seconds and the number of repetitions its time per call asks for."""
    start = time.perf_counter()
    outputs = fn()
    synchronize(device)
    first_call_s = time.perf_counter() - start

    calls, start = 0, time.perf_counter()
    while calls < budget.min_warmup or time.perf_counter() - start < budget.warmup_s:
        fn()
        synchronize(device)
        calls += 1
    if calls:
        per_call = (time.perf_counter() - start) / calls
    else:  # no warm-up asked for (CPU): the first call is all we know
        per_call = first_call_s
    repeats = budget.repeats or int(min(max(budget.target_s / max(per_call, 1e-6), budget.min_repeats),
                                        budget.max_repeats))
    return outputs, first_call_s, repeats


def _time(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    return _time_cuda(fn, repeats, device) if device.type == "cuda" else _time_cpu(fn, repeats)


def time_round_robin(fns: dict[str, Callable[[], Any]], device: torch.device,
                     budget: Budget) -> dict[str, Union[Timing, BaseException]]:
    """Time every function of one comparison, interleaved: each is warmed up in turn (its first call timed
    apart), then its repetitions are split into ``budget.rounds`` slices and round r times every function's
    r-th slice, starting one function later each round so that none always follows the same neighbour
    (``rounds=1``: each function's repetitions in one stretch, one function after another).

    A function that raises (while warming up or timed) maps to its exception and leaves the rounds; the others
    go on."""
    results: dict[str, Union[Timing, BaseException]] = {}
    warm: dict[str, tuple[Any, float, int]] = {}
    for name, fn in fns.items():
        try:
            warm[name] = _warm_up(fn, device, budget)
        except Exception as exc:
            results[name] = exc
    rounds = max(1, budget.rounds)
    times: dict[str, list[float]] = {name: [] for name in warm}
    order = list(warm)
    for r in range(rounds):
        shift = r % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            if name in results:
                continue
            repeats = warm[name][2]
            slice_repeats = repeats // rounds + (1 if r < repeats % rounds else 0)  # the slices sum to repeats
            if slice_repeats == 0:
                continue
            try:
                times[name] += _time(fns[name], slice_repeats, device)
            except Exception as exc:
                results[name] = exc
    for name in order:
        if name in results:
            continue
        outputs, first_call_s, _ = warm[name]
        try:
            peak = peak_bytes(fns[name], device) if device.type == "cuda" else None
        except Exception as exc:
            results[name] = exc
            continue
        results[name] = Timing(statistics.median(times[name]), len(times[name]), first_call_s, outputs, peak)
    return {name: results[name] for name in fns}


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory of one call of ``fn`` above what was allocated before it: its activations, saved tensors,
    gradients and workspaces; not the parameters, inputs or optimizer state, which are resident already (the
    call is made after the warm-up, so lazily created state exists). The caching allocator's own peak counter,
    so it counts what the call asked for, not the pool the allocator keeps."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Ceilings:
    copy_gbps: float
    matmul_tflops: float
    matmul_dtype: str

    def as_dict(self) -> dict:
        return {"copy_gbps": round(self.copy_gbps, 1), "matmul_tflops": round(self.matmul_tflops, 2),
                "matmul_dtype": self.matmul_dtype}


def _best_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    synchronize(device)
    if device.type == "cuda":
        return min(_time_cuda(fn, repeats, device))
    return min(_time_cpu(fn, repeats))


def _copy_gbps(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + written


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The roofline's two ceilings, measured now on ``device``: the copy bandwidth of a large buffer (GB/s,
    bytes read + written) and the throughput of a large matmul in ``dtype`` (TFLOP/s; fp32 on a GPU runs as
    TF32 when cuDNN may use TF32 for convolutions, as it does by default). The fastest repetition counts."""
    on_gpu = device.type == "cuda"
    copy_gbps = _copy_gbps(device, (1 << 30) if on_gpu else (1 << 27), 20 if on_gpu else 5)
    n = 8192 if on_gpu else 1024
    mm_dtype = dtype if on_gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(mm_dtype, str(mm_dtype))
    tf32 = on_gpu and mm_dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            name = "tf32"
        mm_ms = _best_ms(lambda: torch.mm(a, b), device, 20 if on_gpu else 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=2 * n ** 3 / (mm_ms * 1e-3) / 1e12, matmul_dtype=name)
