"""What ``backend="auto"`` runs on a GPU: per configuration, the fastest implementation, measured once.

The first call of an op with a configuration it has not seen (device, dtype, layout, shapes, options) times
every implementation that can take it and remembers the fastest; later calls with that configuration run it
without measuring. The implementations:

- eval ``conv_bn_act``: cuDNN's fused conv + bias (+ add) + ReLU (``cudnn_fused.py``, when it applies), the
  ``cuda`` backend's conv, the ``triton`` backend's conv;
- training ``bn_act``: the ``cuda`` and ``triton`` backends' kernels, timed forward + backward (on copies of
  the running statistics: measuring updates nothing).

Each one is called once untimed (Triton's compilation and autotuning, cuDNN's algorithm search), then
``REPEATS`` times between CUDA events; the median counts. Measuring synchronises the host, once per
configuration, like Triton's autotuner: warm a model up before capturing it in a CUDA graph. Nothing is
measured, and the fixed rules of ``backend.py`` apply, where measuring cannot or should not happen: on CPU
tensors, while torch.compile traces, while a CUDA graph is being captured, and with ``RESFUSE_AUTO_MEASURE=0``.
An implementation that raises while measured is not chosen, with a warning naming it and the error.
"""
from __future__ import annotations

import os
import statistics
import warnings
from typing import Any, Callable, Optional

import torch

REPEATS = 5

_choices: dict[tuple, str] = {}  # configuration -> the implementation chosen
_timings: dict[tuple, dict[str, Any]] = {}  # configuration -> ms per implementation, or the error it raised


def measuring_enabled(device: torch.device) -> bool:
    """Whether an op on ``device`` may measure its implementations now (else it takes the fixed rule)."""
    if os.environ.get("RESFUSE_AUTO_MEASURE", "1").strip() in ("0", "false", "no", "off"):
        return False
    if not device_measurable(device):
        return False
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def device_measurable(device: torch.device) -> bool:
    """Whether ops on ``device`` choose by measuring: GPUs. On CPU tensors ``auto`` runs the C++ extension's
    CPU kernels (or the reference); the Triton interpreter is a test vehicle, never a candidate."""
    return device.type == "cuda"


def cached(key: tuple) -> Optional[str]:
    """What was decided for ``key`` before, if anything (the lookup every call makes first): an
    implementation's name, or "" when every candidate failed (the fixed rule, without measuring again)."""
    return _choices.get(key)


def choose(key: tuple, candidates: dict[str, Callable[[], Any]], device: torch.device) -> Optional[str]:
    """The fastest of ``candidates`` (name -> a call running that implementation on the real arguments) for
    ``key``, measured now and remembered. None when nothing may be measured here, "" when every candidate
    failed: either way the caller applies its fixed rule. A single candidate is chosen without measuring."""
    hit = _choices.get(key)
    if hit is not None:
        return hit
    if len(candidates) == 1:
        (name,) = candidates
        _choices[key] = name
        return name
    if not candidates or not measuring_enabled(device):
        return None
    timings: dict[str, Any] = {}
    for name, call in candidates.items():
        try:
            timings[name] = _measure(call, device)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # e.g. a configuration cuDNN refuses, a kernel's unsupported case
            timings[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"resfuse: backend 'auto' measured {name} for {key[0]} and it failed "
                          f"({timings[name]}); it is not chosen for this configuration", stacklevel=4)
    measured = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
    _timings[key] = timings
    if not measured:
        _choices[key] = ""
        return ""
    best = min(measured, key=measured.get)
    _choices[key] = best
    return best


def _measure(call: Callable[[], Any], device: torch.device) -> float:
    """Median ms of ``call`` after one untimed call, each repetition between CUDA events."""
    with torch.no_grad():
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
    return [{"op": key[0], "config": key[1:], "chosen": _choices.get(key) or None, "ms": dict(timings)}
            for key, timings in _timings.items()]


def clear_auto_choices() -> None:
    """Forget every choice: the next call of each configuration measures again."""
    _choices.clear()
    _timings.clear()
