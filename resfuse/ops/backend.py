"""Which implementation runs an op: the ``backend=`` argument, else ``RESFUSE_BACKEND``, else ``auto``.

- ``cuda``: the C++ extension ``resfuse._C`` (its CUDA kernels on GPU tensors, its CPU kernels on CPU tensors).
- ``triton``: the Triton kernels (GPU tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``reference``: plain PyTorch (``resfuse.reference``), always available.
- ``auto``: on GPU tensors, the ops measure their implementations once per configuration and run the fastest
  (``autoselect.py``). Where they do not measure, and for what ``resolve_backend`` reports, the first
  available of: on GPU tensors cuda, triton, reference (measured on an H100,
  benchmarks/results/h100-80gb-hbm3-20261123-blocks.json: the cuda backend's BasicBlock was faster than the
  triton one at every ResNet stage in training and at three of four in eval, and no slower at the fourth); on
  CPU tensors cuda (the extension's CPU kernels), reference. Triton's interpreter is never picked by
  ``auto``: it is a test vehicle, not a fast path.

Naming a backend that cannot run on the tensor's device is an error, never a silent fallback.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _loader

BACKENDS = ("auto", "cuda", "triton", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cuda", "reference")}
_ALL = ("cuda", "triton", "reference")


def requested_backend(backend: Optional[str] = None) -> str:
    name = backend if backend is not None else os.environ.get("RESFUSE_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown resfuse backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cuda":
        if _loader.extension is None:
            return f"the C++ extension resfuse._C is not built or failed to load ({_loader.extension_error})"
        if device.type == "cuda" and not _loader.extension_has_cuda():
            return "resfuse._C was built without CUDA kernels (reinstall with nvcc available or RESFUSE_FORCE_CUDA=1)"
        if device.type not in ("cuda", "cpu"):
            return f"no C++ kernels for device type {device.type!r}"
        return None
    if backend == "triton":
        if _loader.triton_kernels is None:
            return f"triton is not available ({_loader.triton_error})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _loader.triton_interpreting():
            return None
        return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got a {device.type} tensor"
    raise ValueError(f"unknown resfuse backend {backend!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in _ALL if unavailable_reason(b, device) is None]


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The concrete backend (cuda, triton or reference) an op on ``device`` runs with."""
    name = requested_backend(backend)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"resfuse backend {name!r} is unavailable for {device.type} tensors: {reason}")
    return name
