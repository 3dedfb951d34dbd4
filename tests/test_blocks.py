"""resfuse.BasicBlock / Bottleneck against torchvision's blocks: outputs, every gradient, running statistics."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

from _helpers import (backends_on, randn, randomize_bn_, rel_err, resfuse,
                      skip_triton_bf16_under_interpreter)

CPU_BACKENDS = backends_on("cpu")


def downsample(inplanes, outplanes, stride):
    return nn.Sequential(tv.conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


# name -> (block class name, constructor args, constructor kwargs builder, input shape)
BLOCKS = {
    "basic": ("BasicBlock", (8, 8), {}, (2, 8, 6, 7)),
    "basic_odd_channels": ("BasicBlock", (5, 5), {}, (3, 5, 5, 3)),
    "basic_stride2_downsample": ("BasicBlock", (6, 10, 2), {"downsample": (6, 10, 2)}, (2, 6, 9, 9)),
    "basic_1x1_spatial": ("BasicBlock", (4, 4), {}, (4, 4, 1, 1)),
    "bottleneck": ("Bottleneck", (16, 4), {}, (2, 16, 5, 5)),
    "bottleneck_stride2_downsample": ("Bottleneck", (12, 4, 2), {"downsample": (12, 16, 2)}, (2, 12, 7, 6)),
    "bottleneck_resnext": ("Bottleneck", (32, 8), {"groups": 2, "base_width": 16}, (2, 32, 5, 5)),
    "bottleneck_dilated": ("Bottleneck", (16, 4), {"dilation": 2}, (2, 16, 7, 7)),
}


def make_pair(name, backend, seed=0):
    cls_name, args, kwargs, shape = BLOCKS[name]
    kwargs = dict(kwargs)
    torch.manual_seed(seed)
    if "downsample" in kwargs:
        kwargs["downsample"] = downsample(*kwargs["downsample"])
    ref = getattr(tv, cls_name)(*args, **kwargs)
    randomize_bn_(ref, seed)
    ours = getattr(resfuse, cls_name)(*args, **{**kwargs, "downsample": copy.deepcopy(kwargs.get("downsample"))},
                                      backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, shape


def make_input(shape, layout, dtype=torch.float32, seed=1):
    if layout == "strided":
        n, c, h, w = shape
        return randn(n, c, h, 2 * w, dtype=dtype, seed=seed)[..., ::2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return randn(*shape, dtype=dtype, seed=seed, memory_format=fmt)


def assert_state_equal(ref, ours, rtol=1e-5, atol=1e-6):
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(ref_state) == list(our_state)
    for key, value in ref_state.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, our_state[key]), key
        else:
            torch.testing.assert_close(our_state[key], value, rtol=rtol, atol=atol, msg=key)


def assert_grads_close(ref, ours, tol=2e-5):
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        assert p_ours.grad is not None, name
        assert rel_err(p_ours.grad, p_ref.grad) < tol, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_train_matches_torchvision(backend, layout, name):
    ref, ours, shape = make_pair(name, backend)
    if layout == "channels_last":
        ref, ours = ref.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
    for step in range(2):  # two steps: running stats and num_batches_tracked accumulate
        x_ref = make_input(shape, layout, seed=step).requires_grad_(True)
        x_ours = x_ref.detach().clone().requires_grad_(True)
        out_ref, out_ours = ref(x_ref), ours(x_ours)
        assert rel_err(out_ours, out_ref) < 1e-5
        if layout == "channels_last" and out_ref.shape[-1] * out_ref.shape[-2] > 1:
            assert out_ours.is_contiguous(memory_format=torch.channels_last)
        grad = randn(*out_ref.shape, seed=10 + step)
        ref.zero_grad()
        ours.zero_grad()
        out_ref.backward(grad)
        out_ours.backward(grad)
        assert rel_err(x_ours.grad, x_ref.grad) < 2e-5
        assert_grads_close(ref, ours)
    assert_state_equal(ref, ours)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_eval_matches_torchvision(backend, layout, name):
    ref, ours, shape = make_pair(name, backend)
    ref.eval(), ours.eval()
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    x = make_input(shape, layout)
    with torch.no_grad():
        expected, out = ref(x), ours(x)
    assert rel_err(out, expected) < 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    # gradients still flow in eval mode: through the fold to the conv and BN parameters
    x_ref = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    ref(x_ref).sum().backward()
    ours(x_ours).sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) < 2e-5
    assert_grads_close(ref, ours)
    # eval mode updates nothing: every buffer exactly as before, num_batches_tracked included
    for key, value in before.items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False])
def test_half_precision_within_twice_torch_error(backend, dtype, train):
    skip_triton_bf16_under_interpreter(backend, dtype)
    ref, ours, shape = make_pair("basic_stride2_downsample", backend)
    exact = copy.deepcopy(ref).double().train(train)
    ref, ours = ref.to(dtype).train(train), ours.to(dtype).train(train)
    x = make_input(shape, "channels_last")
    expected = exact(x.double())
    err_torch = rel_err(ref(x.to(dtype)), expected)
    err_ours = rel_err(ours(x.to(dtype)), expected)
    assert err_ours <= 2 * err_torch + 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_train_eval_train_switching(backend):
    ref, ours, shape = make_pair("basic_stride2_downsample", backend)
    for mode in (True, False, True, False):
        ref.train(mode), ours.train(mode)
        x = make_input(shape, "contiguous", seed=int(mode))
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) < 1e-5
    assert_state_equal(ref, ours)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_batchnorm_options(backend, momentum, track_running_stats):
    def norm_layer(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=momentum, track_running_stats=track_running_stats)

    torch.manual_seed(0)
    ref = tv.BasicBlock(6, 6, norm_layer=norm_layer)
    ours = resfuse.BasicBlock(6, 6, norm_layer=norm_layer, backend=backend)
    ours.load_state_dict(ref.state_dict())
    for step, mode in enumerate((True, True, True, False, True)):
        ref.train(mode), ours.train(mode)
        x = make_input((3, 6, 4, 5), "contiguous", seed=step)
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) < 1e-5
    assert_state_equal(ref, ours)


def test_state_dict_keys_and_round_trip():
    ref = tv.Bottleneck(16, 4, downsample=downsample(16, 16, 1))
    ours = resfuse.Bottleneck(16, 4, downsample=downsample(16, 16, 1))
    assert list(ours.state_dict()) == list(ref.state_dict())
    randomize_bn_(ref)
    ours.load_state_dict(ref.state_dict())
    back = tv.Bottleneck(16, 4, downsample=downsample(16, 16, 1))
    back.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_constructor_matches_torchvision():
    for cls in ("BasicBlock", "Bottleneck"):
        assert getattr(resfuse, cls).expansion == getattr(tv, cls).expansion
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        resfuse.BasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation"):
        resfuse.BasicBlock(8, 8, dilation=2)
    block = resfuse.BasicBlock(8, 8, 1, None, 1, 64, 1, nn.BatchNorm2d)
    assert [n for n, _ in block.named_children()] == [n for n, _ in tv.BasicBlock(8, 8).named_children()]


FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_non_batchnorm_norm_layer_warns_once_and_matches(backend):
    def norm_layer(c):
        return nn.GroupNorm(1, c)

    torch.manual_seed(0)
    ref = tv.BasicBlock(4, 4, norm_layer=norm_layer)
    ours = resfuse.BasicBlock(4, 4, norm_layer=norm_layer, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = make_input((2, 4, 5, 5), "contiguous")
    resfuse._warn_once.forget_warnings()
    with pytest.warns(UserWarning, match="runs its modules unfused .bn1: norm layer GroupNorm"):
        out = ours(x)
    assert torch.equal(out, ref(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)  # the same configuration does not warn twice


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_batchnorm_detection_backbone(backend):
    """Detection backbones use torchvision.ops.FrozenBatchNorm2d: always folded, in train and eval alike."""
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    ref = tv.Bottleneck(16, 4, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    ours = resfuse.Bottleneck(16, 4, norm_layer=FrozenBatchNorm2d, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x_ref = make_input((2, 16, 5, 5), "channels_last").requires_grad_(True)
    x_ours = x_ref.detach().clone().requires_grad_(True)
    out_ref, out = ref(x_ref), ours(x_ours)
    assert rel_err(out, out_ref) < 1e-5
    out_ref.sum().backward()
    out.sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) < 2e-5
    assert_grads_close(ref, ours)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_like_torchvision(backend, train):
    """N=0: an empty output, running statistics untouched, num_batches_tracked bumped, zero gradients."""
    ref, ours, shape = make_pair("basic_stride2_downsample", backend)
    ref.train(train), ours.train(train)
    x = torch.randn(0, *shape[1:])
    for model in (ref, ours):
        out = model(x)
        assert out.shape[0] == 0
        out.sum().backward()
    assert_state_equal(ref, ours, rtol=0, atol=0)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
