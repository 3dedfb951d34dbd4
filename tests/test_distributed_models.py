"""Converted blocks and models across spawned gloo processes: nn.SyncBatchNorm fused, and DDP.

- A BasicBlock, a Bottleneck (both with a downsample) and a whole resnet18 at 32 px, converted with their
  BatchNorms made nn.SyncBatchNorm (in either order of resfuse.convert and convert_sync_batchnorm): one training
  step on every rank's slice of a global batch matches torchvision's model with nn.BatchNorm2d run in one process
  on the whole batch, in float64 to 1e-9 (outputs, every gradient summed over the ranks, every buffer) and in
  float32 by the 2x rule. nn.SyncBatchNorm itself refuses CPU tensors, so the truth is the one-process run.
- DDP over a converted resnet18 with plain BatchNorm: its gradients equal the average over the ranks of eager's,
  DDP still all-reduces them in buckets, as many as for the eager model, and no_sync() accumulates locally.
  (DDP refuses nn.SyncBatchNorm in a CPU module: DDP with SyncBatchNorm runs on GPUs only, not here.)

The expected values are computed on rank 0 (it builds the global batch from the same seed), so that only error
figures and small tensors travel back to the test process.
"""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from _distributed import Gang
from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse

FUSED_BACKENDS = [b for b in backends_on("cpu") if b != "reference"]
BATCHES = {2: [3, 5], 3: [3, 5, 4]}
WITH_EMPTY = {2: [0, 5], 3: [3, 0, 4]}
ORDERS = ("convert_then_sync", "sync_then_convert")

pytestmark = pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend on CPU (extension not built, no triton)")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def gang(request):
    g = Gang(request.param)
    yield g
    g.close()


def make_model(kind: str) -> nn.Module:
    """torchvision's model with nn.BatchNorm2d, float64, random weights and BN statistics; and its input size."""
    torch.manual_seed(0)
    if kind == "basic":
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        model = torchvision.models.resnet.BasicBlock(8, 16, stride=2, downsample=downsample)
    elif kind == "bottleneck":
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        model = torchvision.models.resnet.Bottleneck(8, 4, downsample=downsample)
    else:
        model = torchvision.models.resnet18(num_classes=10)
    return randomize_bn_(model.double())


def input_shape(kind: str, total: int) -> tuple:
    return (total, 3, 32, 32) if kind == "resnet18" else (total, 8, 8, 8)


def output_shape(kind: str, total: int) -> tuple:
    return {"resnet18": (total, 10), "basic": (total, 16, 4, 4), "bottleneck": (total, 16, 8, 8)}[kind]


def fused_sync(model: nn.Module, order: str, backend: str) -> nn.Module:
    """``model`` with its BatchNorms made nn.SyncBatchNorm and its blocks converted, in ``order``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", resfuse.ConversionWarning)
        if order == "convert_then_sync":
            return nn.SyncBatchNorm.convert_sync_batchnorm(resfuse.convert(model, backend=backend))
        return resfuse.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model), backend=backend)


def global_batch(kind: str, total: int, seed: int = 0):
    """The whole batch's input and output gradient, float64."""
    x = randn(*input_shape(kind, total), dtype=torch.float64, seed=seed)
    return x, randn(*output_shape(kind, total), dtype=torch.float64, seed=seed + 1)


