"""A converted model's whole training step (forward, loss, backward, SGD step) captured in one CUDA graph after a
warm-up replays with the same results as eager PyTorch: the loss of every step, the parameters after the last,
the BN running statistics and ``num_batches_tracked``. And ``auto`` asked to measure inside a capture (a model
captured without a warm-up) raises an error that says to warm up, instead of recording a measurement.

``TrainStep`` is the recipe of PyTorch's CUDA graph notes: static input tensors filled in place, a few eager
steps on a side stream, then one capture of the step, replayed for each batch. On CPU the same object runs
every step eagerly through the same static tensors and is checked against a plain training loop, so that a
failure on a GPU points at the graph, not at the bookkeeping. Errors follow the house rule: ours against a
float64 run at most 2x eager PyTorch's own at that dtype, plus a small floor.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet as tv

from _helpers import backends_on, randomize_bn_, rel_err, resfuse

STEPS = 6
WARMUP = 3  # eager steps before the capture: auto measures, Triton autotunes, SGD makes its momentum buffers
LR = 1e-3  # small steps: a trajectory that amplifies rounding would compare chaos, not kernels
BATCH, CLASSES, SIZE = 8, 10, 32
FLOOR = 1e-5


def tiny_resnet(block: str) -> torch.nn.Module:
    """A torchvision ResNet with one block per stage and non-trivial BN statistics."""
    torch.manual_seed(0)
    cls = tv.BasicBlock if block == "basic" else tv.Bottleneck
    return randomize_bn_(tv.ResNet(cls, [1, 1, 1, 1], num_classes=CLASSES))


def batches(device, dtype):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        out.append((x.to(device, dtype).contiguous(memory_format=torch.channels_last), y.to(device)))
    return out


class TrainStep:
    """One SGD step of ``model`` on a batch, over static tensors. ``capture``: the first ``WARMUP`` steps run
    eagerly on a side stream, the next one is captured into a CUDA graph (which runs nothing) and replayed, and
    every later step only copies its batch into the static inputs and replays."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, capture: bool):
        self.model, self.capture = model, capture
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        self.x, self.y = torch.zeros_like(x), torch.zeros_like(y)
        self.steps, self.graph, self.loss = 0, None, None

    def _step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)  # inside a capture: the backward allocates from the graph's pool
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        self.steps += 1
        if self.capture and self.steps > WARMUP:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.loss = self._step()
            self.graph.replay()
            return self.loss.detach().clone()
        if not self.capture:
            return self._step().detach().clone()
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture will be
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._step().detach().clone()
        torch.cuda.current_stream().wait_stream(side)
        return loss


def plain_loop(model, data):
    """Eager PyTorch's training loop, written out: the truth for ``TrainStep``'s bookkeeping."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def run_train_step(model, data, capture):
    step = TrainStep(model, *data[0], capture=capture)
    losses = torch.stack([step(x, y) for x, y in data])
    if capture:
        assert step.graph is not None  # the last steps were replays
    return losses


def state(model):
    """Parameters and BN buffers (running statistics, num_batches_tracked), by name."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


def assert_as_close_as_eager(ours, theirs, exact, what):
    assert rel_err(ours, exact) <= 2 * rel_err(theirs, exact) + FLOOR, what


def check_training(ours_model, ours_losses, theirs_model, theirs_losses, exact_model, exact_losses):
    assert_as_close_as_eager(ours_losses, theirs_losses, exact_losses, "losses")
    ours, theirs, exact = state(ours_model), state(theirs_model), state(exact_model)
    assert ours.keys() == exact.keys()
    for name, value in exact.items():
        if name.endswith("num_batches_tracked"):
            assert ours[name].item() == value.item() == STEPS, name
            continue
        assert_as_close_as_eager(ours[name], theirs[name], value, name)


def _pair(block, backend, device):
    exact = tiny_resnet(block).double().to(device, memory_format=torch.channels_last).train()
    theirs = copy.deepcopy(exact).float()
    ours = resfuse.convert(copy.deepcopy(theirs), backend=backend)
    return exact, theirs, ours


def test_train_step_matches_the_plain_loop_on_cpu():
    """The static-tensor step (no capture on CPU) trains the converted model as eager PyTorch's loop trains
    torchvision's. One model and the extension's CPU kernels where built: the bookkeeping is what is checked
    here, the blocks and backends are the GPU test's."""
    backend = "cuda" if "cuda" in backends_on("cpu") else "reference"
    exact, theirs, ours = _pair("basic", backend, "cpu")
    exact_losses = plain_loop(exact, batches("cpu", torch.float64))
    theirs_losses = plain_loop(theirs, batches("cpu", torch.float32))
    ours_losses = run_train_step(ours, batches("cpu", torch.float32), capture=False)
    check_training(ours, ours_losses, theirs, theirs_losses, exact, exact_losses)


@pytest.fixture
def exact_fp32():
    """fp32 without TF32, on both sides: the comparison is about the graph, not cuDNN's rounding."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_captured_train_step_replays_as_eager(block, backend, exact_fp32):
    if backend != "auto":
        reason = resfuse.ops.backend.unavailable_reason(backend, torch.device("cuda"))
        if reason is not None:
            pytest.skip(reason)
    resfuse.ops.clear_auto_choices()
    exact, theirs, ours = _pair(block, backend, "cuda")
    exact_losses = plain_loop(exact, batches("cuda", torch.float64))
    theirs_losses = plain_loop(theirs, batches("cuda", torch.float32))
    ours_losses = run_train_step(ours, batches("cuda", torch.float32), capture=True)
    check_training(ours, ours_losses, theirs, theirs_losses, exact, exact_losses)


@pytest.mark.cuda
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_auto_capture_without_warm_up_is_an_error(train):
    """auto measures a configuration on its first call: inside a capture that is an error saying to warm up,
    never a measurement recorded into the graph."""
    fused = [b for b in ("cuda", "triton") if resfuse.ops.backend.unavailable_reason(b, torch.device("cuda")) is None]
    if train and len(fused) < 2:
        pytest.skip(f"training BN has one candidate here ({fused}): auto takes it without measuring")
    resfuse.ops.clear_auto_choices()
    model = resfuse.convert(tiny_resnet("basic").cuda().to(memory_format=torch.channels_last), backend="auto")
    model.train(train)
    x = batches("cuda", torch.float32)[0][0]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.set_grad_enabled(train), torch.cuda.graph(graph):
            model(x)
