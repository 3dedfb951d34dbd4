"""Second-order gradients (create_graph=True: gradient penalties, MAML, influence functions) of every op and
block, by torch.autograd.gradgradcheck in float64, on every backend here. Values stay off the ReLU kink.
Before the backward ops had an Autograd kernel, bn_act's second derivatives came out 0 and conv_bn_act's
missed the ReLU-masked terms."""
import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torchvision.models import resnet as tv

from _helpers import backends_on, randn, randomize_bn_, resfuse

CPU_BACKENDS = backends_on("cpu")


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act(backend, relu):
    x = _leaf(randn(2, 3, 3, 2, dtype=torch.float64, seed=1) * 2 + 1)
    w = _leaf(torch.rand(3, dtype=torch.float64) + 0.5)
    b = _leaf(randn(3, dtype=torch.float64, seed=2))
    r = _leaf(randn(2, 3, 3, 2, dtype=torch.float64, seed=3))

    def fn(x, w, b, r):
        return resfuse.ops.bn_act(x, w, b, r, None, None, 0.1, 1e-5, relu, backend=backend)

    assert gradgradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bn_act_without_affine(backend):
    x = _leaf(randn(2, 3, 2, 2, dtype=torch.float64, seed=1))

    def fn(x):
        return resfuse.ops.bn_act(x, relu=False, backend=backend)

    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
def test_conv_bn_act(backend, relu):
    x = _leaf(randn(2, 4, 4, 4, dtype=torch.float64, seed=1))
    w = _leaf(randn(6, 2, 3, 3, dtype=torch.float64, seed=2))
    b = _leaf(randn(6, dtype=torch.float64, seed=3))
    r = _leaf(randn(2, 6, 2, 2, dtype=torch.float64, seed=4))

    def fn(x, w, b, r):
        return resfuse.ops.conv_bn_act(x, w, b, r, stride=2, padding=1, groups=2, relu=relu, backend=backend)

    assert gradgradcheck(fn, (x, w, b, r), fast_mode=True)


def _block(name, train):
    torch.manual_seed(0)
    if name == "basic":
        ref = tv.BasicBlock(3, 4, 2, torch.nn.Sequential(tv.conv1x1(3, 4, 2), torch.nn.BatchNorm2d(4)))
    else:
        ref = tv.Bottleneck(4, 1)
    return randomize_bn_(ref).double().train(train)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["basic", "bottleneck"])
def test_block(backend, train, name):
    """Every parameter and the input: second derivatives through the fused ops, the batch statistics (train)
    and the per-call BN fold (eval), against the same check on torchvision's block."""
    ref = _block(name, train)
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    x = _leaf(randn(2, ref.conv1.in_channels, 3, 3, dtype=torch.float64, seed=5))
    names = [n for n, _ in ours.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(ours, dict(zip(names, params)), (x,))

    params = [_leaf(p) for p in ours.parameters()]
    # fast mode: random projections of the Jacobians, which any wrong second derivative still moves
    assert gradcheck(fn, (x, *params), fast_mode=True)
    assert gradgradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_gradient_penalty_matches_eager(backend):
    """A WGAN-GP-style penalty: ||d out / d x||^2 differentiated again, against torchvision's block."""
    ref = _block("basic", True)
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    results = []
    for model in (ref, ours):
        x = _leaf(randn(2, 3, 4, 4, dtype=torch.float64, seed=6))
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        model.zero_grad()
        gx.square().sum().backward()
        results.append([x.grad] + [p.grad for p in model.parameters()])
    for a, e in zip(*reversed(results)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
