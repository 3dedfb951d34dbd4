"""``auto`` on CPU: the C++ kernels measured against eager PyTorch's own ops (resfuse/ops/eager.py), once per
configuration, and the faster run. The timer is scripted (conftest's ``scripted_auto_timer``) so that either
side wins; where eager's ops win, the numbers are eager's bit for bit, in float64. One test times for real."""
import copy
import importlib

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import resfuse
from resfuse import ops
from resfuse.ops import autoselect, backend

from _helpers import randn, randomize_bn_

pytestmark = pytest.mark.skipif("cuda" not in backend.available_backends("cpu"),
                                reason="needs the C++ extension's CPU kernels, the other candidate")

bn_act_module = importlib.import_module("resfuse.ops.bn_act")
bn_eval_act_module = importlib.import_module("resfuse.ops.bn_eval_act")
conv_bn_act_module = importlib.import_module("resfuse.ops.conv_bn_act")


def _record_impls(monkeypatch, module, name) -> list:
    """The implementation each call of ``module.<name>`` runs: its last argument for ``_run``, else its first."""
    log: list = []
    real = getattr(module, name)

    def spy(*args):
        log.append(args[-1] if name == "_run" else args[0])
        return real(*args)
    monkeypatch.setattr(module, name, spy)
    return log


def _pair(momentum=0.1, seed=0):
    """A torchvision BasicBlock with a strided downsample, in float64, and resfuse's conversion of a copy."""
    torch.manual_seed(seed)
    ds = nn.Sequential(tv.conv1x1(6, 8, 2), nn.BatchNorm2d(8, momentum=momentum))
    ref = tv.BasicBlock(6, 8, 2, downsample=ds, norm_layer=lambda c: nn.BatchNorm2d(c, momentum=momentum))
    randomize_bn_(ref, seed)
    ref = ref.double()
    ours = resfuse.BasicBlock(6, 8, 2, downsample=copy.deepcopy(ds),
                              norm_layer=lambda c: nn.BatchNorm2d(c, momentum=momentum)).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(block, x):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out.backward(torch.cos(out))  # a gradient that differs per element
    return out.detach(), x.grad


def _assert_identical(ref, ours, ref_result, our_result):
    for a, b in zip(ref_result, our_result):
        assert torch.equal(a, b)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, s), t in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(s, t), name


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_runs_eagers_ops_when_they_measure_faster(scripted_auto_timer, monkeypatch, momentum):
    ms, runs = scripted_auto_timer
    ms.update(cuda=2.0, eager=1.0)
    impls = _record_impls(monkeypatch, bn_act_module, "_run")
    ref, ours = _pair(momentum)
    for step in range(2):  # two steps: the cumulative average divides by num_batches_tracked
        x = randn(4, 6, 9, 9, dtype=torch.float64, seed=step)
        _assert_identical(ref, ours, _step(ref, x), _step(ours, x))
    assert set(impls) == {"eager"} and len(impls) == 6  # three BNs a step, never the fused op
    assert sorted(runs) == sorted(["cuda", "eager"] * 3)  # each of the three configurations measured once
    assert {entry["chosen"] for entry in ops.auto_choices()} == {"eager"}


def test_training_runs_the_fused_op_when_it_measures_faster(scripted_auto_timer, monkeypatch):
    ms, _ = scripted_auto_timer
    ms.update(cuda=1.0, eager=2.0)
    impls = _record_impls(monkeypatch, bn_act_module, "_run")
    ref, ours = _pair()
    x = randn(4, 6, 9, 9, dtype=torch.float64)
    (out_ref, grad_ref), (out, grad) = _step(ref, x), _step(ours, x)
    assert impls == ["cuda"] * 3
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_eager_choice_has_eagers_double_backward(scripted_auto_timer):
    ms, _ = scripted_auto_timer
    ms.update(cuda=2.0, eager=1.0)
    x = randn(4, 3, 5, 5, dtype=torch.float64, seed=1)
    w, b = randn(3, dtype=torch.float64, seed=2) + 1.5, randn(3, dtype=torch.float64, seed=3)
    res = randn(4, 3, 5, 5, dtype=torch.float64, seed=4)
    grads = []
    for run in (lambda *a: ops.bn_act(*a, backend="auto"),
                lambda x, w, b, r: torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, True) + r)):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, res)]
        out = run(*leaves)
        (gx,) = torch.autograd.grad((out * out.detach().sin()).sum(), leaves[0], create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), leaves))
    assert ops.auto_choices()[0]["chosen"] == "eager"
    for ours, eager in zip(*grads):
        assert torch.equal(ours, eager)


