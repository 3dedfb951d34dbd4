"""resfuse.ConvBNReLU against nn.Conv2d + nn.BatchNorm2d (+ ReLU)."""
import copy

import pytest
import torch
from torch import nn

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse

CPU_BACKENDS = backends_on("cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=1, stride=2),
                                    dict(kernel_size=7, stride=2, padding=3),
                                    dict(kernel_size=3, padding=2, dilation=2, groups=2)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_matches_conv_bn_relu(backend, kwargs, relu, train):
    torch.manual_seed(0)
    ours = randomize_bn_(resfuse.ConvBNReLU(4, 6, relu=relu, backend=backend, **kwargs)).train(train)
    ref_conv, ref_bn = copy.deepcopy(ours.conv), copy.deepcopy(ours.bn)
    x_ref = randn(3, 4, 9, 8).requires_grad_(True)
    x_ours = x_ref.detach().clone().requires_grad_(True)
    expected = ref_bn(ref_conv(x_ref))
    expected = torch.relu(expected) if relu else expected
    out = ours(x_ours)
    assert rel_err(out, expected) < 1e-5
    grad = randn(*out.shape, seed=3)
    expected.backward(grad)
    out.backward(grad)
    assert rel_err(x_ours.grad, x_ref.grad) < 2e-5
    for p_ours, p_ref in zip(list(ours.conv.parameters()) + list(ours.bn.parameters()),
                             list(ref_conv.parameters()) + list(ref_bn.parameters())):
        assert rel_err(p_ours.grad, p_ref.grad) < 2e-5
    torch.testing.assert_close(ours.bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(ours.bn.running_var, ref_bn.running_var)


def test_state_dict_keys_and_from_modules():
    unit = resfuse.ConvBNReLU(3, 5, 3, padding=1)
    assert list(unit.state_dict()) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                       "bn.running_var", "bn.num_batches_tracked"]
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5)
    wrapped = resfuse.ConvBNReLU.from_modules(conv, bn, relu=False)
    assert wrapped.conv is conv and wrapped.bn is bn and wrapped.relu is False
    x = randn(2, 3, 6, 6)
    wrapped.eval(), bn.eval()
    randomize_bn_(wrapped)
    with torch.no_grad():
        assert rel_err(wrapped(x), bn(conv(x))) < 1e-5  # a conv bias folds in too


def test_residual_argument():
    unit = randomize_bn_(resfuse.ConvBNReLU(4, 4, 3, padding=1)).eval()
    x, res = randn(2, 4, 5, 5), randn(2, 4, 5, 5, seed=2)
    with torch.no_grad():
        assert rel_err(unit(x, res), torch.relu(unit.bn(unit.conv(x)) + res)) < 1e-5
