"""What ``backend="auto"`` runs: per configuration, the fastest implementation, measured once.

The first call of an op with a configuration it has not seen (device, dtype, layout, shapes, options) times
every implementation that can take it and remembers the fastest; later calls with that configuration run it
without measuring. The implementations (``implementations``):

- on a GPU, eval ``conv_bn_act``: cuDNN's fused conv + bias (+ add) + ReLU (``cudnn_fused.py``, when it
  applies), the ``cuda`` backend's conv, the ``triton`` backend's conv; ``bn_act`` and ``bn_eval_act``: the
  ``cuda`` and ``triton`` backends' kernels;
- on CPU, for each op: the C++ kernels (the ``cuda`` backend) and ``eager``, the very ops an unconverted model
  runs for that step (``eager.py``: F.batch_norm, the add, the ReLU; F.conv2d): where they measure faster
  ``auto`` runs them, and the numbers are eager's (a measurement on a busy CPU can pick the slower one);
- training ``bn_act`` is timed forward + backward (on copies of the running statistics: measuring updates
  nothing); the eval ops forward.

Each one is called once untimed (Triton's compilation and autotuning, cuDNN's algorithm search), then
``REPEATS`` times, each between CUDA events on a GPU or two ``time.perf_counter`` reads on CPU (where every
candidate is warmed before any is timed and the repetitions interleave, so a cold start or a drift of the
machine's speed is not charged to one of them); the median counts. Measuring on a GPU synchronises the host, once per configuration, like Triton's autotuner: warm a model
up before capturing it in a CUDA graph. Capturing a call whose configuration was never measured is an error
that says so, never a measurement recorded into the graph.
Nothing is measured, and the fixed rules of ``backend.py`` apply (the C++ kernels on CPU), while torch.compile
or torch.jit.trace traces and with ``RESFUSE_AUTO_MEASURE=0``; a choice measured before is still taken,
except on symbolic sizes (torch.export, dynamic shapes), where the key would specialise the traced batch size
(``choice_applies``).
An implementation that raises while measured is not chosen, with one warning naming it and the error.

A configuration is what changes the choice: device, dtype, layout, the channel and spatial sizes, options, and
the batch size rounded up to a power of two (``batch_bucket``): a last, smaller batch of an epoch does not
measure again. Measuring never touches what the caller owns: random gradients come from a private generator,
not the global RNG a seeded training run depends on, and running statistics are copied. One lock serialises
measurements, so two threads never time each other.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable, Optional

import torch

from .._warn_once import warn_once

REPEATS = 5
# What auto measures per device type. On CPU the Triton interpreter is a test vehicle, never a candidate.
_IMPLEMENTATIONS = {"cuda": ("cuda", "triton"), "cpu": ("cuda", "eager")}

_choices: dict[tuple, str] = {}  # configuration -> the implementation chosen
_timings: dict[tuple, dict[str, Any]] = {}  # configuration -> ms per implementation, or the error it raised
_lock = threading.RLock()
_generators: dict[torch.device, torch.Generator] = {}


def batch_bucket(n: int) -> int:
    """The batch size as a configuration sees it: rounded up to a power of two."""
    return 1 << max(int(n) - 1, 0).bit_length() if n > 0 else 0


def random_like(x: torch.Tensor) -> torch.Tensor:
    """Normal noise shaped, typed and laid out like ``x``, from a private generator: the global RNG stays as
    the caller's seed left it."""
    with _lock:
        gen = _generators.get(x.device)
        if gen is None:
            gen = _generators[x.device] = torch.Generator(device=x.device).manual_seed(0)
        return torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device).contiguous(
            memory_format=_layout_of(x))


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    from ..layout import memory_format_of

    return memory_format_of(x)


def check_not_capturing(device: torch.device, what: str) -> None:
    """Raise when a CUDA graph is being captured on ``device``'s current stream: ``what`` (a first measurement)
    would synchronise the host, which capture forbids, or be recorded into the graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"resfuse: backend 'auto' would measure its implementations for {what} inside a CUDA graph capture. "
            "Run the model once outside the capture first (a warm-up measures every configuration it will "
            "meet), or set RESFUSE_AUTO_MEASURE=0, or name a backend.")


def measuring_enabled(device: torch.device) -> bool:
    """Whether an op on ``device`` measures its implementations (else it takes the fixed rule)."""
    if os.environ.get("RESFUSE_AUTO_MEASURE", "1").strip() in ("0", "false", "no", "off"):
        return False
    if not device_measurable(device):
        return False
    # A trace (torch.compile, torch.export; torch.jit.trace and the ONNX exporter built on it) would record the
    # measurement's calls into the graph: it gets the fixed rule.
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def device_measurable(device: torch.device) -> bool:
    """Whether ops on ``device`` choose by measuring: GPUs and CPUs."""
    return device.type in _IMPLEMENTATIONS


def implementations(device: torch.device) -> tuple[str, ...]:
    """The implementations ``auto`` measures for ops on ``device`` (each op adds cuDNN's fused conv where it
    applies and drops those that cannot run there): on GPUs the ``cuda`` and ``triton`` backends; on CPU the C++
    kernels and ``eager``, eager PyTorch's own ops for the step (eager.py)."""
    return _IMPLEMENTATIONS.get(device.type, ())


