"""timm's own machinery on a converted ResNet: forward_features / forward_head / forward_intermediates,
features_only, set_grad_checkpointing, reset_classifier, reparameterize_model and torch.compile(fullgraph=True)
keep working and give timm's numbers (float64, random weights, randomized BN statistics)."""
import copy
import warnings

import pytest
import torch

from _helpers import backends_on, randomize_bn_, rel_err, resfuse
from test_timm_resnet import CountFusedOps, compare_steps, convert_with_report

timm = pytest.importorskip("timm")
from timm.models import resnet as timm_resnet  # noqa: E402

if "cuda" not in backends_on("cpu"):
    pytest.skip("needs the resfuse._C extension: without it a converted model runs timm's own forward",
                allow_module_level=True)

TOL = 1e-9


def tiny_pair():
    """A one-block-per-stage timm ResNet with a deep stem, avg-down shortcuts and SE: every path, at little cost."""
    torch.manual_seed(0)
    ref = timm_resnet.ResNet(timm_resnet.BasicBlock, (1, 1, 1, 1), num_classes=8, channels=(8, 16, 32, 64),
                             stem_width=8, stem_type="deep", avg_down=True,
                             block_args={"attn_layer": "se"}).to(torch.float64)
    randomize_bn_(ref)
    fused = copy.deepcopy(ref)
    report = convert_with_report(fused)
    assert report.startswith("resfuse.convert: 4 blocks fused (4 TimmBasicBlock), 1 ResNet stem fused"), report
    return ref.eval(), fused.eval()


def image(n=2, px=64):
    return torch.randn(n, 3, px, px, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_forward_features_head_and_intermediates():
    ref, fused = tiny_pair()
    x = image()
    with torch.no_grad():
        with CountFusedOps() as counter:
            features = fused.forward_features(x)
        # two per block, four avg-down shortcuts (the deep stem ends at 16 channels), the deep stem's three
        assert counter.count == 4 * 2 + 4 + 3
        assert rel_err(features, ref.forward_features(x)) < TOL
        assert rel_err(fused.forward_head(features, pre_logits=True),
                       ref.forward_head(features, pre_logits=True)) < TOL
        final, inter = fused.forward_intermediates(x)
        final_ref, inter_ref = ref.forward_intermediates(x)
        assert rel_err(final, final_ref) < TOL and len(inter) == len(inter_ref) == 5
        for ours, theirs in zip(inter, inter_ref):
            assert rel_err(ours, theirs) < TOL
        some = fused.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert [t.shape for t in some] == [inter_ref[1].shape, inter_ref[3].shape]


def test_features_only():
    torch.manual_seed(0)
    ref = timm.create_model("resnet26t", features_only=True, channels=(16, 32, 64, 128), stem_width=16)
    ref = randomize_bn_(ref.to(torch.float64)).eval()
    fused = copy.deepcopy(ref)
    report = convert_with_report(fused)
    assert "8 blocks fused (8 TimmBottleneck)" in report and "1 stem Sequential fused" in report, report
    x = image()
    with torch.no_grad():
        outs, outs_ref = fused(x), ref(x)
    assert len(outs) == len(outs_ref) == 5
    for ours, theirs in zip(outs, outs_ref):
        assert rel_err(ours, theirs) < TOL


def test_grad_checkpointing_recomputes_the_fused_blocks_and_trains_as_timm():
    ref, fused = tiny_pair()
    x = image()
    counts = []
    for enable in (False, True):
        fused.set_grad_checkpointing(enable)
        with CountFusedOps() as counter:
            fused.train()(x).sum().backward()
        counts.append(counter.count)
    assert counts[1] == counts[0] + 4 * 3 + 4  # the blocks' fused ops (the SE tail is two) run again in the backward
    fused.load_state_dict(ref.state_dict())
    ref.set_grad_checkpointing(True)
    compare_steps(ref, fused, x, steps=1)


def test_reset_classifier_and_reparameterize_model():
    ref, fused = tiny_pair()
    for model in (ref, fused):
        model.reset_classifier(3)
    fused.fc.load_state_dict(ref.fc.state_dict())
    x = image()
    with torch.no_grad():
        assert fused(x).shape == (2, 3) and rel_err(fused(x), ref(x)) < TOL
    again = timm.utils.reparameterize_model(fused)
    assert type(again.layer1[0]) is type(fused.layer1[0]) and type(again) is type(fused)
    with torch.no_grad(), CountFusedOps() as counter:
        out = again(x)
    assert counter.count > 0 and rel_err(out, ref(x)) < TOL


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph(train):
    torch._dynamo.reset()
    ref, fused = tiny_pair()
    ref.train(train)
    fused.train(train)
    graphs = []

    def aot_eager_seen(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    x = image(px=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(fused, fullgraph=True, backend=aot_eager_seen)
        out, out_ref = compiled(x), ref(x)
    assert rel_err(out, out_ref) < TOL and len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert any("resfuse" in t for t in targets), targets
    if train:
        out.sum().backward()
        out_ref.sum().backward()
        for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
            assert rel_err(p.grad, p_ref.grad) < TOL, name
        for (name, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
            assert rel_err(b, b_ref) < TOL, name
