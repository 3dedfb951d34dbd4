"""timm's ResNets through resfuse.convert(): timm's own numbers in float64 (eval, and two SGD steps over every
output, gradient, parameter and running statistic), every block fused or named in the report, strict, revert.

Random weights, randomized BN statistics, no download. Each model is the registry's configuration (block, stem,
downsample, attention, aa, cardinality, width multiplier) with its stage widths cut 4x (``SMALL``): the same
code paths at a cost two shared CPU cores can pay. 64 px inputs: at 32 px the last stage's BN sees 2 values per
channel, whose training gradient is so ill-conditioned that float64's rounding alone moves it by 1e-6.
"""
import collections
import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import backends_on, randomize_bn_, rel_err, resfuse
from resfuse._warn_once import forget_warnings
from resfuse.nn.convert import ConversionWarning

timm = pytest.importorskip("timm")
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402

if "cuda" not in backends_on("cpu"):
    pytest.skip("needs the resfuse._C extension: without it a converted model runs timm's own forward",
                allow_module_level=True)

TOL = 1e-9
MODELS = ["resnet18", "resnet50d", "resnet26t", "seresnext26d_32x4d", "ecaresnet26t", "resnetrs50",
          "resnetblur50", "wide_resnet50_2", "resnetv2_50"]
SMALL = {"channels": (16, 32, 64, 128), "stem_width": 16}
SMALL_V2 = {"channels": (64, 128, 256, 512), "stem_chs": 16}
# what runs as modules inside the fused blocks, and what runs in their fused tails, as the report says
REPORTED_MODULES = {"resnetblur50": "x aa BlurPool2d"}
REPORTED_TAILS = {"seresnext26d_32x4d": "fused into the block tails: 8 x attention SEModule",
                  "ecaresnet26t": "fused into the block tails: 8 x attention EcaModule",
                  "resnetrs50": "fused into the block tails: 16 x attention SEModule"}
TIMM_BLOCKS = (timm_resnet.BasicBlock, timm_resnet.Bottleneck, timm_resnetv2.PreActBasic,
               timm_resnetv2.PreActBottleneck, timm_resnetv2.Bottleneck)


