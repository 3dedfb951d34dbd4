"""resfuse.ops.bn_act(process_group=...) across spawned gloo processes: synchronised BatchNorm + residual + ReLU.

Every rank builds the same global batch from one seed and runs its slice; the parent compares the ranks' outputs
and input gradients (concatenated), weight and bias gradients (summed over ranks, as DDP's all-reduce would) and
running statistics (on every rank) with nn.BatchNorm2d run in one process, in float64, on the whole batch:
what nn.SyncBatchNorm computes, which itself refuses CPU tensors.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _distributed import Gang
from _helpers import backends_on, randn, rel_err, resfuse

CPU_BACKENDS = backends_on("cpu")
BATCHES = {2: [3, 5], 3: [3, 5, 4]}
WITH_EMPTY = {2: [0, 5], 3: [3, 0, 4]}
C, HW = 5, (4, 3)
MOMENTUM, EPS = 0.1, 1e-5


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def gang(request):
    g = Gang(request.param)
    yield g
    g.close()


def global_case(total, seed=0, offset=0.0):
    """The whole batch, in float64: input, residual, output gradient, affine parameters, running statistics."""
    shape = (total, C, *HW)
    return dict(x=randn(*shape, seed=seed) * 2.0 + offset, residual=randn(*shape, seed=seed + 1),
                grad=randn(*shape, seed=seed + 2), weight=randn(C, seed=seed + 3) * 0.3 + 1.0,
                bias=randn(C, seed=seed + 4) * 0.2, running_mean=randn(C, seed=seed + 5) * 0.1 + offset,
                running_var=randn(C, seed=seed + 6).abs() + 0.5)


def _run_rank(rank, world_size, batches, dtype, backend, layout, seed, offset):
    """One rank's synchronised bn_act on its slice of the global batch: forward, backward, running stats."""
    case = global_case(sum(batches), seed, offset)
    lo = sum(batches[:rank])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def local(t):
        return t[lo:lo + batches[rank]].to(dtype).contiguous(memory_format=fmt).requires_grad_()

    x, residual = local(case["x"]), local(case["residual"])
    weight = case["weight"].to(dtype).requires_grad_()
    bias = case["bias"].to(dtype).requires_grad_()
    rm, rv = case["running_mean"].to(dtype), case["running_var"].to(dtype)
    out = resfuse.ops.bn_act(x, weight, bias, residual, rm, rv, MOMENTUM, EPS, relu=True, backend=backend,
                             process_group=dist.group.WORLD)
    out.backward(case["grad"][lo:lo + batches[rank]].to(dtype).contiguous(memory_format=fmt))
    return dict(out=out.detach(), x=x.grad, residual=residual.grad, weight=weight.grad, bias=bias.grad,
                running_mean=rm, running_var=rv, channels_last=out.is_contiguous(memory_format=torch.channels_last))


