"""resfuse.ops.block_tail (bn_squeeze + the gate in torch + bn_scale_act) against timm's own blocks: a timm
Bottleneck with an SE or ECA attention layer and drop_path, run eagerly, against the same block's convs
followed by the fused tail, in float64 with random weights and randomized BN statistics; timm's drop_path mask
drawn bit for bit; half precision by the 2x rule; NaN/Inf; torch.compile; ResNet stage shapes on a GPU."""
import copy

import pytest
import torch
from timm.layers import DropPath, drop_path
from timm.layers.eca import EcaModule
from timm.layers.squeeze_excite import SEModule
from timm.models.resnet import Bottleneck

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse, skip_triton_bf16_under_interpreter
from test_special_values import assert_same_special_values

CPU_BACKENDS = backends_on("cpu")
ATTN = {"se": SEModule, "eca": EcaModule, "none": None}


def se_gate(se):
    """timm's SEModule without its final multiplication: the squeeze [N, C] -> the factor [N, C]."""
    return lambda s: se.gate(se.fc2(se.act(se.bn(se.fc1(s[:, :, None, None]))))).flatten(1)


def eca_gate(eca):
    """timm's EcaModule without its final multiplication."""
    def gate(s):
        y = eca.conv(s.view(s.shape[0], 1, -1))
        if eca.conv2 is not None:
            y = eca.conv2(eca.act(y))
        return eca.gate(y).view(s.shape[0], -1)
    return gate


def gate_of(block):
    if block.se is None:
        return None
    return se_gate(block.se) if isinstance(block.se, SEModule) else eca_gate(block.se)


def make_block(attn, drop_prob, dtype=torch.float64, planes=4, seed=0):
    torch.manual_seed(seed)
    inplanes = planes * 4 + 4  # a downsample (conv + BN) makes the shortcut
    downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * 4, 1, bias=False),
                                     torch.nn.BatchNorm2d(planes * 4))
    block = Bottleneck(inplanes, planes, downsample=downsample, attn_layer=ATTN[attn],
                       drop_path=DropPath(drop_prob) if drop_prob else None)
    return randomize_bn_(block, seed).to(dtype)


def fused_forward(block, x, backend):
    """timm's Bottleneck.forward with everything after conv3 replaced by the fused tail (the convs and the
    first two BNs stay eager: only the tail is under test)."""
    shortcut = block.downsample(x) if block.downsample is not None else x
    y = block.act1(block.bn1(block.conv1(x)))
    y = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(y)))))
    y = block.conv3(y)
    drop_prob = block.drop_path.drop_prob if block.drop_path is not None else 0.0
    keep = resfuse.ops.drop_path_mask(y, drop_prob, block.training)
    bn = block.bn3
    if block.training:
        bn.num_batches_tracked += 1  # what nn.BatchNorm2d's forward does; block_tail only updates the stats
    return resfuse.ops.block_tail(y, shortcut, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum,
                                  bn.eps, block.training, gate=gate_of(block), keep=keep, backend=backend)


