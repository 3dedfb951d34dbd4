"""Shared test setup: device markers and the Triton interpreter switch.

Without a GPU the Triton kernels run under the interpreter, which triton reads when a kernel is decorated,
so the variable is set here, before anything imports resfuse.triton_kernels.
"""
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:
        return False


HAS_TRITON = _triton_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "triton: needs triton (a GPU, or the interpreter on CPU)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if item.get_closest_marker("triton") is not None and not HAS_TRITON:
            item.add_marker(skip_triton)
