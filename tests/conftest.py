"""Shared test setup: device markers, the Triton interpreter switch, and ``auto`` without measuring.

Without a GPU the Triton kernels run under the interpreter, which triton reads when a kernel is decorated,
so the variable is set here, before anything imports resfuse.triton_kernels.
``backend="auto"`` measures its implementations on CPU too (resfuse/ops/autoselect.py): a test that counts which
ops a call ran would then depend on this machine's timings, and every first call would pay for a measurement.
So the suite runs ``auto`` by its fixed rule (RESFUSE_AUTO_MEASURE=0); the tests of measuring (test_autoselect*)
turn it back on for themselves.
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
os.environ.setdefault("RESFUSE_AUTO_MEASURE", "0")


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


@pytest.fixture
def scripted_auto_timer(monkeypatch):
    """``auto`` measuring on, with its timer replaced: each measurement runs every candidate once (so each must
    work, or is recorded failed as autoselect records it) and returns ``ms[name]``. Yields (ms, names measured in
    order); every choice is forgotten around it."""
    import torch

    from resfuse.ops import autoselect

    autoselect.clear_auto_choices()
    ms: dict = {}
    runs: list = []

    def fake_measure_all(candidates, device):
        timings = {}
        for name, call in candidates.items():
            runs.append(name)
            try:
                with torch.no_grad():
                    call()
                timings[name] = ms[name]  # a name the test did not script fails like a raising candidate
            except Exception as exc:
                timings[name] = autoselect.failure(exc)
        return timings

    monkeypatch.setattr(autoselect, "device_measurable", lambda device: True)
    monkeypatch.setattr(autoselect, "_measure_all", fake_measure_all)
    monkeypatch.delenv("RESFUSE_AUTO_MEASURE", raising=False)
    yield ms, runs
    autoselect.clear_auto_choices()
