"""The fused SE / ECA / drop_path tail inside converted timm blocks (resfuse/nn/timm_tail.py), one block at a time:
timm's own block against a converted copy in float64 (training steps seeded, so drop_path and any dropout draw
the same numbers), what the tail honours (children replaced after convert(), BN's running-statistics rules, every
attention variant) and what sends a block back to timm's modules with one warning (hooks, an activation in the
norm before the tail, SE's add_maxpool). Whole models are in test_timm_resnet.py."""
import copy
import warnings

import pytest
import torch
from torch import nn

from _helpers import backends_on, randn, randomize_bn_, rel_err
from resfuse._warn_once import forget_warnings
from test_timm_resnet import CountFusedOps, convert_with_report

timm = pytest.importorskip("timm")
from timm.layers import DropPath, get_attn  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402

if "cuda" not in backends_on("cpu"):
    pytest.skip("needs the resfuse._C extension: without it a converted block runs timm's own forward",
                allow_module_level=True)

TOL = 1e-9


def make_block(attn="se", drop_prob=0.0, seed=0, **kwargs):
    """timm's Bottleneck (a conv + BN downsample, attention, DropPath) and a converted copy, float64."""
    torch.manual_seed(seed)
    planes, inplanes = 4, 12
    downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
    ref = timm_resnet.Bottleneck(inplanes, planes, downsample=downsample,
                                 attn_layer=get_attn(attn) if attn else None,
                                 drop_path=DropPath(drop_prob) if drop_prob else None, **kwargs)
    ref = randomize_bn_(ref, seed).to(torch.float64)
    fused = copy.deepcopy(ref)
    return ref, fused, convert_with_report(fused)


def run(model, x, train, seed=3):
    """(output, input gradient, parameter gradients, buffers) of one seeded call (and backward in training)."""
    model.train(train)
    x = x.clone().requires_grad_(train)
    torch.manual_seed(seed)
    out = model(x)
    if not train:
        return out, None, {}, {}
    model.zero_grad()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, x.grad, grads, {name: b.clone() for name, b in model.named_buffers()}


def assert_matches(ref, fused, train, steps=2, x=None):
    """``steps`` seeded calls of both (training: with their backward, running statistics moving) agree."""
    x = randn(2, 12, 8, 8, dtype=torch.float64, seed=1) if x is None else x
    for step in range(steps):
        (out_r, gx_r, grads_r, bufs_r), (out, gx, grads, bufs) = run(ref, x, train, 3 + step), \
            run(fused, x, train, 3 + step)
        assert rel_err(out, out_r) < TOL, f"step {step} output: {rel_err(out, out_r):.3g}"
        if train:
            assert rel_err(gx, gx_r) < TOL, f"step {step} input grad"
            for name, g in grads_r.items():
                assert grads[name] is not None and rel_err(grads[name], g) < TOL, f"step {step} grad {name}"
            for name, b in bufs_r.items():
                if b.dtype == torch.long:
                    assert torch.equal(bufs[name], b), name
                else:
                    assert rel_err(bufs[name], b) < TOL, f"step {step} {name}"


def tail_ops(model, train, x=None):
    """The fused-tail ops (bn_squeeze, bn_scale_act) one call of ``model`` (a copy: statistics stay) runs."""
    x = randn(2, 12, 8, 8, dtype=torch.float64, seed=1) if x is None else x
    with torch.no_grad(), CountFusedOps() as counter:
        copy.deepcopy(model).train(train)(x)
    names = counter.by_name
    return names["bn_squeeze"] + names["bn_squeeze_triton"], names["bn_scale_act"] + names["bn_scale_act_triton"]


def caught_warnings(fn):
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("attn", ["se", "eca", "ecam", "ceca"])
@pytest.mark.parametrize("train", [False, True])
def test_every_attention_variant_runs_the_tail_as_timm(attn, train):
    """SEModule, EcaModule (and its use_mlp variant) and CecaModule (circular padding), with a drop_path."""
    ref, fused, report = make_block(attn, drop_prob=0.3)
    assert "fused into the block tails: 1 x attention" in report and "1 x drop_path" in report, report
    assert "run as modules" not in report, report
    assert tail_ops(fused, train) == ((1, 1) if train else (0, 1))
    assert not caught_warnings(lambda: assert_matches(ref, fused, train))


