"""Mixed precision: resfuse blocks inside torch.autocast against torchvision inside the same autocast.

The usual way ResNets train (fp32 weights, bf16 activations). Error against a float64 run of the same
module without autocast is at most 2x torchvision's own autocast error, plus a small floor (bf16's own error
is ~1e-2: the factor of 2 is the slack, not the floor).
"""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

from _helpers import (backends_on, randn, randomize_bn_, rel_err, resfuse,
                      skip_triton_bf16_under_interpreter)

FUSED_CPU_BACKENDS = [b for b in backends_on("cpu") if b != "reference"]


def _within(ours, theirs, exact, what, floor):
    assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact) + floor, what


CASES = [pytest.param("cpu", b, id=f"cpu-{b}") for b in FUSED_CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in ("cuda", "triton")]


def _step(model, x, train, autocast):
    x = x.detach().clone().requires_grad_(train)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    if train:
        out.float().square().mean().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_under_autocast(device, backend, train):
    skip_triton_bf16_under_interpreter(backend, torch.bfloat16, device)
    torch.manual_seed(0)
    ds = nn.Sequential(tv.conv1x1(12, 24, 2), nn.BatchNorm2d(24))
    theirs = randomize_bn_(tv.BasicBlock(12, 24, 2, ds)).to(device).train(train)
    exact = copy.deepcopy(theirs).double()
    ours = resfuse.convert(copy.deepcopy(theirs), backend=backend)
    x = randn(8, 12, 16, 16, device=device)
    out64, gx64 = _step(exact, x.double(), train, autocast=False)
    out_t, gx_t = _step(theirs, x, train, autocast=True)
    out_o, gx_o = _step(ours, x, train, autocast=True)
    assert out_o.dtype == out_t.dtype == torch.bfloat16
    _within(out_o, out_t, out64, "out", 1e-4)
    if train:
        _within(gx_o, gx_t, gx64, "grad input", 1e-3)
        for (name, p64), p_t, p_o in zip(exact.named_parameters(), theirs.parameters(), ours.parameters()):
            assert p_o.grad.dtype == torch.float32, name
            _within(p_o.grad, p_t.grad, p64.grad, name, 1e-3)
        for (name, b64), b_t, b_o in zip(exact.named_buffers(), theirs.buffers(), ours.buffers()):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b_o, b_t), name
            else:
                assert b_o.dtype == torch.float32, name
                _within(b_o, b_t, b64, name, 1e-4)


def test_resnet18_train_step_under_autocast():
    backend = "cuda" if "cuda" in FUSED_CPU_BACKENDS else "reference"
    torch.manual_seed(0)
    theirs = randomize_bn_(torchvision.models.resnet18(num_classes=10)).train()
    exact = copy.deepcopy(theirs).double()
    ours = resfuse.convert(copy.deepcopy(theirs), backend=backend)
    x = randn(8, 3, 64, 64)
    target = torch.arange(8) % 10
    results = []
    for model, inp, autocast in ((exact, x.double(), False), (theirs, x, True), (ours, x, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(inp)
            loss = nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits64, g64), (logits_t, g_t), (logits_o, g_o) = results
    # logits, not the scalar loss: one number's error is too noisy for a 2x comparison
    _within(logits_o, logits_t, logits64, "logits", 1e-4)
    for name, g in g64.items():
        _within(g_o[name], g_t[name], g, name, 1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        theirs.eval(), ours.eval(), exact.eval()
        _within(ours(x), theirs(x), exact(x.double()), "eval logits", 1e-4)