@pytest.mark.parametrize("fastest", ["cuda", "eager"])
def test_eval_measures_bn_eval_act_against_eager(scripted_auto_timer, monkeypatch, fastest):
    ms, runs = scripted_auto_timer
    ms.update(cuda=1.0 if fastest == "cuda" else 2.0, eager=1.0 if fastest == "eager" else 2.0)
    impls = _record_impls(monkeypatch, bn_eval_act_module, "_run")
    ref, ours = _pair()
    ref.eval(), ours.eval()
    x = randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        out_ref, out = ref(x), ours(x)
        assert ours(x).equal(out)  # the second call is not measured
    assert sorted(runs) == sorted(["cuda", "eager"] * 3)  # three configurations, each measured once
    assert sorted(impls) == sorted(runs + [fastest] * 6)  # the measurements' own calls, then the fastest ran
    if fastest == "eager":
        assert torch.equal(out, out_ref)
    else:
        torch.testing.assert_close(out, out_ref)


def test_conv_bn_act_measures_the_conv_against_eager(scripted_auto_timer, monkeypatch):
    ms, runs = scripted_auto_timer
    ms.update(cuda=2.0, eager=1.0)
    impls = _record_impls(monkeypatch, conv_bn_act_module, "_run_impl")
    x, w = randn(2, 4, 6, 6, dtype=torch.float64, seed=1), randn(4, 4, 3, 3, dtype=torch.float64, seed=2)
    b, res = randn(4, dtype=torch.float64, seed=3), randn(2, 4, 6, 6, dtype=torch.float64, seed=4)
    with torch.no_grad():
        out = ops.conv_bn_act(x, w, b, res, 1, 1, 1, 1, True, backend="auto")
    assert torch.equal(out, torch.relu(torch.nn.functional.conv2d(x, w, b, 1, 1) + res))
    assert runs == ["cuda", "eager"] and impls == ["cuda", "eager", "eager"]  # measured, then eager ran


def test_measuring_leaves_the_callers_state_alone_and_happens_once(scripted_auto_timer):
    ms, runs = scripted_auto_timer
    ms.update(cuda=1.0, eager=2.0)
    w, b = randn(3, seed=1) + 1.5, randn(3, seed=2)
    rm, rv = randn(3, seed=3), randn(3, seed=4).abs() + 0.5
    erm, erv = rm.clone(), rv.clone()
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    for n in (8, 7, 5):  # one batch bucket: measured on the first call only
        x = randn(n, 3, 2, 2, seed=n)
        ops.bn_act(x, w, b, None, rm, rv, 0.1, 1e-5, True, backend="auto")
        torch.nn.functional.batch_norm(x, erm, erv, w, b, True, 0.1, 1e-5)
        torch.testing.assert_close(rm, erm, rtol=0, atol=1e-6)  # moved once per call, by the call itself
        torch.testing.assert_close(rv, erv, rtol=0, atol=1e-6)
    assert runs == ["cuda", "eager"]
    assert torch.equal(torch.rand(4), expected_draw)  # measuring drew nothing from the global RNG


@pytest.mark.parametrize("why", ["env", "compiling"])
def test_no_measurement_keeps_the_cpu_kernels(scripted_auto_timer, monkeypatch, why):
    _, runs = scripted_auto_timer
    if why == "env":
        monkeypatch.setenv("RESFUSE_AUTO_MEASURE", "0")
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    impls = _record_impls(monkeypatch, bn_act_module, "_run")
    ops.bn_act(randn(4, 3, 2, 2), randn(3, seed=1) + 1.5, backend="auto")
    assert runs == [] and impls == ["cuda"] and ops.auto_choices() == []


def test_torch_jit_trace_measures_nothing(scripted_auto_timer):
    """A trace records every op run on its input: a measurement's calls would become part of the graph."""
    _, runs = scripted_auto_timer
    block = resfuse.BasicBlock(4, 4).eval()
    with torch.no_grad():
        traced = torch.jit.trace(block, randn(2, 4, 5, 5), check_trace=False)  # the check runs the block
        assert runs == [] and ops.auto_choices() == []
        torch.testing.assert_close(traced(randn(2, 4, 5, 5, seed=1)), block(randn(2, 4, 5, 5, seed=1)))