def test_a_child_replaced_after_convert_runs_and_drop_path_draws_after_the_attention():
    """The gate calls SE's own children: a dropout put in se.bn after convert() runs, its RNG draw before
    drop_path's (timm's order: se, then drop_path), and a forward hook on se.fc1 sees its input."""
    ref, fused, _ = make_block("se", drop_prob=0.5)
    seen = []
    for model in (ref, fused):
        model.se.bn = nn.Dropout(0.5)
        model.se.fc1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    assert_matches(ref, fused, train=True)
    assert seen == [(2, 16, 1, 1)] * 4
    assert tail_ops(fused, train=True) == (1, 1)


@pytest.mark.parametrize("bn_kwargs", [{"momentum": None}, {"track_running_stats": False}, {"affine": False}])
def test_batch_norm_options_as_nn_batchnorm(bn_kwargs):
    """bn3 with a cumulative average, no running statistics, no affine: the tail updates what BatchNorm2d
    updates (and num_batches_tracked), in training and in eval."""
    ref, fused, _ = make_block("eca", drop_prob=0.2)
    for model in (ref, fused):
        model.bn3 = randomize_bn_(nn.BatchNorm2d(16, **bn_kwargs).to(torch.float64), seed=5)
    assert_matches(ref, fused, train=True, steps=3)
    assert_matches(ref, fused, train=False, steps=1)
    assert tail_ops(fused, train=True) == (1, 1)


def test_frozen_batch_norm_in_training_uses_its_statistics():
    torchvision_ops = pytest.importorskip("torchvision.ops")
    ref, fused, _ = make_block("se", drop_prob=0.2)
    for model in (ref, fused):
        frozen = torchvision_ops.FrozenBatchNorm2d(16).to(torch.float64)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(randn(16, dtype=torch.float64, seed=6).abs() + 0.5)
        model.bn3 = frozen
    assert_matches(ref, fused, train=True)
    assert tail_ops(fused, train=True) == (0, 1)


@pytest.mark.parametrize("where", ["se", "drop_path"])
def test_a_hook_on_the_attention_or_drop_path_takes_timm_modules_with_one_warning(where):
    ref, fused, _ = make_block("se", drop_prob=0.3)
    seen = []
    for model in (ref, fused):
        getattr(model, where).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    messages = caught_warnings(lambda: assert_matches(ref, fused, train=True))
    assert messages == [f"resfuse: the tail of TimmBottleneck (attention, drop_path, add, ReLU) runs as timm's "
                        f"modules (a hook on {where})"], messages
    assert len(seen) == 4
    assert tail_ops(fused, train=True) == (0, 0)


def test_an_activation_in_the_norm_before_the_tail_takes_timm_modules():
    """resnetv2's Bottleneck with a norm3 that applies a ReLU before drop_path: the tail's one ReLU after the add
    cannot compute it."""
    torch.manual_seed(0)
    ref = timm_resnetv2.Bottleneck(16, 16, conv_layer=timm.layers.create_conv2d,
                                   norm_layer=timm.layers.BatchNormAct2d, drop_path_rate=0.5).to(torch.float64)
    ref.norm3.act = nn.ReLU()
    ref = randomize_bn_(ref)
    fused = copy.deepcopy(ref)
    report = convert_with_report(fused)
    assert "block tails" not in report and "1 x drop_path in training" in report, report
    x = randn(2, 16, 8, 8, dtype=torch.float64, seed=1)
    messages = caught_warnings(lambda: assert_matches(ref, fused, train=True, x=x))
    assert any("the norm before the tail has an activation of its own" in m for m in messages), messages
    assert tail_ops(fused, train=True, x=x) == (0, 0)


def test_an_activation_other_than_relu_after_the_add_takes_timm_forward():
    ref, fused, _ = make_block("se", drop_prob=0.3)
    for model in (ref, fused):
        model.act3 = nn.SiLU()
    messages = caught_warnings(lambda: assert_matches(ref, fused, train=True))
    assert any("act3: activation SiLU" in m for m in messages), messages
    assert tail_ops(fused, train=True) == (0, 0)