def choice_applies(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` takes a measured (or remembered) choice: ``x`` on a measurable device with concrete
    sizes. While torch.export or a dynamic-shape torch.compile traces symbolic sizes, reading the batch bucket of
    the key would specialise the graph to one batch size (an ONNX model that only takes the traced batch): the
    fixed rule runs instead."""
    return device_measurable(x.device) and all(type(size) is int for size in x.shape)


def cached(key: tuple) -> Optional[str]:
    """What was decided for ``key`` before, if anything (the lookup every call makes first): an
    implementation's name, or "" when every candidate failed (the fixed rule, without measuring again)."""
    return _choices.get(key)


def choose(key: tuple, candidates: dict[str, Callable[[], Any]], device: torch.device) -> Optional[str]:
    """The fastest of ``candidates`` (name -> a call running that implementation on the real arguments) for
    ``key``, measured now and remembered. None when nothing may be measured here, "" when every candidate
    failed: either way the caller applies its fixed rule. A single candidate is chosen without measuring."""
    with _lock:  # another thread may be measuring this very configuration: wait for its answer
        hit = _choices.get(key)
        if hit is not None:
            return hit
        if len(candidates) == 1:
            (name,) = candidates
            _choices[key] = name
            return name
        if not candidates or not measuring_enabled(device):
            return None
        check_not_capturing(device, f"{key[0]} {key[1:]}")
        timings = _measure_all(candidates, device)
        for name, ms in timings.items():
            if not isinstance(ms, float):
                warn_once(f"resfuse: backend 'auto' measured {name} for {key[0]} and it failed "
                          f"({ms}); it is not chosen for such configurations", stacklevel=4)
        measured = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
        _timings[key] = timings
        best = min(measured, key=measured.get) if measured else ""
        _choices[key] = best
        return best


def failure(exc: Exception) -> str:
    """How a candidate that raised while measured is recorded: the error's type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _measure_all(candidates: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, Any]:
    """Median ms per candidate, or the error it raised (``failure``; e.g. a configuration cuDNN refuses, a
    kernel's unsupported case), in the candidates' order."""
    timings: dict[str, Any] = {}
    with torch.no_grad():
        if device.type == "cuda":
            for name, call in candidates.items():
                try:
                    timings[name] = _measure_on_gpu(call, device)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:
                    timings[name] = failure(exc)
            return timings
        samples = _interleaved_samples(candidates, timings)
    for name in candidates:
        if name in samples:
            timings[name] = statistics.median(samples[name])
    return {name: timings[name] for name in candidates}


def _interleaved_samples(candidates: dict[str, Callable[[], Any]], failures: dict[str, Any]) -> dict[str, list]:
    """Wall-clock ms of CPU candidates (their kernels finish before they return): each is called once untimed
    before any is timed, then ``REPEATS`` rounds time one call of each. A process's first calls (threads waking,
    memory first touched) and any drift of the machine's speed fall on every candidate alike; timing one
    candidate's repetitions before the next's charged them to the first (a 10x cold first measurement chose
    eager's BN over a kernel twice its speed). Candidates that raise go to ``failures``."""
    live: dict[str, Callable[[], Any]] = {}
    for name, call in candidates.items():
        try:
            call()
            live[name] = call
        except Exception as exc:
            failures[name] = failure(exc)
    samples: dict[str, list] = {name: [] for name in live}
    for _ in range(REPEATS):
        for name, call in list(live.items()):
            start = time.perf_counter()
            try:
                call()
            except Exception as exc:
                failures[name] = failure(exc)
                del live[name], samples[name]
                continue
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def _measure_on_gpu(call: Callable[[], Any], device: torch.device) -> float:
    """Median ms of ``call`` after one untimed call, each repetition between CUDA events."""
    call()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(REPEATS)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def auto_choices() -> list[dict]:
    """What ``auto`` chose per configuration, with what it measured (ms, or the error an implementation
    raised): one dict per configuration, for logs and for deciding a backend by hand."""
    with _lock:
        return [{"op": key[0], "config": key[1:], "chosen": _choices.get(key) or None, "ms": dict(timings)}
                for key, timings in _timings.items()]


def clear_auto_choices() -> None:
    """Forget every choice: the next call of each configuration measures again."""
    with _lock:
        _choices.clear()
        _timings.clear()
