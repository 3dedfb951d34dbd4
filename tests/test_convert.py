"""convert()/revert() on whole torchvision ResNets: same numbers in eval and over SGD steps in train."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse
from resfuse.nn.eager_blocks import EagerBasicBlock

CPU_BACKENDS = backends_on("cpu")
# The interpreter runs Triton kernels one program at a time in Python: whole models stay on the C++ kernels. The
# reference backend runs torchvision's own forward, so a model test on it would compare torchvision with itself.
MODEL_BACKENDS = [b for b in CPU_BACKENDS if b not in ("triton", "reference")] or [
    pytest.param("cuda", marks=pytest.mark.skip(reason="needs the resfuse._C extension: without it a converted "
                                                       "model runs torchvision's own forward"))]


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
    model = nn.Sequential(EagerBasicBlock(4, 4), nn.Sequential(tv.BasicBlock(4, 4)))
    resfuse.convert(model)
    assert type(model[0]) is resfuse.BasicBlock and type(model[1][0]) is resfuse.BasicBlock
    resfuse.revert(model)
    assert type(model[0]) is EagerBasicBlock and type(model[1][0]) is tv.BasicBlock


def _models():
    return [("resnet18", 64), ("resnet50", 64)]


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
@pytest.mark.parametrize("arch,kwargs", [("resnext50_32x4d", {}),
                                         ("resnet50", {"replace_stride_with_dilation": [False, True, True]})],
                         ids=["resnext50_32x4d", "dilated_resnet50"])
def test_grouped_and_dilated_models(backend, arch, kwargs):
    """ResNeXt (groups=32) and dilated ResNet-50: eval outputs and one float64 training step."""
    torch.manual_seed(0)
    ref = randomize_bn_(getattr(torchvision.models, arch)(num_classes=10, **kwargs)).double()
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    x = randn(2, 3, 64, 64, dtype=torch.float64)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-10
    ref.train(), ours.train()
    assert_models_match(ref, ours, sgd_steps(ref, ours, 1, torch.float64, 64), tol=1e-9)


def sgd_steps(ref, ours, steps, dtype, size):
    """Train both models side by side; returns per step (loss, output, grads) of each."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    history = []
    for step in range(steps):
        x = randn(4, 3, size, size, seed=step, dtype=dtype)
        target = torch.arange(4) % 10
        record = []
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            record.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            opt.step()
        history.append(record)
    return history


def assert_models_match(ref, ours, history, tol):
    for step, ((loss_ref, grads_ref), (loss_ours, grads_ours)) in enumerate(history):
        assert rel_err(loss_ours, loss_ref) < tol, step
        for name, g in grads_ref.items():
            assert rel_err(grads_ours[name], g) < tol, (step, name)
    our_state = ours.state_dict()
    for key, value in ref.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(our_state[key], value) and value.item() == len(history), key
        else:
            assert rel_err(our_state[key], value) < tol, key


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch,size", _models())
def test_whole_model_three_sgd_steps_float64(backend, arch, size):
    """Three SGD steps (momentum 0.9) in float64: loss, every grad, running stats, num_batches_tracked.

    float64 because a randomly initialised ResNet on a 4-image batch is chaotic under SGD: PyTorch's own
    float32 rounding differences grow ~100x per step, so float32 trajectories diverge whoever computes them.
    """
    torch.manual_seed(0)
    ref = randomize_bn_(getattr(torchvision.models, arch)(num_classes=10)).double().train()
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    history = sgd_steps(ref, ours, 3, torch.float64, size)
    assert_models_match(ref, ours, history, tol=1e-7)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch,size", _models())
def test_whole_model_train_step_float32(backend, arch, size):
    """float32 against a float64 run: our error is at most 2x torchvision's own float32 error (+ a floor)."""
    torch.manual_seed(0)
    torch_fp32 = randomize_bn_(getattr(torchvision.models, arch)(num_classes=10)).train()
    exact = copy.deepcopy(torch_fp32).double()
    ours = resfuse.convert(copy.deepcopy(torch_fp32), backend=backend)
    x = randn(4, 3, size, size)
    target = torch.arange(4) % 10
    results = []
    for model, inp in ((exact, x.double()), (torch_fp32, x), (ours, x)):
        loss = nn.functional.cross_entropy(model(inp), target)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (loss64, grads64, state64), (loss_t, grads_t, state_t), (loss_o, grads_o, state_o) = results

    def within(mine, theirs, truth, what):
        assert rel_err(mine, truth) <= 2 * rel_err(theirs, truth) + 1e-5, what

    within(loss_o, loss_t, loss64, "loss")
    for name, g in grads64.items():
        within(grads_o[name], grads_t[name], g, name)
    for key, value in state64.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(state_o[key], state_t[key]), key
        else:
            within(state_o[key], state_t[key], value, key)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_stem_is_fused_with_state_dict_unchanged(backend):
    """The ResNet itself is re-classed (its stem runs fused); conv1, bn1 and relu keep their classes."""
    import io

    from resfuse.nn.fused_resnet import TorchvisionResNet

    torch.manual_seed(0)
    ref = randomize_bn_(torchvision.models.resnet18(num_classes=10)).double()
    keys = list(ref.state_dict())
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    assert type(ours) is TorchvisionResNet and isinstance(ours, torchvision.models.ResNet)
    assert type(ours.conv1) is nn.Conv2d and type(ours.bn1) is nn.BatchNorm2d and type(ours.relu) is nn.ReLU
    assert list(ours.state_dict()) == keys
    x = randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        ref.train(train), ours.train(train)
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) < 1e-10, train
    assert rel_err(ours.bn1.running_var, ref.bn1.running_var) < 1e-12
    assert ours.bn1.num_batches_tracked.item() == 1
    # a whole-model pickle (torch.save(model)) round-trips the fused class
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is TorchvisionResNet
    with torch.no_grad():
        assert rel_err(loaded.eval()(x), ref.eval()(x)) < 1e-10
    state = copy.deepcopy(ours.state_dict())
    resfuse.revert(ours)
    assert type(ours) is torchvision.models.ResNet and "_resfuse_backend" not in ours.__dict__
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_stem_fusion_can_be_turned_off():
    model = resfuse.convert(torchvision.models.resnet18(), stem=False)
    assert type(model) is torchvision.models.ResNet