def eager(batches, dtype, seed, offset):
    """nn.BatchNorm2d + residual + ReLU on the whole batch in one process, in ``dtype``, from the same values the
    ranks had (rounded to ``dtype`` first), returned in float64."""
    case = global_case(sum(batches), seed, offset)
    bn = torch.nn.BatchNorm2d(C, eps=EPS, momentum=MOMENTUM).to(dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(case[name].to(dtype))
    x = case["x"].to(dtype).requires_grad_()
    residual = case["residual"].to(dtype).requires_grad_()
    out = F.relu(bn(x) + residual)
    out.backward(case["grad"].to(dtype))
    grads = dict(out=out.detach(), x=x.grad, residual=residual.grad, weight=bn.weight.grad, bias=bn.bias.grad,
                 running_mean=bn.running_mean, running_var=bn.running_var)
    return {k: v.double() for k, v in grads.items()}


def gathered(results):
    """The ranks' results as one run's: activations concatenated, parameter gradients summed, and the running
    statistics, which every rank must hold identically."""
    merged = {k: torch.cat([r[k].double() for r in results]) for k in ("out", "x", "residual")}
    merged.update({k: sum(r[k].double() for r in results) for k in ("weight", "bias")})
    for k in ("running_mean", "running_var"):
        for r in results[1:]:
            assert torch.equal(r[k], results[0][k]), f"{k} differs between ranks"
        merged[k] = results[0][k].double()
    return merged


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("empty_rank", [False, True], ids=["uneven", "empty_rank"])
def test_float64_matches_one_process_batchnorm(gang, backend, layout, empty_rank):
    batches = (WITH_EMPTY if empty_rank else BATCHES)[gang.world_size]
    results = gang.run(_run_rank, batches, torch.float64, backend, layout, 0, 0.0)
    ours, expected = gathered(results), eager(batches, torch.float64, 0, 0.0)
    for name, value in expected.items():
        assert rel_err(ours[name], value) < 1e-9, name
    if layout == "channels_last":
        assert all(r["channels_last"] for r, b in zip(results, batches) if b > 0)


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "mean_1e4_std"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_mean(gang, dtype, offset):
    """|mean| >> std: the statistics must not cancel. float64 to 1e-9; float32 by the 2x rule: our error against
    float64 at most twice nn.BatchNorm2d's own in float32, plus a floor."""
    batches = BATCHES[gang.world_size]
    results = gang.run(_run_rank, batches, dtype, "cuda" if "cuda" in CPU_BACKENDS else "reference",
                       "channels_last", 1, offset)
    ours, truth = gathered(results), eager(batches, torch.float64, 1, offset)
    if dtype == torch.float64:
        for name, value in truth.items():
            assert rel_err(ours[name], value) < 1e-9, name
        return
    theirs = eager(batches, dtype, 1, offset)
    for name, value in truth.items():
        ours_err, eager_err = rel_err(ours[name], value), rel_err(theirs[name], value)
        assert ours_err <= 2 * eager_err + 1e-6, f"{name}: {ours_err:.3g} vs eager's {eager_err:.3g}"


class _OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _logged_step(rank, world_size, batches, input_grad):
    case = global_case(sum(batches))
    lo = sum(batches[:rank])
    x = case["x"][lo:lo + batches[rank]].float().requires_grad_(input_grad)
    weight = case["weight"].float().requires_grad_()
    rm, rv = case["running_mean"].float(), case["running_var"].float()
    with _OpLog() as log:
        out = resfuse.ops.bn_act(x, weight, None, None, rm, rv, MOMENTUM, EPS, relu=True,
                                 process_group=dist.group.WORLD)
        forward = list(log.names)
        out.sum().backward()
    return forward, log.names[len(forward):]


@pytest.mark.parametrize("input_grad", [True, False])
def test_one_collective_each_way_and_no_host_sync(gang, input_grad):
    """One all-gather forward; one all-reduce backward, and none when the input needs no gradient (as
    nn.SyncBatchNorm); nothing read back to the host (.item(), boolean masks: aten._local_scalar_dense,
    aten.nonzero), an empty rank included."""
    for batches in (BATCHES[gang.world_size], WITH_EMPTY[gang.world_size]):
        for forward, backward in gang.run(_logged_step, batches, input_grad):
            collectives = [n for n in forward + backward if n.startswith("_c10d_functional.") and "wait" not in n]
            assert [n for n in forward if n in collectives] == ["_c10d_functional.all_gather_into_tensor"]
            assert [n for n in backward if n in collectives] == (["_c10d_functional.all_reduce"] if input_grad
                                                                 else [])
            synced = [n for n in forward + backward if n in ("aten._local_scalar_dense", "aten.nonzero",
                                                             "aten.item")]
            assert not synced, synced


def _compiled_step(rank, world_size):
    """bn_act(process_group=...) eager and under torch.compile(fullgraph=True) (AOT autograd, graphs recorded):
    max differences of out, grad x, grad weight, running_mean, and the ops of the forward and backward graphs."""
    import torch._dynamo as dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    case = global_case(sum(BATCHES[world_size]), seed=3)
    lo = sum(BATCHES[world_size][:rank])
    x = case["x"][lo:lo + BATCHES[world_size][rank]]

    def run(fn):
        xs, w, b = x.clone().requires_grad_(), case["weight"].clone().requires_grad_(), case["bias"].clone()
        rm, rv = case["running_mean"].clone(), case["running_var"].clone()
        out = fn(xs, w, b, rm, rv)
        out.backward(torch.ones_like(out))
        return out.detach(), xs.grad, w.grad, rm

    def step(xs, w, b, rm, rv):
        return resfuse.ops.bn_act(xs, w, b, None, rm, rv, MOMENTUM, EPS, relu=True, process_group=dist.group.WORLD)

    dynamo.reset()
    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=recorder("forward"),
                                                      bw_compiler=recorder("backward"))))
    return [float((a - c).abs().max()) for a, c in zip(eager, compiled)], graphs


def test_torch_compile_traces_one_graph_with_functional_collectives(gang):
    """fullgraph=True: no graph break; the collectives are in the compiled forward and backward graphs."""
    if gang.world_size != 2:
        pytest.skip("tracing does not depend on the world size; compiling costs ~30 s per gang")
    for differences, graphs in gang.run(_compiled_step):
        assert differences == [0.0] * 4, differences
        assert any("all_gather_into_tensor" in op for op in graphs["forward"]), graphs["forward"]
        assert any("all_reduce" in op for op in graphs["backward"]), graphs["backward"]
