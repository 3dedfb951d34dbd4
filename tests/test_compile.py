"""torch.compile sees resfuse's registered ops: fullgraph forward + backward, no graph break."""
import copy

import pytest
import torch
from torchvision.models import resnet as tv

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse

# Every backend whose forward goes through registered ops (the reference backend is plain PyTorch).
OP_BACKENDS = [b for b in backends_on("cpu") if b != "reference"]


def pair(backend, train):
    torch.manual_seed(0)
    ref = randomize_bn_(tv.BasicBlock(6, 8, stride=2, downsample=torch.nn.Sequential(
        tv.conv1x1(6, 8, 2), torch.nn.BatchNorm2d(8)))).train(train)
    ours = resfuse.convert(copy.deepcopy(ref), backend=backend)
    return ref, ours


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_block_fullgraph_forward_backward(backend, train, compiler):
    if compiler == "inductor" and backend == "triton":
        pytest.skip("one inductor build per mode is enough on CPU; triton is covered by aot_eager")
    torch._dynamo.reset()
    ref, ours = pair(backend, train)
    compiled = torch.compile(ours, fullgraph=True, backend=compiler)
    x_ref = randn(2, 6, 7, 7).requires_grad_(True)
    x_ours = x_ref.detach().clone().requires_grad_(True)
    out_ref, out = ref(x_ref), compiled(x_ours)
    assert rel_err(out, out_ref) < 1e-5
    out_ref.sum().backward()
    out.sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) < 2e-5
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 2e-5, name
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_compiled_graph_calls_resfuse_ops(backend):
    torch._dynamo.reset()
    _, ours = pair(backend, train=True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(ours, fullgraph=True, backend=capture)(randn(2, 6, 7, 7))
    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert any("resfuse" in t and "bn_act" in t for t in targets), targets