class CountFusedOps(TorchDispatchMode):
    """Counts the forward resfuse ops a call runs (backward ops are private: ``resfuse::_...``), in all and by
    name (``by_name["bn_squeeze"]``)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_name = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("resfuse::") and not name.startswith("resfuse::_"):
            self.count += 1
            self.by_name[name[len("resfuse::"):]] += 1
        return func(*args, **(kwargs or {}))


def make_pair(name, seed=0, **kwargs):
    """(timm's model, a deep copy converted by resfuse, the report), float64, randomized BN statistics."""
    torch.manual_seed(seed)
    config = dict(SMALL_V2 if name.startswith("resnetv2") else SMALL, **kwargs)
    ref = timm.create_model(name, pretrained=False, num_classes=8, **config).to(torch.float64)
    randomize_bn_(ref, seed)
    fused = copy.deepcopy(ref)
    return ref, fused, convert_with_report(fused)


def convert_with_report(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resfuse.convert(model, **kwargs)
    reports = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(reports) == 1, reports
    return reports[0]


def timm_blocks(model):
    return [m for m in model.modules() if isinstance(m, TIMM_BLOCKS)]


def tail_blocks(model):
    """The blocks whose end runs the fused tail (resfuse/nn/timm_tail.py) in the model's mode: those with SE /
    ECA attention, and in training those whose drop_path drops."""
    return [b for b in timm_blocks(model)
            if (getattr(b, "se", None) is not None
                 or (model.training and type(b.drop_path).__name__ == "DropPath" and b.drop_path.drop_prob > 0))]


def expected_fused_ops(model):
    """One fused op per BN that follows a conv (resnet), plus the stem's; resnetv2's pre-activation blocks: the
    conv -> norm pairs, the last conv + shortcut, norm1 (bn_act in training, bn_eval_act in eval), and the
    stem's conv -> norm pairs; resnetv2's Bottleneck: its conv -> norm pairs and its shortcut's. A fused tail
    is one op in eval (bn_scale_act) and two in training (bn_squeeze, bn_scale_act)."""
    tails = len(tail_blocks(model)) if model.training else 0
    if isinstance(model, timm_resnetv2.ResNetV2):
        count = sum(type(m).__name__ == "BatchNormAct2d" for m in model.stem.children())  # deep stems' pairs
        for b in timm_blocks(model):
            count += sum(isinstance(m, nn.Conv2d) for m in b.children())
            if isinstance(b, timm_resnetv2.Bottleneck):
                count += b.downsample is not None  # its conv -> BatchNormAct2d
                continue
            count += 1  # norm1
            # a drop_path that drops runs between the last conv and the add: that conv is then ATen's and the
            # tail is one bn_scale_act pass, no bn_squeeze (which ``tails`` counts)
            count -= model.training and type(b.drop_path).__name__ == "DropPath" and b.drop_path.drop_prob > 0
        return count + tails
    return sum(type(m) is nn.BatchNorm2d for m in model.modules()) + tails


def assert_tails_fused(counter, model):
    """Every block with attention (or, training, a drop_path that drops) ran the fused tail: a block that fell
    back to timm's modules runs neither op."""
    tails = len(tail_blocks(model))
    preact = sum(isinstance(b, (timm_resnetv2.PreActBasic, timm_resnetv2.PreActBottleneck))
                 for b in tail_blocks(model))
    assert counter.by_name["bn_scale_act"] == tails, (counter.by_name, tails)
    assert counter.by_name["bn_squeeze"] == (tails - preact if model.training else 0), (counter.by_name, tails)


def assert_no_module_path_warning(caught):
    unfused = [str(w.message) for w in caught if "unfused" in str(w.message)]
    assert not unfused, unfused


def compare_steps(ref, fused, x, steps=2, seed=None):
    """``steps`` SGD steps on both models from the same state: outputs, every gradient, then every parameter
    and buffer (running statistics, counters) agree to TOL, or to 4x eager's own float64 noise where that is
    larger: a channels_last copy of ``ref`` takes the same steps, and at the second step a randomly initialised
    deep net's gradients can differ by a few 1e-9 between two summation orders of eager PyTorch itself."""
    twin = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    models = (ref, fused, twin)
    target = torch.randn(x.shape[0], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]

    def check(triples):
        """(name, ours, timm's, the eager twin's) for a set of tensors: each within the set's eager noise."""
        noise = max(rel_err(twin_t, ref_t) for _, _, ref_t, twin_t in triples)
        limit = max(TOL, 4 * noise)
        for name, ours, theirs, _ in triples:
            assert rel_err(ours, theirs) <= limit, f"{name}: {rel_err(ours, theirs):.3g} > {limit:.3g}"

    for step in range(steps):
        outs = []
        for model, opt in zip(models, opts):
            model.train()
            opt.zero_grad()
            if seed is not None:
                torch.manual_seed(seed + step)
            out = model(x)
            (out * target).sum().backward()
            outs.append(out)
        check([(f"step {step} output", *outs)] + [
            (f"step {step} grad {name}", p_fused.grad, p_ref.grad, p_twin.grad)
            for (name, p_ref), p_fused, p_twin in zip(ref.named_parameters(), fused.parameters(), twin.parameters())])
        for opt in opts:
            opt.step()
    after = [(name, p_fused, p_ref, p_twin)
             for (name, p_ref), p_fused, p_twin in zip(ref.named_parameters(), fused.parameters(), twin.parameters())]
    for (name, b_ref), (fused_name, b_fused), b_twin in zip(ref.named_buffers(), fused.named_buffers(),
                                                            twin.buffers()):
        assert fused_name == name
        if b_ref.dtype == torch.long:
            assert torch.equal(b_fused, b_ref), name
        else:
            after.append((name, b_fused, b_ref, b_twin))
    check(after)


def check_matches_timm(ref, fused, steps, seed=None):
    """Eval output and the fused ops a call runs (eval and training), then ``steps`` SGD steps; no block may
    have warned that it ran its modules."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref.eval()
        fused.eval()
        with torch.no_grad(), CountFusedOps() as counter:
            out = fused(x)
        assert counter.count == expected_fused_ops(fused)
        assert_tails_fused(counter, fused)
        assert rel_err(out, ref(x)) < TOL
        with torch.no_grad(), CountFusedOps() as counter:
            fused.train()(x)
        assert counter.count == expected_fused_ops(fused)
        assert_tails_fused(counter, fused)
        fused.load_state_dict(ref.state_dict())  # the counted call moved the running statistics
        compare_steps(ref, fused, x, steps, seed)
    assert_no_module_path_warning(caught)


@pytest.mark.parametrize("name", MODELS)
def test_model_matches_timm_in_eval_and_two_sgd_steps(name):
    ref, fused, report = make_pair(name)
    blocks = timm_blocks(ref)
    match = re.match(r"resfuse\.convert: (\d+) blocks fused", report)
    assert match and int(match.group(1)) == len(blocks), report
    assert " left as" not in report, report
    assert ("run as modules" in report) == (name in REPORTED_MODULES), report
    assert REPORTED_MODULES.get(name, "") in report, report
    assert ("block tails" in report) == (name in REPORTED_TAILS), report
    assert REPORTED_TAILS.get(name, "") in report, report
    assert all(type(b) is not type(r) and isinstance(b, type(r)) for b, r in zip(timm_blocks(fused), blocks))
    check_matches_timm(ref, fused, steps=2)


@pytest.mark.parametrize("name, kwargs", [
    ("resnet26t", {"drop_path_rate": 0.1, "drop_block_rate": 0.2}),
    ("resnetv2_18", {"drop_path_rate": 0.1, "channels": (16, 32, 64, 128)}),
    # resnetv2's Bottleneck: conv -> BatchNormAct2d pairs, ReLU after the add
    ("resnetv2_50", {"preact": False, "layers": (1, 2, 1, 1)}),
    ("resnetv2_50", {"preact": False, "layers": (1, 2, 1, 1), "drop_path_rate": 0.1}),
    ("seresnext26d_32x4d", {"drop_path_rate": 0.1, "layers": (1, 1, 1, 1)}),
])
def test_dropping_and_other_blocks_match_timm_over_two_sgd_steps(name, kwargs):
    """drop_path / drop_block draw their masks with torch's RNG in timm's order: seeded, the steps agree."""
    ref, fused, report = make_pair(name, **kwargs)
    assert " left as" not in report and f"{len(timm_blocks(ref))} blocks fused" in report, report
    if "drop_path_rate" in kwargs:
        drops = sum(type(b.drop_path).__name__ == "DropPath" and b.drop_path.drop_prob > 0 for b in timm_blocks(ref))
        assert re.search(rf"fused into the block tails: [^;]*\b{drops} x drop_path(,|;|$)", report), report
        assert "drop_path in training" not in report, report
    check_matches_timm(ref, fused, steps=2, seed=3)


@pytest.mark.parametrize("name", ["resnetaa34d", "resnext50_32x4d", "resnetv2_50d", "resnetv2_50t"])
def test_more_registry_variants_match_timm_over_one_sgd_step(name):
    """AvgPool2d aa, grouped convs, resnetv2's deep / tiered stems and pre-activation avg-down: one block per
    stage."""
    ref, fused, report = make_pair(name, layers=(1, 1, 1, 1))
    assert " left as" not in report and "4 blocks fused" in report, report
    check_matches_timm(ref, fused, steps=1)


def test_an_activation_other_than_relu_leaves_the_blocks_named_and_strict_raises():
    ref, fused, report = make_pair("resnet18", act_layer=nn.SiLU)
    assert "8 left as they are: 8 x BasicBlock (act1: activation SiLU)" in report, report
    assert "stems left as they are: 1 x ResNet (act1: activation SiLU)" in report, report
    assert [type(m) for m in fused.modules()] == [type(m) for m in ref.modules()]
    with pytest.raises(RuntimeError, match="left as they are: 8 x BasicBlock"):
        resfuse.convert(fused, strict=True)


def test_blocks_without_a_fused_path_are_named_and_strict_leaves_the_model_as_it_was():
    model = timm.create_model("skresnet18", num_classes=8, channels=(16, 32, 64, 128))
    classes = [type(m) for m in model.modules()]
    report = convert_with_report(model)
    assert "8 left as they are: 8 x SelectiveKernelBasic (no fused path)" in report, report
    with pytest.raises(RuntimeError, match="SelectiveKernelBasic"):
        resfuse.convert(model, strict=True)
    resfuse.revert(model)
    with pytest.raises(RuntimeError, match="the model is left as it was"):
        resfuse.convert(model, strict=True)
    assert [type(m) for m in model.modules()] == classes  # the stem it had fused is given back


def test_groupnorm_and_stdconv_blocks_are_named():
    model = timm.create_model("resnetv2_50x1_bit", num_classes=8)
    report = convert_with_report(model)
    assert "16 left as they are: 16 x PreActBottleneck (conv1: conv layer StdConv2d)" in report, report
    model = timm.create_model("resnetv2_50", num_classes=8, layers=(1, 1, 1, 1), norm_layer=timm.layers.GroupNormAct)
    report = convert_with_report(model)
    assert "4 left as they are: 4 x PreActBottleneck (norm1: norm layer GroupNormAct)" in report, report


def test_batch_norm_act_is_never_taken_for_a_plain_batch_norm():
    from resfuse.nn.routing import modules_reason, norm_reason

    norm = timm.layers.BatchNormAct2d(8)
    assert isinstance(norm, nn.BatchNorm2d)
    assert norm_reason(norm) == "norm layer BatchNormAct2d (training)"
    assert modules_reason((), (("bn1", norm.eval()),)) == "bn1: norm layer BatchNormAct2d"
    # a resnet block given BatchNormAct2d norms would lose their activation if fused as BN: it is left, named
    model = timm.create_model("resnet18", num_classes=8, norm_layer=timm.layers.BatchNormAct2d, **SMALL)
    report = convert_with_report(model)
    assert "8 x BasicBlock (bn1: norm layer BatchNormAct2d)" in report, report


def test_subclasses_convert_only_with_timm_forward():
    class Renamed(timm_resnet.Bottleneck):
        pass

    class OwnForward(timm_resnet.Bottleneck):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Renamed(64, 16), OwnForward(64, 16))
    report = convert_with_report(model)
    assert "1 blocks fused (1 TimmBottleneck)" in report or "1 block fused (1 TimmBottleneck)" in report, report
    assert "1 x OwnForward (a subclass of timm's Bottleneck with its own forward)" in report, report
    assert type(model[1]) is OwnForward


@pytest.mark.parametrize("name", ["resnet50d", "resnetv2_50d"])
def test_revert_gives_timm_classes_and_a_bit_identical_state_dict(name):
    import pickle

    model = timm.create_model(name, num_classes=8, **(SMALL_V2 if name.startswith("resnetv2") else SMALL))
    randomize_bn_(model)
    classes = [type(m) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    convert_with_report(model)
    assert [type(m) for m in model.modules()] != classes
    assert list(model.state_dict()) == list(state)
    again = pickle.loads(pickle.dumps(model))  # the fused classes are found by name
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    assert resfuse.revert(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_resfuse") for m in model.modules() for k in m.__dict__)
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]) and value.dtype == state[key].dtype, key


def test_a_hook_on_a_child_takes_timm_forward_with_one_warning():
    ref, fused, _ = make_pair("resnet18")
    seen = []
    for model in (ref, fused):
        model.layer2[0].bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref.eval()
        fused.eval()
        with torch.no_grad():
            assert rel_err(fused(x), ref(x)) < TOL
            fused(x)
    unfused = [str(w.message) for w in caught if "unfused" in str(w.message)]
    assert unfused == ["resfuse: TimmBasicBlock runs its modules unfused (bn1: a forward hook on bn1); this is "
                       "eager PyTorch's speed, with eager PyTorch's numbers"], unfused
    assert len(seen) == 3
