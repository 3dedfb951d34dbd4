"""On a GPU: resfuse blocks and whole models on every fused backend against torchvision on the same GPU.

Skipped without a GPU (tests/conftest.py). Half precision by flash-attention's rule: our error against a
float64 run of the same module is at most 2x torchvision's own error at that dtype, plus a small floor.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

from _helpers import randn, randomize_bn_, rel_err, resfuse

pytestmark = pytest.mark.cuda

# auto: in eval, cuDNN's fused conv where it runs (resfuse/ops/cudnn_fused.py); in training, the cuda backend
GPU_BACKENDS = ["cuda", "triton", "auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ResNet-18 stages (identity blocks) and a downsampling block, at a batch that keeps the suite quick.
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on both sides: TF32 would make the fp32 comparisons about cuDNN's rounding, not ours."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _available(backend):
    if backend == "auto":  # always runs: on what it finds
        return
    reason = resfuse.ops.backend.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


def _within(ours, theirs, exact, what, floor):
    assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact) + floor, what


# Small floors: in half precision eager's own error (~1e-3 fp16, ~1e-2 bf16) already makes the factor of 2 the
# slack. Gradients through a ReLU see its mask flip wherever an output rounds across zero differently (ours
# rounds once, eager rounds BN, add and ReLU separately), so they get a little more. Not yet run on a GPU at
# these values.
OUT_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 2e-4}
GRAD_FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 2e-3}


def _run(block, x, train, grad):
    x = x.detach().clone().requires_grad_(train)
    out = block(x)
    if train:
        out.backward(grad.to(out.dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", STAGES + [(96, 28, "downsample")], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_basicblock_stage(backend, dtype, stage, train):
    _available(backend)
    channels, size = stage[:2]
    downsample = len(stage) == 3
    torch.manual_seed(0)
    inplanes = channels // 2 if downsample else channels
    ds = nn.Sequential(tv.conv1x1(inplanes, channels, 2), nn.BatchNorm2d(channels)) if downsample else None
    exact = randomize_bn_(tv.BasicBlock(inplanes, channels, 2 if downsample else 1, ds)).cuda().double()
    theirs = copy.deepcopy(exact).to(dtype, memory_format=torch.channels_last)
    ours = resfuse.convert(copy.deepcopy(theirs), backend=backend)
    for m in (exact, theirs, ours):
        m.train(train)
    in_size = size * 2 if downsample else size
    x = randn(8, inplanes, in_size, in_size, device="cuda", memory_format=torch.channels_last)
    grad = randn(8, channels, size, size, device="cuda", seed=3)
    out64, gx64 = _run(exact, x.double(), train, grad.double())
    out_t, gx_t = _run(theirs, x.to(dtype), train, grad)
    out_o, gx_o = _run(ours, x.to(dtype), train, grad)
    assert out_o.dtype == dtype and out_o.is_contiguous(memory_format=torch.channels_last)
    _within(out_o, out_t, out64, "out", OUT_FLOOR[dtype])
    if train:
        floor = GRAD_FLOOR[dtype]
        _within(gx_o, gx_t, gx64, "grad input", floor)
        for (name, p64), p_t, p_o in zip(exact.named_parameters(), theirs.parameters(), ours.parameters()):
            _within(p_o.grad, p_t.grad, p64.grad, name, floor)
        for (name, b64), b_t, b_o in zip(exact.named_buffers(), theirs.buffers(), ours.buffers()):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b_o, b_t), name
            else:
                _within(b_o, b_t, b64, name, OUT_FLOOR[dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bottleneck_and_resnext_blocks(backend, train):
    _available(backend)
    torch.manual_seed(0)
    for channels, block in ((256, tv.Bottleneck(256, 64)), (512, tv.Bottleneck(512, 128, groups=32, base_width=4))):
        exact = randomize_bn_(block).cuda().double().train(train)
        ours = resfuse.convert(copy.deepcopy(exact), backend=backend)
        x = randn(4, channels, 14, 14, dtype=torch.float64, device="cuda")
        with torch.no_grad():
            assert rel_err(ours(x), exact(x)) < 1e-10


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_whole_model_three_sgd_steps_float64(backend, arch):
    _available(backend)
    torch.manual_seed(0)
    ref = randomize_bn_(getattr(torchvision.models, arch)(num_classes=10)).cuda().double().train()
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, ours)]
    for step in range(3):
        x = randn(8, 3, 64, 64, dtype=torch.float64, device="cuda", seed=step)
        target = torch.arange(8, device="cuda") % 10
        losses, grads = [], []
        for model, opt in zip((ref, ours), optimizers):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        assert rel_err(losses[1], losses[0]) < 1e-7, step
        for name, g in grads[0].items():
            assert rel_err(grads[1][name], g) < 1e-7, (step, name)
    for key, value in ref.state_dict().items():
        mine = ours.state_dict()[key]
        if key.endswith("num_batches_tracked"):
            assert torch.equal(mine, value), key
        else:
            assert rel_err(mine, value) < 1e-7, key