def run_both(block, x, backend, seed=3):
    """Forward and backward of timm's block and of the fused one (a copy), with the same RNG state."""
    ours = copy.deepcopy(block)
    results = []
    for model, forward in ((block, lambda m, t: m(t)), (ours, lambda m, t: fused_forward(m, t, backend))):
        leaf = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)
        out = forward(model, leaf)
        out.backward(randn(*out.shape, dtype=out.dtype, seed=11))
        results.append((out, leaf.grad, model))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("drop_prob", [0.2, 0.5])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_mask_is_timms_bit_for_bit(dtype, drop_prob, scale_by_keep):
    x = randn(64, 3, 2, 2, dtype=dtype)
    for seed in range(3):
        torch.manual_seed(seed)
        theirs = drop_path(torch.ones_like(x), drop_prob, True, scale_by_keep)[:, :1, :1, :1]
        torch.manual_seed(seed)
        ours = resfuse.ops.drop_path_mask(x, drop_prob, True, scale_by_keep)
        assert ours.dtype == dtype and torch.equal(ours, theirs)
        assert 0 < int((ours == 0).sum()) < 64  # some samples dropped, some kept
    assert resfuse.ops.drop_path_mask(x, drop_prob, False) is None
    assert resfuse.ops.drop_path_mask(x, 0.0, True) is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("attn", ["se", "eca", "none"])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_step_matches_timm_float64(backend, attn, drop_prob, layout):
    """Output, input gradient, every parameter's gradient and every BN buffer, to 1e-9: the gradient through
    the gate, the squeeze and the batch statistics included."""
    block = make_block(attn, drop_prob).train()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(6, block.conv1.in_channels, 5, 7, dtype=torch.float64, memory_format=fmt)
    (out_ref, gx_ref, ref), (out, gx, ours) = run_both(block, x, backend)
    if drop_prob:
        dropped = (out_ref - torch.relu(copy.deepcopy(ref.downsample)(x))).abs().flatten(1).amax(1) == 0
        assert 0 < int(dropped.sum()) < 6, "the seed must drop some samples and keep others"
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-12)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for (name, b_ref), b in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("attn", ["se", "eca"])
@pytest.mark.parametrize("folded", [False, True], ids=["running_stats", "folded"])
def test_eval_matches_timm_float64(backend, attn, folded):
    """Eval: BN from the running statistics in the fused pass, or folded into conv3 (no BN in the tail)."""
    block = make_block(attn, 0.3).eval()
    x = randn(3, block.conv1.in_channels, 6, 5, dtype=torch.float64)
    expected = block(x)
    ours = copy.deepcopy(block)
    if folded:
        bn, conv = ours.bn3, ours.conv3
        weight, bias = resfuse.reference.fold_bn_ref(conv.weight, None, bn.weight, bn.bias, bn.running_mean,
                                                     bn.running_var, bn.eps)
        conv.weight.data.copy_(weight)
        y = ours.conv3(ours.aa(ours.act2(ours.bn2(ours.conv2(ours.act1(ours.bn1(ours.conv1(x))))))))
        out = resfuse.ops.block_tail(y + bias.view(1, -1, 1, 1), ours.downsample(x), training=False,
                                     gate=gate_of(ours), backend=backend)
    else:
        out = fused_forward(ours, x, backend)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_second_order_gradients(backend, train):
    """gradcheck and gradgradcheck of the tail with an SE gate and a drop mask, over y, the shortcut, BN's
    affine and the gate's weights (fast mode: random projections, which any wrong term still moves)."""
    torch.manual_seed(0)
    c, n = 8, 3
    se = SEModule(c, rd_ratio=0.25).double()
    y = (randn(n, c, 3, 2, dtype=torch.float64, seed=1) * 2 + 1).requires_grad_(True)
    r = randn(n, c, 3, 2, dtype=torch.float64, seed=2).requires_grad_(True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = randn(c, dtype=torch.float64, seed=3).requires_grad_(True)
    rm, rv = randn(c, dtype=torch.float64, seed=4) * 0.1, torch.rand(c, dtype=torch.float64) + 0.5
    keep = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64) if train else None
    names = [name for name, _ in se.named_parameters()]

    def fn(y, r, w, b, *gate_params):
        params = dict(zip(names, gate_params))
        return resfuse.ops.block_tail(y, r, w, b, rm.clone(), rv.clone(), 0.1, 1e-5, train,
                                      gate=lambda s: _se_gate_functional(params, s), keep=keep, backend=backend)

    params = tuple(p.detach().clone().requires_grad_(True) for p in se.parameters())
    assert torch.autograd.gradcheck(fn, (y, r, w, b, *params), fast_mode=True)
    # The second order is the same torch math for every flavour; the Triton flavour's routing to it is checked
    # by test_bn_*::test_create_graph_*: the interpreter is spared this one.
    if backend != "triton":
        assert torch.autograd.gradgradcheck(fn, (y, r, w, b, *params), fast_mode=True)


def _se_gate_functional(p, s):
    """se_gate with the SE module's parameters given (gradcheck differentiates through them)."""
    h = torch.relu(torch.nn.functional.conv2d(s[:, :, None, None], p["fc1.weight"], p["fc1.bias"]))
    return torch.sigmoid(torch.nn.functional.conv2d(h, p["fc2.weight"], p["fc2.bias"])).flatten(1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_precision_within_twice_timm_error(backend, dtype, train):
    """Our error against the float64 block at most 2x timm's own at this dtype (plus a small floor), forward
    and the input gradient."""
    skip_triton_bf16_under_interpreter(backend, dtype)
    block = make_block("se", 0.3).train(train)
    x = randn(4, block.conv1.in_channels, 6, 6, dtype=torch.float64, memory_format=torch.channels_last)
    exact = run_both(block, x, "reference")[0]
    half = copy.deepcopy(block).to(dtype)
    (out_t, gx_t, _), (out, gx, _) = run_both(half, x.to(dtype), backend)
    assert rel_err(out, exact[0]) <= 2 * rel_err(out_t, exact[0]) + 1e-3
    if train:
        assert rel_err(gx, exact[1]) <= 2 * rel_err(gx_t, exact[1]) + 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "residual"])
