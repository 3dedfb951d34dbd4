"""Optional parts of resfuse: the compiled extension and the Triton kernels.

Importing resfuse never fails because one of them is missing; the backend that needs it reports itself
unavailable, with the reason recorded here.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Optional

extension: Optional[ModuleType] = None
extension_error: Optional[str] = None

def _extension_built() -> bool:
    try:
        return importlib.util.find_spec(f"{__package__}._C") is not None
    except (ImportError, ValueError):  # blocked in sys.modules
        return False


if not _extension_built():
    extension_error = "not built (installed with RESFUSE_SKIP_CSRC=1, or not installed with pip)"
else:
    try:
        from . import _C as extension  # registers the resfuse:: C++ ops with the dispatcher
    except Exception as exc:  # built against another torch, or a missing runtime library
        extension_error = f"{type(exc).__name__}: {exc}"

triton_kernels: Optional[ModuleType] = None
triton_error: Optional[str] = None
try:
    from . import triton_kernels
except Exception as exc:  # triton not installed
    triton_kernels = None
    triton_error = f"{type(exc).__name__}: {exc}"


def extension_has_cuda() -> bool:
    return extension is not None and bool(extension.with_cuda())


def triton_interpreting() -> bool:
    """Whether the Triton kernels were decorated for Triton's interpreter (they then run on CPU tensors)."""
    return triton_kernels is not None and triton_kernels.INTERPRETING


def require_triton_kernels() -> ModuleType:
    """The Triton kernels module, or a clear error saying why it is unavailable."""
    if triton_kernels is None:
        raise RuntimeError(f"resfuse's Triton kernels are unavailable: {triton_error}")
    return triton_kernels
