"""convert()/revert() on whole torchvision ResNets: same numbers in eval and over SGD steps in train."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse

CPU_BACKENDS = backends_on("cpu")
# The interpreter runs Triton kernels one program at a time in Python: whole models stay on the C++ kernels.
MODEL_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]


def blocks_of(model):
    return [m for m in model.modules() if isinstance(m, (tv.BasicBlock, tv.Bottleneck, resfuse.BasicBlock,
                                                         resfuse.Bottleneck))]


def test_convert_swaps_every_block_and_keeps_everything():
    model = randomize_bn_(torchvision.models.resnet18()).to(torch.float64, memory_format=torch.channels_last)
    model.layer2.eval()
    params_before = {name: p for name, p in model.named_parameters()}
    state_before = copy.deepcopy(model.state_dict())
    converted = resfuse.convert(model, backend="reference")
    assert converted is model
    blocks = blocks_of(model)
    assert len(blocks) == 8 and all(type(b) is resfuse.BasicBlock for b in blocks)
    assert all(b.backend == "reference" for b in blocks)
    assert not model.layer2[0].training and model.layer3[0].training
    # the very same Parameter objects: an optimizer built before convert() keeps working
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert model.layer1[0].conv1.weight.dtype == torch.float64
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in state_before.items():
        assert torch.equal(model.state_dict()[key], value), key

    reverted = resfuse.revert(model)
    assert reverted is model
    assert all(type(b) is tv.BasicBlock for b in blocks_of(model))
    assert not hasattr(model.layer1[0], "backend")
    assert list(model.state_dict()) == list(state_before)
    for key, value in state_before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_convert_a_single_block_and_bottlenecks():
    block = tv.Bottleneck(16, 4)
    new = resfuse.convert(block)
    assert type(new) is resfuse.Bottleneck and new.conv1 is block.conv1
    assert type(resfuse.revert(new)) is tv.Bottleneck
    model = torchvision.models.resnet50()
    resfuse.convert(model)
    assert len(blocks_of(model)) == 16 and all(type(b) is resfuse.Bottleneck for b in blocks_of(model))


def test_convert_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown resfuse backend"):
        resfuse.convert(torchvision.models.resnet18(), backend="fastest")


def test_convert_reference_blocks_and_nested_containers():
    model = nn.Sequential(resfuse.reference.BasicBlock(4, 4), nn.Sequential(tv.BasicBlock(4, 4)))
    resfuse.convert(model)
    assert type(model[0]) is resfuse.BasicBlock and type(model[1][0]) is resfuse.BasicBlock
    resfuse.revert(model)
    assert type(model[0]) is resfuse.reference.BasicBlock and type(model[1][0]) is tv.BasicBlock


def _models():
    return [("resnet18", 32), ("resnet50", 32)]


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch,size", _models())
def test_whole_model_eval(backend, arch, size):
    torch.manual_seed(0)
    ref = randomize_bn_(getattr(torchvision.models, arch)()).eval()
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    x = randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch,size", _models())
def test_whole_model_three_sgd_steps(backend, arch, size):
    torch.manual_seed(0)
    ref = randomize_bn_(getattr(torchvision.models, arch)(num_classes=10)).train()
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x = randn(4, 3, size, size, seed=step)
        target = torch.arange(4) % 10
        losses = []
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss.detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            model.grads = grads
        assert rel_err(losses[1], losses[0]) < 1e-5
        for name, g in ref.grads.items():
            assert rel_err(ours.grads[name], g) < 1e-3, (step, name)
    for key, value in ref.state_dict().items():
        mine = ours.state_dict()[key]
        if key.endswith("num_batches_tracked"):
            assert torch.equal(mine, value) and value.item() == 3, key
        else:
            assert rel_err(mine, value) < 1e-4, key