def test_attention_the_tail_does_not_know_is_named_and_run_as_modules():
    ref, fused, report = make_block("se", drop_prob=0.3)
    for model in (ref, fused):
        model.se.add_maxpool = True
    ref2, fused2, report2 = make_block("ese", drop_prob=0.3)
    assert "1 x attention EffectiveSEModule" in report2 and "1 x drop_path in training" in report2, report2
    for r, f in ((ref, fused), (ref2, fused2)):
        messages = caught_warnings(lambda: assert_matches(r, f, train=True))
        assert len(messages) == 1 and "runs as timm's modules (attention " in messages[0], messages
        assert tail_ops(f, train=True) == (0, 0)


@pytest.mark.parametrize("backend", [b for b in backends_on("cpu") if b != "cuda"])
@pytest.mark.parametrize("train", [False, True])
def test_other_backends(backend, train):
    """triton (the interpreter on CPU: its kernels run) and reference (timm's own forward)."""
    ref, fused, _ = make_block("se", drop_prob=0.3)
    convert_with_report(fused, backend=backend)
    assert_matches(ref, fused, train, steps=1)
    assert tail_ops(fused, train) == ((0, 0) if backend == "reference" else ((1, 1) if train else (0, 1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_autocast_within_twice_timm_error(dtype, train):
    """Under CPU autocast the conv before the tail runs in autocast's dtype, as timm's does; the output against
    timm's float64 one is within twice timm's own error at that dtype (a drop_path drawn in that dtype too)."""
    ref64, _, _ = make_block("se", drop_prob=0.3)
    ref = copy.deepcopy(ref64).float()
    fused = copy.deepcopy(ref)
    convert_with_report(fused)
    x = randn(4, 12, 16, 16, dtype=torch.float32, seed=1)
    outs = []
    for model in (ref, fused):
        model.train(train)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=dtype), CountFusedOps() as counter:
            outs.append(model(x))
    assert counter.by_name["bn_squeeze"] == train and counter.by_name["bn_scale_act"] == 1, counter.by_name
    torch.manual_seed(3)
    expected = ref64.train(train)(x.double())
    assert outs[1].dtype == outs[0].dtype
    err, timm_err = rel_err(outs[1].double(), expected), rel_err(outs[0].double(), expected)
    assert err <= 2 * timm_err + 1e-3, (err, timm_err)


def make_preact(seed=0):
    torch.manual_seed(seed)
    ref = timm_resnetv2.PreActBottleneck(16, 16, conv_layer=timm.layers.create_conv2d,
                                         norm_layer=timm.layers.BatchNormAct2d, drop_path_rate=0.3)
    ref = randomize_bn_(ref.to(torch.float64), seed)
    fused = copy.deepcopy(ref)
    return ref, fused, convert_with_report(fused)


@pytest.mark.parametrize("train", [False, True])
def test_pre_activation_drop_path_is_one_tail_pass(train):
    """resnetv2's pre-activation block: drop_path(conv3(x)) + shortcut is ATen's conv and one bn_scale_act pass
    (no BN, no ReLU) while drop_path drops, timm's mask drawn; in eval conv3 + shortcut is one conv_bn_act."""
    ref, fused, report = make_preact()
    assert "fused into the block tails: 1 x drop_path" in report and "run as modules" not in report, report
    x = randn(2, 16, 8, 8, dtype=torch.float64, seed=1)
    assert not caught_warnings(lambda: assert_matches(ref, fused, train, x=x))
    assert tail_ops(fused, train, x) == ((0, 1) if train else (0, 0))


def test_pre_activation_drop_path_under_autocast_keeps_timm_dtype():
    """Under autocast the conv output is bf16 and an identity shortcut float32: timm's add promotes to float32,
    which the tail cannot return, so drop_path runs as timm's module, with one warning."""
    ref, fused, _ = make_preact()
    ref, fused = ref.float().train(), fused.float().train()
    x = randn(2, 16, 8, 8, dtype=torch.float32, seed=1)
    outs = []

    def both():
        for model in (ref, fused):
            torch.manual_seed(3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(model(x))
    messages = caught_warnings(both)
    assert messages == ["resfuse: the drop_path of TimmPreActBottleneck runs as timm's module (a torch.float32 "
                        "shortcut added to a torch.bfloat16 conv output)"], messages
    assert outs[1].dtype == outs[0].dtype == torch.float32
    assert rel_err(outs[1], outs[0]) < 2e-2