def test_special_values_as_eager(backend, value, where):
    """NaN and Inf come out where eager's BN -> SE -> drop -> add -> ReLU puts them, forward and backward."""
    torch.manual_seed(0)
    n, c = 3, 8
    se = SEModule(c, rd_ratio=0.25)
    y, r = randn(n, c, 3, 5, seed=1), randn(n, c, 3, 5, seed=2)
    target = y if where == "input" else r
    target[1, 2, 0, 3] = value
    w, b = torch.rand(c) + 0.5, randn(c, seed=3)
    keep = torch.tensor([1.5, 0.0, 1.5])
    results = []
    for fn in (lambda y, r, w, b: resfuse.ops.block_tail(y, r, w, b, gate=se_gate(se), keep=keep, backend=backend),
               lambda y, r, w, b: torch.relu(se(torch.nn.functional.batch_norm(y, None, None, w, b, True))
                                             * keep.view(-1, 1, 1, 1) + r)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (y, r, w, b)]
        out = fn(*leaves)
        out.backward(randn(n, c, 3, 5, seed=4))
        results.append([out] + [t.grad for t in leaves])
    for actual, expected in zip(*results):
        assert_same_special_values(actual, expected)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_compile_fullgraph(backend):
    """torch.compile traces the tail, gate and drop mask included, without a graph break, forward and
    backward, and the graph calls both fused ops."""
    torch._dynamo.reset()
    block = make_block("se", 0.0).train()
    x = randn(4, block.conv1.in_channels, 5, 5)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    ours = copy.deepcopy(block).float()
    compiled = torch.compile(lambda t: fused_forward(ours, t, backend), fullgraph=True, backend=capture)
    out = compiled(x.clone().requires_grad_(True))
    out.sum().backward()
    expected = copy.deepcopy(block).float()(x)
    assert rel_err(out, expected) < 1e-5
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert any("bn_squeeze" in t for t in targets) and any("bn_scale_act" in t for t in targets), targets


# ResNet-50 stage shapes (the tail's conv3 output): GPU only.
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels,size", STAGES, ids=[f"C{c}_H{s}" for c, s in STAGES])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_stage_shapes_on_gpu(backend, channels, size, train):
    """bf16 channels_last at ResNet-50's stage shapes, against float64 by the 2x rule: output, and in
    training the gradients of y, the shortcut and the gate's weights. Unverified until a GPU runs it."""
    torch.manual_seed(0)
    n = 16
    se = SEModule(channels).cuda()
    bn = randomize_bn_(torch.nn.BatchNorm2d(channels)).cuda().train(train)
    y = randn(n, channels, size, size, device="cuda", memory_format=torch.channels_last) * 2 + 1
    r = randn(n, channels, size, size, device="cuda", seed=1, memory_format=torch.channels_last)
    grad = randn(n, channels, size, size, device="cuda", seed=2, memory_format=torch.channels_last)
    results = {}
    for name, dtype in (("exact", torch.float64), ("eager", torch.bfloat16), ("ours", torch.bfloat16)):
        m_se, m_bn = copy.deepcopy(se).to(dtype), copy.deepcopy(bn).to(dtype)
        leaves = [t.to(dtype).detach().requires_grad_(train) for t in (y, r)]
        if name == "ours":
            out = resfuse.ops.block_tail(leaves[0], leaves[1], m_bn.weight, m_bn.bias, m_bn.running_mean,
                                         m_bn.running_var, m_bn.momentum, m_bn.eps, train, gate=se_gate(m_se),
                                         backend=backend)
        else:
            out = torch.relu(m_se(m_bn(leaves[0])) + leaves[1])
        grads = torch.autograd.grad(out, leaves + [m_se.fc1.weight], grad.to(dtype)) if train else ()
        results[name] = (out, *grads)
    for k, (ours, eager, exact) in enumerate(zip(results["ours"], results["eager"], results["exact"])):
        assert rel_err(ours, exact) <= 2 * rel_err(eager, exact) + 1e-3, k
