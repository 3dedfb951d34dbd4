"""``auto``'s measured choice per configuration (resfuse/ops/autoselect.py), its GPU candidates on CPU stand-ins.

On a GPU each candidate is timed with CUDA events. Here CPU tensors are given the GPU's candidates (the ``cuda``
and ``triton`` backends; the C++ kernels and the Triton interpreter stand in) and the timer is replaced by one
that runs the candidate (so each must work) and returns a scripted time: the tests check which implementation is
chosen, that it is measured once per configuration and then run, that measuring changes no state (running
statistics), and when nothing is measured. CPU's own candidates (C++ kernels against eager): test_autoselect_cpu.py.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from resfuse import ops
from resfuse.ops import autoselect, backend

from _helpers import randn, rel_err

HAS_CUDA_KERNELS = "cuda" in backend.available_backends("cpu")
HAS_TRITON_CPU = "triton" in backend.available_backends("cpu")


@pytest.fixture
def measured(monkeypatch, scripted_auto_timer):
    """The GPU's candidates for CPU tensors, timed by conftest's scripted timer: (ms per name, names measured)."""
    monkeypatch.setattr(autoselect, "implementations", lambda device: ("cuda", "triton"))
    return scripted_auto_timer


def test_choose_takes_the_fastest_once(measured):
    ms, runs = measured
    ms.update(a=2.0, b=1.0, c=3.0)
    calls = {n: 0 for n in ms}

    def candidate(name):
        def call():
            calls[name] += 1
        return call

    cands = {n: candidate(n) for n in ms}
    key = ("op", "config")
    assert autoselect.choose(key, cands, torch.device("cpu")) == "b"
    assert autoselect.choose(key, cands, torch.device("cpu")) == "b"  # remembered: nothing measured again
    assert runs == ["a", "b", "c"] and calls == {"a": 1, "b": 1, "c": 1}
    (entry,) = ops.auto_choices()
    assert entry["op"] == "op" and entry["chosen"] == "b" and entry["ms"] == {"a": 2.0, "b": 1.0, "c": 3.0}


def test_a_failing_candidate_is_not_chosen_and_says_so(measured):
    ms, _ = measured
    ms.update(good=5.0)

    def broken():
        raise RuntimeError("no kernel for this case")

    with pytest.warns(UserWarning, match="measured broken for op and it failed .*no kernel for this case"):
        assert autoselect.choose(("op", 1), {"broken": broken, "good": lambda: None}, torch.device("cpu")) == "good"
    with pytest.warns(UserWarning):
        assert autoselect.choose(("op", 2), {"broken": broken, "also": broken}, torch.device("cpu")) == ""
    # every candidate failed: the caller's fixed rule, and no second measurement
    assert autoselect.cached(("op", 2)) == ""


@pytest.mark.parametrize("why", ["env", "compiling", "other_device"])
def test_nothing_is_measured_where_it_should_not_be(monkeypatch, why):
    autoselect.clear_auto_choices()
    monkeypatch.delenv("RESFUSE_AUTO_MEASURE", raising=False)  # the suite's default (conftest.py) is off
    if why == "env":
        monkeypatch.setenv("RESFUSE_AUTO_MEASURE", "0")
    elif why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def never(candidates, device):
        raise AssertionError("measured")

    monkeypatch.setattr(autoselect, "_measure_all", never)
    device = torch.device("meta" if why == "other_device" else "cpu")  # meta: a device type nothing measures on
    assert autoselect.choose(("op",), {"a": lambda: None, "b": lambda: None}, device) is None
    assert ops.auto_choices() == []


def _spy(monkeypatch, module, name, log):
    """Record the backend each call of ``module.<name>(..., impl)`` runs with."""
    real = getattr(module, name)

    def spy(*args):
        log.append(args[-1] if name == "_run" else args[0])
        return real(*args)
    monkeypatch.setattr(module, name, spy)


def _fastest_is(fastest, measured, monkeypatch, module_name, spied) -> tuple[list, list]:
    """Script the timer so that ``fastest`` wins; return the measured names and the backends run."""
    ms, runs = measured
    ms.update(cuda=1.0 if fastest == "cuda" else 2.0, triton=1.0 if fastest == "triton" else 2.0)
    used: list = []
    _spy(monkeypatch, importlib.import_module(module_name), spied, used)
    return runs, used


@pytest.mark.skipif(not (HAS_CUDA_KERNELS and HAS_TRITON_CPU), reason="needs the C++ extension and triton")
@pytest.mark.parametrize("fastest", ["cuda", "triton"])
def test_bn_act_runs_what_auto_measured_fastest(measured, monkeypatch, fastest):
    runs, used = _fastest_is(fastest, measured, monkeypatch, "resfuse.ops.bn_act", "_run")
    x = randn(2, 5, 3, 3, seed=1, memory_format=torch.channels_last)
    res = randn(2, 5, 3, 3, seed=2, memory_format=torch.channels_last)
    w, b = randn(5, seed=3) + 1.5, randn(5, seed=4)
    rm, rv = randn(5, seed=5), randn(5, seed=6).abs() + 0.5
    erm, erv = rm.clone(), rv.clone()
    for _ in range(2):
        out = ops.bn_act(x, w, b, res, rm, rv, 0.1, 1e-5, True, backend="auto")
        expected = torch.relu(F.batch_norm(x, erm, erv, w, b, True, 0.1, 1e-5) + res)
        assert rel_err(out, expected) < 1e-5
        # measuring ran on copies: the running statistics moved once per call, as eager's did
        assert rel_err(rm, erm) < 1e-6 and rel_err(rv, erv) < 1e-6
    assert runs == ["cuda", "triton"]  # measured on the first call only
    assert used == [fastest, fastest]


@pytest.mark.skipif(not (HAS_CUDA_KERNELS and HAS_TRITON_CPU), reason="needs the C++ extension and triton")
@pytest.mark.parametrize("fastest", ["cuda", "triton"])
def test_conv_bn_act_runs_what_auto_measured_fastest(measured, monkeypatch, fastest):
    runs, used = _fastest_is(fastest, measured, monkeypatch, "resfuse.ops.conv_bn_act", "_run_impl")
    x = randn(2, 8, 6, 6, seed=1, memory_format=torch.channels_last)
    w = (randn(8, 8, 3, 3, seed=2) * 0.2).contiguous(memory_format=torch.channels_last)
    b, res = randn(8, seed=3), randn(2, 8, 6, 6, seed=4, memory_format=torch.channels_last)
    expected = torch.relu(F.conv2d(x, w, b, 1, 1) + res)
    with torch.no_grad():
        out = ops.conv_bn_act(x, w, b, res, 1, 1, 1, 1, True, backend="auto")
        assert rel_err(out, expected) < 1e-5
        assert used == ["cuda", "triton", fastest]  # each measured once, then the chosen one ran
        out = ops.conv_bn_act(x, w, b, res, 1, 1, 1, 1, True, backend="auto")
        assert rel_err(out, expected) < 1e-5
    assert used[3:] == [fastest] and runs == ["cuda", "triton"]
    (entry,) = ops.auto_choices()
    assert entry["op"] == "conv_bn_act" and entry["chosen"] == fastest


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs the C++ extension")
def test_blocks_in_training_take_the_measured_backend(measured, monkeypatch):
    """The module path (resfuse.BasicBlock) asks auto too; with one candidate nothing is measured."""
    import resfuse
    bn_act_module = importlib.import_module("resfuse.ops.bn_act")

    monkeypatch.setattr(bn_act_module, "unavailable_reason",
                        lambda name, device: None if name == "cuda" else "left out of this test")
    ms, runs = measured
    used: list = []
    _spy(monkeypatch, bn_act_module, "_run", used)
    block = resfuse.BasicBlock(4, 4, backend="auto").train()
    block(randn(2, 4, 5, 5, seed=1)).sum().backward()
    assert used == ["cuda", "cuda"] and runs == []
    assert [e["chosen"] for e in ops.auto_choices()] == []  # one candidate: chosen without a measurement


@pytest.mark.cuda
def test_auto_measures_on_a_gpu_and_replays_in_a_cuda_graph():
    """On a GPU: every candidate is timed (a float per implementation), the result is right, and once chosen
    the call has no host synchronisation: it can be captured in a CUDA graph and replayed."""
    autoselect.clear_auto_choices()
    dev = "cuda"
    x = randn(4, 64, 14, 14, dtype=torch.bfloat16, device=dev, seed=1, memory_format=torch.channels_last)
    w = (randn(64, 64, 3, 3, dtype=torch.bfloat16, device=dev, seed=2) * 0.05).contiguous(
        memory_format=torch.channels_last)
    b = randn(64, dtype=torch.bfloat16, device=dev, seed=3)
    res = randn(4, 64, 14, 14, dtype=torch.bfloat16, device=dev, seed=4, memory_format=torch.channels_last)
    expected = torch.relu(F.conv2d(x.double(), w.double(), b.double(), 1, 1) + res.double())
    with torch.no_grad():
        out = ops.conv_bn_act(x, w, b, res, 1, 1, 1, 1, True, backend="auto")
    assert rel_err(out.double(), expected) < 2e-2
    (entry,) = ops.auto_choices()
    available = set(backend.available_backends(dev)) - {"reference"} | {"cudnn_fused"}
    assert set(entry["ms"]) <= available and entry["chosen"] in entry["ms"]
    assert all(isinstance(ms, float) and ms > 0 for ms in entry["ms"].values()), entry["ms"]

    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        static = ops.conv_bn_act(x, w, b, res, 1, 1, 1, 1, True, backend="auto")  # same configuration: chosen
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static = ops.conv_bn_act(x, w, b, res, 1, 1, 1, 1, True, backend="auto")
    static.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static.double(), expected) < 2e-2
    autoselect.clear_auto_choices()


@pytest.mark.cuda
def test_auto_bn_act_measures_forward_and_backward_on_a_gpu():
    autoselect.clear_auto_choices()
    dev = "cuda"
    x = randn(8, 32, 7, 7, dtype=torch.bfloat16, device=dev, seed=1, memory_format=torch.channels_last)
    w, b = randn(32, device=dev, seed=2) + 1.5, randn(32, device=dev, seed=3)
    rm, rv = randn(32, device=dev, seed=4), randn(32, device=dev, seed=5).abs() + 0.5
    erm, erv = rm.clone(), rv.clone()
    out = ops.bn_act(x, w.bfloat16(), b.bfloat16(), None, rm, rv, 0.1, 1e-5, True, backend="auto")
    expected = torch.relu(F.batch_norm(x.float(), erm, erv, w, b, True, 0.1, 1e-5))
    assert rel_err(out.float(), expected) < 2e-2
    assert rel_err(rm, erm) < 1e-3 and rel_err(rv, erv) < 1e-3  # updated once, not by the measurements
    (entry,) = ops.auto_choices()
    assert entry["op"] == "bn_act" and entry["chosen"] in ("cuda", "triton")
    assert all(isinstance(ms, float) for ms in entry["ms"].values()), entry["ms"]
    autoselect.clear_auto_choices()


def test_batch_sizes_share_a_configuration_by_power_of_two():
    assert [autoselect.batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 127, 128, 129)] == [0, 1, 2, 4, 4, 8, 128, 128,
                                                                                         256]


@pytest.mark.skipif(not (HAS_CUDA_KERNELS and HAS_TRITON_CPU), reason="needs two bn_act backends to measure")
def test_a_smaller_last_batch_is_not_measured_again(measured, monkeypatch):
    ms, runs = measured
    ms.update(cuda=1.0, triton=2.0)
    for n in (8, 7, 5):  # one bucket
        ops.bn_act(randn(n, 3, 2, 2), torch.rand(3) + 0.5, randn(3, seed=1))
    assert runs == ["cuda", "triton"]


@pytest.mark.skipif(not (HAS_CUDA_KERNELS and HAS_TRITON_CPU), reason="needs two bn_act backends to measure")
def test_measuring_leaves_the_global_rng_alone(measured):
    ms, _ = measured
    ms.update(cuda=1.0, triton=2.0)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    ops.bn_act(randn(4, 3, 2, 2), torch.rand(3, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(torch.rand(4), expected)


def test_a_failure_warns_once_for_all_configurations(measured):
    import warnings

    ms, _ = measured
    ms.update(good=1.0)

    def broken():
        raise RuntimeError("unsupported case")

    resfuse_warnings = importlib.import_module("resfuse._warn_once")
    resfuse_warnings.forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(3):
            autoselect.choose(("op", n), {"broken": broken, "good": lambda: None}, torch.device("cpu"))
    assert len([w for w in caught if "unsupported case" in str(w.message)]) == 1


def test_measuring_inside_a_cuda_graph_capture_is_an_error(monkeypatch):
    autoselect.clear_auto_choices()
    monkeypatch.delenv("RESFUSE_AUTO_MEASURE", raising=False)
    monkeypatch.setattr(autoselect, "device_measurable", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def never():
        raise AssertionError("measured inside a capture")

    with pytest.raises(RuntimeError, match="inside a CUDA graph capture.*warm-up"):
        autoselect.choose(("op", 1), {"a": never, "b": never}, torch.device("cuda"))
    # a configuration measured before the capture is replayed without measuring
    autoselect._choices[("op", 2)] = "a"
    assert autoselect.choose(("op", 2), {"a": never, "b": never}, torch.device("cuda")) == "a"


def test_two_threads_never_measure_at_once(measured):
    import threading
    import time

    ms, _ = measured
    ms.update(a=1.0, b=2.0)
    active, overlap = [0], []

    def slow():
        active[0] += 1
        overlap.append(active[0])
        time.sleep(0.05)
        active[0] -= 1

    threads = [threading.Thread(target=autoselect.choose, args=(("op", i), {"a": slow, "b": slow},
                                                                 torch.device("cpu"))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlap) == 1 and len(overlap) == 8
