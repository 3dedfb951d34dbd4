"""The implicit-GEMM conv + epilogue Triton kernel against a float64 F.conv2d reference.

Without a GPU the kernel runs under the Triton interpreter on CPU tensors: small shapes (N <= 2, H, W <= 9, a few
channels) chosen so that every code path of the kernel runs (1x1 fast path, per-tap and flat-K loops, packed and
multi-tile groups, masks on every edge, NCHW and NHWC stores).  bf16 is left to the GPU tests: the interpreter's
tl.dot is wrong on bf16 operands.  The tests marked `cuda` run every ResNet-18/34/50 conv shape at N=8.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # triton reads this when the kernels are decorated, i.e. at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from resfuse.triton_kernels import conv_bn_act as conv_mod  # noqa: E402
from resfuse.triton_kernels.conv_bn_act import conv_bn_act_fwd, pack_weight  # noqa: E402
from resfuse.triton_kernels import INTERPRETING as INTERPRET  # noqa: E402
from torch._prims_common import suggest_memory_format  # noqa: E402

from resfuse.reference import conv_bn_act_ref  # noqa: E402

pytestmark = pytest.mark.triton

DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


# ---------------------------------------------------------------------------------------------------- helpers


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_hw(h, w, k, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(stride), _pair(padding), _pair(dilation)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def rand(shape, dtype, device=DEV, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def make_problem(n, cin, h, w, cout, k, groups, stride, padding, dilation, dtype, *, layout="nchw",
                 bias=True, residual=True, device=DEV, seed=0):
    kh, kw = _pair(k)
    x = rand((n, cin, h, w), dtype, device, seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = rand((n, cin, h, 2 * w), dtype, device, seed)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    # ~unit-variance outputs, so that the relative error measures the arithmetic, not the scale.
    wt = rand((cout, cin // groups, kh, kw), dtype, device, seed + 1, scale=1.0 / math.sqrt(cin // groups * kh * kw))
    b = rand((cout,), dtype, device, seed + 2) if bias else None
    oh, ow = out_hw(h, w, k, stride, padding, dilation)
    r = None
    if residual:
        r = rand((n, cout, oh, ow), dtype, device, seed + 3)
        if layout == "channels_last":
            r = r.contiguous(memory_format=torch.channels_last)
    return x, wt, b, r


def ref64(x, wt, b, r, stride, padding, dilation, groups, relu):
    y = F.conv2d(x.double(), wt.double(), None, _pair(stride), _pair(padding), _pair(dilation), groups)
    if b is not None:
        y = y + b.double().view(1, -1, 1, 1)
    if r is not None:
        y = y + r.double()
    return torch.relu(y) if relu else y


def rel_err(a, e):
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def check_output(out, x, cout, oh, ow):
    assert out.dtype == x.dtype and out.device == x.device
    assert tuple(out.shape) == (x.shape[0], cout, oh, ow)
    assert out.is_contiguous(memory_format=suggest_memory_format(x))
    assert not torch.isnan(out).any(), "some output element was never written"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors, so an output element the kernel skips shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


# ------------------------------------------------------------------------------------------ interpreter tests

# (id, N, C_in, H, W, C_out, kernel, groups, stride, padding, dilation)
CASES = [
    ("1x1_fast", 2, 5, 7, 9, 7, 1, 1, 1, 0, 1),            # plain GEMM path, odd channels
    ("1x1_s2", 2, 8, 9, 7, 12, 1, 1, 2, 0, 1),             # ResNet downsample: general path
    ("1x1_pad1", 1, 6, 5, 5, 5, 1, 1, 1, 1, 1),            # 1x1 with padding: a border of bias-only pixels
    ("3x3", 2, 16, 9, 9, 16, 3, 1, 1, 1, 1),
    ("3x3_s2", 2, 16, 9, 7, 12, 3, 1, 2, 1, 1),
    ("3x3_cin20", 1, 20, 5, 6, 9, 3, 1, 1, 1, 1),          # two channel blocks per tap, the second partial
    ("3x3_p0_cin7", 1, 7, 8, 9, 5, 3, 1, 1, 0, 1),         # flat-K loop
    ("3x3_dil2", 2, 16, 9, 9, 8, 3, 1, 1, 2, 2),
    ("3x3_dil2_s2_cin5", 1, 5, 9, 9, 6, 3, 1, 2, 2, 2),    # flat-K with dilation and stride
    ("7x7_stem", 2, 3, 9, 9, 16, 7, 1, 2, 3, 1),           # ResNet stem: flat-K, C_in = 3
    ("7x7_cin16", 1, 16, 9, 9, 8, 7, 1, 1, 3, 1),          # 7x7 through the per-tap loop
    ("g2", 2, 8, 7, 7, 12, 3, 2, 1, 1, 1),                 # Cg = 4, Cog = 6: two groups packed in a tile
    ("resnext_s2", 2, 16, 9, 9, 16, 3, 4, 2, 1, 1),        # 4 channels per group, stride 2
    ("g6_dil2", 1, 12, 6, 7, 18, 3, 6, 1, 2, 2),           # 5 groups per tile: the last tile is partial
    ("g2_wide", 1, 8, 5, 5, 40, 3, 2, 1, 1, 1),            # Cog = 20 > BLOCK_N: several tiles per group
    ("depthwise", 1, 8, 5, 6, 8, 3, 8, 1, 1, 1),           # Cg = Cog = 1
    ("1x1_spatial", 2, 16, 1, 1, 16, 1, 1, 1, 0, 1),
    ("3x3_on_1x1", 2, 8, 1, 1, 8, 3, 1, 1, 1, 1),          # only the centre tap is inside
    ("asym", 1, 6, 7, 8, 5, (1, 3), 1, (1, 2), (0, 1), 1),  # non-square kernel, stride, padding
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_shapes(case, layout, poisoned_empty):
    _, n, cin, h, w, cout, k, groups, stride, padding, dilation = case
    x, wt, b, r = make_problem(n, cin, h, w, cout, k, groups, stride, padding, dilation, torch.float32,
                               layout=layout)
    out = conv_bn_act_fwd(x, wt, b, r, stride, padding, dilation, groups, True)
    oh, ow = out_hw(h, w, k, stride, padding, dilation)
    check_output(out, x, cout, oh, ow)
    assert rel_err(out, ref64(x, wt, b, r, stride, padding, dilation, groups, True)) <= 1e-5


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("bias,residual,relu", [(False, False, False), (True, False, False), (False, True, False),
                                                (False, False, True), (True, True, True)])
def test_fp32_epilogue(bias, residual, relu, layout, poisoned_empty):
    x, wt, b, r = make_problem(2, 6, 5, 7, 10, 3, 1, 1, 1, 1, torch.float32, layout=layout, bias=bias,
                               residual=residual)
    if r is not None and layout == "nchw":
        r = r.contiguous(memory_format=torch.channels_last)  # any residual layout is accepted
    out = conv_bn_act_fwd(x, wt, b, r, 1, 1, 1, 1, relu)
    check_output(out, x, 10, 5, 7)
    assert rel_err(out, ref64(x, wt, b, r, 1, 1, 1, 1, relu)) <= 1e-5
    if relu:
        assert (out >= 0).all()


FP16_CASES = [c for c in CASES if c[0] in ("1x1_fast", "3x3_s2", "3x3_cin20", "7x7_stem", "resnext_s2", "g2_wide")]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", FP16_CASES, ids=[c[0] for c in FP16_CASES])
def test_fp16_vs_torch_error(case, layout, poisoned_empty):
    _, n, cin, h, w, cout, k, groups, stride, padding, dilation = case
    x, wt, b, r = make_problem(n, cin, h, w, cout, k, groups, stride, padding, dilation, torch.float16,
                               layout=layout)
    out = conv_bn_act_fwd(x, wt, b, r, stride, padding, dilation, groups, True)
    oh, ow = out_hw(h, w, k, stride, padding, dilation)
    check_output(out, x, cout, oh, ow)
    expected = ref64(x, wt, b, r, stride, padding, dilation, groups, True)
    err = rel_err(out, expected)
    try:
        torch_out = conv_bn_act_ref(x, wt, b, r, _pair(stride), _pair(padding), _pair(dilation), groups, True)
        bound = max(2 * rel_err(torch_out, expected), 1e-3)
    except RuntimeError:  # no fp16 conv on this CPU build
        bound = 2e-3
    assert err <= bound


@pytest.mark.parametrize("case", [CASES[3], CASES[12]], ids=[CASES[3][0], CASES[12][0]])
def test_fp64(case):
    _, n, cin, h, w, cout, k, groups, stride, padding, dilation = case
    x, wt, b, r = make_problem(n, cin, h, w, cout, k, groups, stride, padding, dilation, torch.float64)
    out = conv_bn_act_fwd(x, wt, b, r, stride, padding, dilation, groups, True)
    assert out.dtype == torch.float64
    assert rel_err(out, ref64(x, wt, b, r, stride, padding, dilation, groups, True)) <= 1e-12


def test_weight_in_gemm_layout_is_packed_without_a_copy():
    x, wt, b, r = make_problem(2, 8, 6, 5, 12, 3, 2, 1, 1, 1, torch.float32, layout="channels_last")
    plain = conv_bn_act_fwd(x, wt, b, r, 1, 1, 1, 2, True)
    stored = wt.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # resfuse/nn/fold.py gemm_layout
    packed = pack_weight(stored)
    assert tuple(packed.shape) == (3 * 3 * 4, 12) and packed.data_ptr() == stored.data_ptr()
    assert torch.equal(conv_bn_act_fwd(x, stored, b, r, 1, 1, 1, 2, True), plain)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty(layout):
    x = torch.empty((0, 4, 5, 5), device=DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = rand((6, 4, 3, 3), torch.float32)
    out = conv_bn_act_fwd(x, wt, rand((6,), torch.float32), None, 2, 1, 1, 1, True)
    assert tuple(out.shape) == (0, 6, 3, 3) and out.dtype == x.dtype
    out = conv_bn_act_fwd(rand((2, 4, 5, 5), torch.float32), rand((0, 4, 1, 1), torch.float32), None, None,
                          1, 0, 1, 1, False)
    assert tuple(out.shape) == (2, 0, 5, 5)


def test_invalid_arguments():
    x = rand((1, 4, 5, 5), torch.float32)
    wt = rand((6, 4, 3, 3), torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        conv_bn_act_fwd(x, wt.double(), None, None, 1, 1, 1, 1, False)
    with pytest.raises(RuntimeError, match="groups"):
        conv_bn_act_fwd(x, wt, None, None, 1, 1, 1, 2, False)
    with pytest.raises(RuntimeError, match="too small"):
        conv_bn_act_fwd(x, rand((6, 4, 7, 7), torch.float32), None, None, 1, 0, 1, 1, False)
    with pytest.raises(RuntimeError, match="residual"):
        conv_bn_act_fwd(x, wt, None, rand((1, 6, 4, 4), torch.float32), 1, 1, 1, 1, False)
    with pytest.raises(RuntimeError, match="bias"):
        conv_bn_act_fwd(x, wt, rand((5,), torch.float32), None, 1, 1, 1, 1, False)
    with pytest.raises(RuntimeError):
        conv_bn_act_fwd(x.to(torch.int32), wt.to(torch.int32), None, None, 1, 1, 1, 1, False)


def test_dot_precision(monkeypatch):
    # Under the interpreter always IEEE; otherwise TF32 for fp32 exactly when torch allows it for convs.
    if INTERPRET:
        assert conv_mod._dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(conv_mod, "INTERPRETING", False)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=True):
        assert conv_mod._dot_precision(torch.float32) == "tf32"
        assert conv_mod._dot_precision(torch.float16) == "ieee"
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        assert conv_mod._dot_precision(torch.float32) == "ieee"


# ---------------------------------------------------------------------------------------------------- GPU tests


def _resnet_conv_shapes():
    """(C_in, C_out, kernel, stride, padding, H) of every conv in ResNet-18/34 and ResNet-50 (v1.5), deduplicated."""
    shapes = [(3, 64, 7, 2, 3, 224)]  # stem
    # BasicBlock stages (ResNet-18/34): two 3x3 per block, 1x1 stride-2 downsample entering stages 2-4.
    h = 56
    inplanes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        shapes.append((inplanes, planes, 3, stride, 1, h))
        if stride != 1:
            shapes.append((inplanes, planes, 1, stride, 0, h))
            h //= stride
        shapes.append((planes, planes, 3, 1, 1, h))
        inplanes = planes
    # Bottleneck stages (ResNet-50): 1x1 reduce, 3x3 (stride on it), 1x1 expand, 1x1 downsample.
    h = 56
    inplanes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        width, out = planes, planes * 4
        for first in (True, False):
            cin = inplanes if first else out
            s = stride if first else 1
            shapes.append((cin, width, 1, 1, 0, h))
            shapes.append((width, width, 3, s, 1, h))
            if first:
                shapes.append((inplanes, out, 1, s, 0, h))
            shapes.append((width, out, 1, 1, 0, h // s))
            if first:
                h //= s
        inplanes = out
    seen, unique = set(), []
    for s in shapes:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


RESNET_SHAPES = _resnet_conv_shapes()


def _gpu_check(cin, cout, k, stride, pad, h, dtype, groups=1, layout="channels_last", n=8):
    x, wt, b, r = make_problem(n, cin, h, h, cout, k, groups, stride, pad, 1, dtype, layout=layout, device="cuda")
    out = conv_bn_act_fwd(x, wt, b, r, stride, pad, 1, groups, True)
    oh, ow = out_hw(h, h, k, stride, pad, 1)
    check_output(out, x, cout, oh, ow)
    expected = ref64(x, wt, b, r, stride, pad, 1, groups, True)
    torch_out = conv_bn_act_ref(x, wt, b, r, (stride, stride), (pad, pad), (1, 1), groups, True)
    return rel_err(out, expected), rel_err(torch_out, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=[f"{s[0]}-{s[1]}-k{s[2]}s{s[3]}-{s[5]}" for s in RESNET_SHAPES])
def test_cuda_resnet_half(shape, dtype):
    err, torch_err = _gpu_check(*shape, dtype)
    assert err <= 2 * torch_err, (err, torch_err)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=[f"{s[0]}-{s[1]}-k{s[2]}s{s[3]}-{s[5]}" for s in RESNET_SHAPES])
def test_cuda_resnet_fp32(shape):
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        err, torch_err = _gpu_check(*shape, torch.float32)
        assert err <= max(2 * torch_err, 1e-5), (err, torch_err)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        err, torch_err = _gpu_check(*shape, torch.float32)
        # Triton's TF32 truncates the operands where cuDNN may round them: allow a few units of 2^-11.
        assert err <= max(2 * torch_err, 5e-3), (err, torch_err)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_resnext_grouped(dtype, layout):
    # ResNeXt-50 32x4d stage 1 and 4 grouped 3x3 convs (4 and 32 channels per group).
    for cin, stride, h in ((128, 1, 56), (1024, 2, 14)):
        err, torch_err = _gpu_check(cin, cin, 3, stride, 1, h, dtype, groups=32, layout=layout)
        assert err <= 2 * torch_err, (cin, err, torch_err)


@pytest.mark.cuda
def test_cuda_nchw_and_empty():
    err, torch_err = _gpu_check(64, 128, 3, 2, 1, 56, torch.float16, layout="nchw")
    assert err <= 2 * torch_err
    x = torch.empty((0, 64, 8, 8), device="cuda", dtype=torch.float16)
    out = conv_bn_act_fwd(x, rand((64, 64, 3, 3), torch.float16, "cuda"), None, None, 1, 1, 1, 1, True)
    assert tuple(out.shape) == (0, 64, 8, 8)