def eager_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One training step of ``model`` (modified in place): output, parameter gradients, buffers."""
    model.train()
    out = model(x)
    out.backward(grad)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).double() for n, p in model.named_parameters()}
    return out.detach().double(), grads, {n: b.double() for n, b in model.named_buffers()}


def _sync_step(rank, world_size, kind, batches, dtype, backend, order):
    ref = make_model(kind)
    ours = fused_sync(copy.deepcopy(ref).to(dtype), order, backend)
    total, lo = sum(batches), sum(batches[:rank])
    x, grad = global_batch(kind, total)
    local = slice(lo, lo + batches[rank])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads, buffers = eager_step(ours, x[local].to(dtype), grad[local].to(dtype))
    for g in grads.values():
        dist.all_reduce(g)  # the sum over the ranks: what one process gets from the whole batch
    result = dict(out=out, buffers=buffers, warnings=[str(w.message) for w in caught])
    if rank == 0:
        truth = eager_step(copy.deepcopy(ref), x, grad)
        theirs = eager_step(copy.deepcopy(ref).to(dtype), x.to(dtype), grad.to(dtype))
        result.update(truth=truth, eager_errors={n: rel_err(g, truth[1][n]) for n, g in theirs[1].items()},
                      eager_out_error=rel_err(theirs[0], truth[0]),
                      eager_buffer_errors={n: rel_err(b, truth[2][n]) for n, b in theirs[2].items()},
                      grad_errors={n: rel_err(g, truth[1][n]) for n, g in grads.items()})
    return result


# In float32, a pre-activation within a rounding of zero can land on either side of a ReLU in any two
# computations (eager's and ours round differently), which keeps or zeroes its whole gradient. At 32 px with 12
# samples, resnet18's last stage holds 1x1 feature maps: so few elements that one flip there moves every upstream
# gradient by ~3e-3 (seen in CI: 2.9e-3 on every parameter, the outputs within the 2x rule). The float64 test
# above pins the arithmetic to 1e-9; this floor only admits a flip.
RELU_KINK_FLOOR = {"bottleneck": 1e-5, "resnet18": 1e-2}


def check_sync_step(results, batches, dtype, grad_floor=1e-5):
    rank0 = results[0]
    truth_out, _, truth_buffers = rank0["truth"]
    for r in results:
        assert not [w for w in r["warnings"] if "unfused" in w], r["warnings"]
        for name, b in r["buffers"].items():
            assert torch.equal(b, rank0["buffers"][name]), f"{name} differs between ranks"
    out = torch.cat([r["out"] for r in results])
    if dtype == torch.float64:
        assert rel_err(out, truth_out) < 1e-9
        bad = {n: e for n, e in rank0["grad_errors"].items() if not e < 1e-9}
        assert not bad, bad
        for name, b in rank0["buffers"].items():
            assert rel_err(b, truth_buffers[name]) < 1e-9, name
        return
    assert rel_err(out, truth_out) <= 2 * rank0["eager_out_error"] + 1e-5
    bad = {n: (e, rank0["eager_errors"][n]) for n, e in rank0["grad_errors"].items()
           if not e <= 2 * rank0["eager_errors"][n] + grad_floor}
    assert not bad, bad
    for name, b in rank0["buffers"].items():
        assert rel_err(b, truth_buffers[name]) <= 2 * rank0["eager_buffer_errors"][name] + 1e-6, name


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("empty_rank", [False, True], ids=["uneven", "empty_rank"])
def test_block_training_step_float64(gang, kind, empty_rank):
    # One backend: the Triton passes are checked against the C++ ones' math op by op (test_distributed_bn_act.py).
    batches = (WITH_EMPTY if empty_rank else BATCHES)[gang.world_size]
    results = gang.run(_sync_step, kind, batches, torch.float64, FUSED_BACKENDS[0], "sync_then_convert")
    check_sync_step(results, batches, torch.float64)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("empty_rank", [False, True], ids=["uneven", "empty_rank"])
def test_resnet18_training_step_float64(gang, order, empty_rank):
    batches = (WITH_EMPTY if empty_rank else BATCHES)[gang.world_size]
    results = gang.run(_sync_step, "resnet18", batches, torch.float64, FUSED_BACKENDS[0], order)
    check_sync_step(results, batches, torch.float64)


@pytest.mark.parametrize("kind", ["bottleneck", "resnet18"])
def test_training_step_float32_by_the_2x_rule(gang, kind):
    batches = BATCHES[gang.world_size]
    results = gang.run(_sync_step, kind, batches, torch.float32, FUSED_BACKENDS[0], "convert_then_sync")
    check_sync_step(results, batches, torch.float32, grad_floor=RELU_KINK_FLOOR[kind])


# ---------------------------------------------------------------------------------------------------------------
# DDP


def _run_ddp(model, steps, local, accumulate):
    """Two DDP steps of ``model`` (the first under no_sync with ``accumulate``): the gradients after the first
    (``no_sync`` only) and after both, and the parameter count of each bucket DDP all-reduced, per step."""
    # 5 MB buckets: resnet18 in float64 (89 MB) is cut into several, as a real model is at the 25 MB default.
    ddp = DistributedDataParallel(model, bucket_cap_mb=5)
    log = []

    def recording_allreduce(state, bucket):
        log[-1].append(len(bucket.parameters()))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    result = {}
    for i, (x, grad) in enumerate(steps):
        log.append([])
        if accumulate and i == 0:
            with ddp.no_sync():
                ddp(x[local]).backward(grad[local])
            # Not synchronised yet: every rank holds the gradient of its own slice.
            result["no_sync"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        else:
            ddp(x[local]).backward(grad[local])
    result.update(grads={n: p.grad.clone() for n, p in model.named_parameters()}, buckets=log)
    return result


def _ddp_step(rank, world_size, batches, backend, accumulate):
    """Two DDP steps (the first under no_sync with ``accumulate``) of a converted resnet18 with plain BatchNorm, and
    of the eager one for its buckets; rank 0 also returns the eager expectation: the rank average of eager's
    gradients. (DDP refuses nn.SyncBatchNorm in a CPU module, so DDP with SyncBatchNorm cannot run here; the
    synchronised model's step is tested above against the one-process run.)"""
    ref = make_model("resnet18")
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", resfuse.ConversionWarning)
        resfuse.convert(ours, backend=backend)
    total, lo = sum(batches), sum(batches[:rank])
    steps = [global_batch("resnet18", total, seed) for seed in (0, 2)]
    local = slice(lo, lo + batches[rank])
    result = _run_ddp(ours, steps, local, accumulate)
    if not accumulate:
        result["eager_buckets"] = _run_ddp(copy.deepcopy(ref), steps, local, accumulate)["buckets"]
    if rank == 0:
        expected, first = {}, None
        for i, (x, grad) in enumerate(steps):
            slices = []
            for r in range(world_size):
                part = slice(sum(batches[:r]), sum(batches[:r + 1]))
                slices.append(eager_step(copy.deepcopy(ref), x[part], grad[part])[1])
            if i == 0:
                first = slices
            expected = {n: expected.get(n, 0) + sum(s[n] for s in slices) / world_size for n in slices[0]}
        result.update(expected=expected, first_slices=first)
    return result


def test_ddp_gradients_are_the_rank_average_of_eager(gang):
    results = gang.run(_ddp_step, BATCHES[gang.world_size], FUSED_BACKENDS[0], False)
    expected = results[0]["expected"]
    n_params = len(expected)
    for r in results:
        # DDP's buckets: one on the first step, then rebuilt in the order the gradients came: as many as eager's
        # (the fused backward hands some gradients over in another order, so the layout may differ).
        assert r["buckets"][0] == [n_params] and len(r["buckets"][1]) > 1 and sum(r["buckets"][1]) == n_params
        assert len(r["buckets"][1]) == len(r["eager_buckets"][1]), (r["buckets"], r["eager_buckets"])
        bad = {n: rel_err(g, expected[n]) for n, g in r["grads"].items() if not rel_err(g, expected[n]) < 1e-9}
        assert not bad, bad


def test_ddp_no_sync_accumulates_locally(gang):
    results = gang.run(_ddp_step, BATCHES[gang.world_size], FUSED_BACKENDS[0], True)
    expected, slices = results[0]["expected"], results[0]["first_slices"]
    for rank, r in enumerate(results):
        assert r["buckets"][0] == [] and sum(r["buckets"][1]) == len(expected)  # nothing all-reduced under no_sync
        bad = {n: rel_err(g, slices[rank][n]) for n, g in r["no_sync"].items()
               if not rel_err(g, slices[rank][n]) < 1e-9}
        assert not bad, bad
        bad = {n: rel_err(g, expected[n]) for n, g in r["grads"].items() if not rel_err(g, expected[n]) < 1e-9}
        assert not bad, bad


# ---------------------------------------------------------------------------------------------------------------
# Conversion, in one process


@pytest.mark.parametrize("order", ORDERS)
def test_both_orders_fuse_and_revert_gives_syncbatchnorm_back(order):
    ref = make_model("resnet18")
    ours = fused_sync(copy.deepcopy(ref), order, FUSED_BACKENDS[0])
    ref_sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(ours).__name__ == "TorchvisionResNet" and type(ours.layer1[0]) is resfuse.BasicBlock
    assert type(ours.bn1) is nn.SyncBatchNorm and type(ours.layer2[0].downsample[1]) is nn.SyncBatchNorm
    resfuse.revert(ours)
    assert type(ours) is torchvision.models.ResNet and type(ours.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert [type(m) for m in ours.modules()] == [type(m) for m in ref_sync.modules()]
    state, ref_state = ours.state_dict(), ref_sync.state_dict()
    assert list(state) == list(ref_state) and all(torch.equal(state[k], ref_state[k]) for k in state)