def test_the_triton_interpreter_is_never_a_cpu_candidate(scripted_auto_timer):
    ms, runs = scripted_auto_timer
    ms.update(cuda=2.0, eager=1.0, triton=0.5)
    ops.bn_act(randn(4, 3, 2, 2), randn(3, seed=1) + 1.5, backend="auto")
    assert runs == ["cuda", "eager"]


def test_frozen_batchnorm_keeps_the_cpu_kernel(scripted_auto_timer, monkeypatch):
    """Eager's FrozenBatchNorm2d is a scale and shift, not F.batch_norm: there is no eager candidate for it."""
    from torchvision.ops import FrozenBatchNorm2d

    _, runs = scripted_auto_timer
    impls = _record_impls(monkeypatch, bn_eval_act_module, "_run")
    block = resfuse.BasicBlock(4, 4, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        block(randn(2, 4, 5, 5))
    assert runs == [] and impls == ["cuda", "cuda"]


def test_real_timer_measures_both_on_cpu(monkeypatch):
    """No script: both candidates are timed with the wall clock (ms > 0) and the faster one is chosen."""
    autoselect.clear_auto_choices()
    monkeypatch.delenv("RESFUSE_AUTO_MEASURE", raising=False)
    x = randn(4, 8, 6, 6)
    ops.bn_act(x, randn(8, seed=1) + 1.5, randn(8, seed=2), backend="auto")
    (entry,) = ops.auto_choices()
    assert set(entry["ms"]) == {"cuda", "eager"} and all(ms > 0 for ms in entry["ms"].values()), entry
    assert entry["chosen"] == min(entry["ms"], key=entry["ms"].get)
    autoselect.clear_auto_choices()


def test_cpu_timer_warms_every_candidate_then_interleaves_the_repeats(monkeypatch):
    """A machine that is slow for its first calls (threads waking, memory first touched) slows whichever
    candidate runs first; measured one after the other, that one lost: the 10x cold first measurement that
    chose eager's BN over a kernel twice its speed. Warmed all, then interleaved, the truly faster one wins,
    and each time is the median of its REPEATS."""
    now = [0.0]  # seconds on a scripted wall clock that only the calls advance
    order = []
    steady_ms = {"fast": 1.0, "slow": 2.0}

    def candidate(name):
        def call():
            order.append(name)
            now[0] += (10.0 if len(order) <= 6 else steady_ms[name]) / 1e3  # the first 6 calls are cold
        return call

    monkeypatch.setattr(autoselect.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(autoselect, "REPEATS", 5)
    monkeypatch.setattr(autoselect, "device_measurable", lambda device: True)
    monkeypatch.delenv("RESFUSE_AUTO_MEASURE", raising=False)
    autoselect.clear_auto_choices()
    key = ("op", "cold start")
    chosen = autoselect.choose(key, {"fast": candidate("fast"), "slow": candidate("slow")}, torch.device("cpu"))
    assert order == ["fast", "slow"] + ["fast", "slow"] * 5
    (entry,) = [e for e in ops.auto_choices() if e["config"] == key[1:]]
    assert entry["ms"] == pytest.approx({"fast": 1.0, "slow": 2.0}) and chosen == "fast"
    autoselect.clear_auto_choices()


def test_a_cpu_candidate_that_raises_while_timed_is_not_chosen(monkeypatch):
    calls = {"flaky": 0}

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] > 1:  # its untimed call works, a timed one raises
            raise RuntimeError("out of scratch space")

    monkeypatch.setattr(autoselect, "device_measurable", lambda device: True)
    monkeypatch.delenv("RESFUSE_AUTO_MEASURE", raising=False)
    autoselect.clear_auto_choices()
    with pytest.warns(UserWarning, match="flaky .* failed"):
        assert autoselect.choose(("op", "flaky"), {"flaky": flaky, "ok": lambda: None}, torch.device("cpu")) == "ok"
    (entry,) = ops.auto_choices()
    assert entry["ms"]["flaky"].startswith("RuntimeError: out of scratch space")
    autoselect.clear_auto_choices()
