"""The cached eval-mode BN fold is reused while nothing changed and never returned stale."""
import pytest
import torch
from torchvision.models import resnet as tv

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse
from resfuse.nn.fold import folded_weight_bias

FUSED_CPU_BACKENDS = [b for b in backends_on("cpu") if b != "reference"]


def eval_pair(backend):
    torch.manual_seed(0)
    ref = randomize_bn_(tv.BasicBlock(6, 6)).eval()
    ours = resfuse.BasicBlock(6, 6, backend=backend).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def check(ref, ours, x):
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-5


def test_fold_is_cached_until_something_changes():
    block = randomize_bn_(resfuse.BasicBlock(4, 4)).eval()
    with torch.no_grad():
        w1, b1 = folded_weight_bias(block.conv1, block.bn1)
        w2, b2 = folded_weight_bias(block.conv1, block.bn1)
        assert w1 is w2 and b1 is b2
        block.bn1.running_var.mul_(2)
        w3, _ = folded_weight_bias(block.conv1, block.bn1)
    assert w3 is not w1
    assert not torch.equal(w3, w1)


def test_no_cache_while_autograd_needs_the_fold():
    block = resfuse.BasicBlock(4, 4).eval()
    w1, _ = folded_weight_bias(block.conv1, block.bn1)
    w2, _ = folded_weight_bias(block.conv1, block.bn1)
    assert w1.requires_grad and w1 is not w2


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("change", ["running_mean", "running_var", "bn_weight", "bn_bias", "conv_weight",
                                    "eps"])
def test_in_place_changes_invalidate(backend, change):
    ref, ours = eval_pair(backend)
    x = randn(2, 6, 5, 5)
    check(ref, ours, x)
    for block in (ref, ours):
        with torch.no_grad():
            if change == "running_mean":
                block.bn2.running_mean.add_(0.5)
            elif change == "running_var":
                block.bn2.running_var.mul_(3.0)
            elif change == "bn_weight":
                block.bn1.weight.mul_(-1.0)
            elif change == "bn_bias":
                block.bn1.bias.add_(1.0)
            elif change == "conv_weight":
                block.conv2.weight.mul_(0.5)
            else:
                block.bn1.eps = 0.5
    check(ref, ours, x)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_optimizer_step_and_training_invalidate(backend):
    ref, ours = eval_pair(backend)
    x = randn(2, 6, 5, 5)
    check(ref, ours, x)
    for block in (ref, ours):
        opt = torch.optim.SGD(block.parameters(), lr=0.1)
        block.train()
        block(x).square().mean().backward()
        opt.step()
        block.eval()
    check(ref, ours, x)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_load_state_dict_invalidates(backend):
    ref, ours = eval_pair(backend)
    x = randn(2, 6, 5, 5)
    check(ref, ours, x)
    other = randomize_bn_(tv.BasicBlock(6, 6), seed=5)
    ref.load_state_dict(other.state_dict())
    ours.load_state_dict(other.state_dict())
    check(ref, ours, x)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_dtype_change_invalidates(backend):
    ref, ours = eval_pair(backend)
    x = randn(2, 6, 5, 5)
    check(ref, ours, x)
    ref.double(), ours.double()
    with torch.no_grad():
        out = ours(x.double())
        assert out.dtype == torch.float64
        assert rel_err(out, ref(x.double())) < 1e-12
    ref.float(), ours.float()
    check(ref, ours, x)


def test_gemm_layout_fold_needs_no_repack():
    """The Triton conv's weight packing is a no-op (no copy) on a fold cached in GEMM layout."""
    from resfuse.nn.fold import gemm_layout

    block = randomize_bn_(resfuse.BasicBlock(6, 6)).eval()
    with torch.no_grad():
        w, _ = folded_weight_bias(block.conv1, block.bn1, for_gemm=True)
        w_plain, _ = folded_weight_bias(block.conv1, block.bn1)
    assert torch.equal(w, w_plain) and w.shape == block.conv1.weight.shape
    packed = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])
    assert packed.is_contiguous() and packed.data_ptr() == w.data_ptr()
    assert torch.equal(gemm_layout(w_plain), w_plain)
