"""Bad inputs get a clear ValueError/RuntimeError naming what was expected and what came."""
import pytest
import torch

from _helpers import backends_on, randn, resfuse

CPU_BACKENDS = backends_on("cpu")


@pytest.fixture(params=CPU_BACKENDS)
def block(request):
    return resfuse.BasicBlock(8, 8, backend=request.param)


def test_wrong_channel_count(block):
    with pytest.raises(ValueError, match="expected input with 8 channels, got 5"):
        block(randn(2, 5, 4, 4))


def test_not_4d(block):
    with pytest.raises(ValueError, match="4-D"):
        block(randn(8, 4, 4))


def test_integer_dtype(block):
    with pytest.raises(ValueError, match="floating-point"):
        block(torch.ones(2, 8, 4, 4, dtype=torch.int64))


def test_dtype_mismatch(block):
    with pytest.raises(RuntimeError, match="does not match the block's weight dtype"):
        block(randn(2, 8, 4, 4, dtype=torch.float64))


def test_device_mismatch(block):
    with pytest.raises(RuntimeError, match="input is on meta but the block's weights are on cpu"):
        block(torch.empty(2, 8, 4, 4, device="meta"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_argument_checks(backend):
    x = randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \[4\]"):
        resfuse.ops.bn_act(x, weight=torch.ones(3), backend=backend)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        resfuse.ops.bn_act(x, residual=randn(2, 4, 3, 4), backend=backend)
    with pytest.raises(RuntimeError, match="residual has dtype torch.float64"):
        resfuse.ops.bn_act(x, residual=randn(2, 4, 3, 3, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        resfuse.ops.bn_act(x, running_mean=torch.zeros(4), backend=backend)
    with pytest.raises(ValueError, match="expected input with 6 channels, got 4"):
        resfuse.ops.conv_bn_act(x, randn(5, 6, 3, 3), backend=backend)
    with pytest.raises(RuntimeError, match="weight has dtype torch.float64"):
        resfuse.ops.conv_bn_act(x, randn(5, 4, 3, 3, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        resfuse.ops.conv_bn_act(x, randn(5, 4, 3, 3), residual=randn(2, 5, 3, 3), backend=backend)
