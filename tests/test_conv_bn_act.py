"""resfuse.ops.conv_bn_act (eval-mode conv + folded BN + residual + ReLU) against F.conv2d, every backend."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from _helpers import backends_on, randn, rel_err, resfuse, skip_triton_bf16_under_interpreter

CPU_BACKENDS = backends_on("cpu")
# (input shape, weight shape, stride, padding, dilation, groups)
CONVS = [
    ((2, 5, 9, 11), (7, 5, 3, 3), 1, 1, 1, 1),
    ((2, 6, 9, 9), (8, 6, 3, 3), 2, 1, 1, 1),
    ((3, 4, 5, 5), (6, 4, 1, 1), 1, 0, 1, 1),
    ((2, 4, 7, 7), (4, 4, 1, 1), 2, 0, 1, 1),
    ((2, 8, 9, 9), (8, 2, 3, 3), 1, 2, 2, 4),
    ((1, 3, 15, 13), (5, 3, 7, 7), 2, 3, 1, 1),
    ((2, 3, 1, 1), (4, 3, 1, 1), 1, 0, 1, 1),
]


def out_shape(x_shape, w_shape, stride, padding, dilation):
    n, _, h, w = x_shape
    k = w_shape[2]
    size = lambda s: (s + 2 * padding - dilation * (k - 1) - 1) // stride + 1  # noqa: E731
    return (n, w_shape[0], size(h), size(w))


def reference(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding,
                 dilation, groups)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def make_case(conv, layout, with_bias, with_residual, relu, dtype=torch.float32):
    x_shape, w_shape, stride, padding, dilation, groups = conv
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(*x_shape, dtype=dtype, seed=1, memory_format=fmt)
    if layout == "strided":
        x = randn(*x_shape[:3], 2 * x_shape[3], dtype=dtype, seed=1)[..., ::2]
    weight = randn(*w_shape, dtype=dtype, seed=2) * 0.3
    bias = randn(w_shape[0], dtype=dtype, seed=3) if with_bias else None
    o_shape = out_shape(x_shape, w_shape, stride, padding, dilation)
    residual = randn(*o_shape, dtype=dtype, seed=4, memory_format=fmt) if with_residual else None
    return dict(x=x, weight=weight, bias=bias, residual=residual, stride=stride, padding=padding,
                dilation=dilation, groups=groups, relu=relu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("with_bias,with_residual,relu", [(True, True, True), (False, False, False),
                                                          (True, False, True)])
def test_forward_backward(backend, layout, conv, with_bias, with_residual, relu):
    case = make_case(conv, layout, with_bias, with_residual, relu)
    for name in ("x", "weight", "bias", "residual"):
        if case[name] is not None:
            case[name].requires_grad_(True)
    ref_case = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
                for k, v in case.items()}
    expected = reference(**ref_case)
    out = resfuse.ops.conv_bn_act(**case, backend=backend)
    assert out.shape == expected.shape and out.dtype == case["x"].dtype
    if layout == "channels_last" and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < 1e-5

    grad = randn(*out.shape, seed=7)
    out.backward(grad)
    expected.backward(grad.double())
    for name in ("x", "weight", "bias", "residual"):
        if case[name] is not None:
            torch.testing.assert_close(case[name].grad.double(), ref_case[name].grad.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(backend, dtype):
    skip_triton_bf16_under_interpreter(backend, dtype)
    case = make_case(CONVS[0], "channels_last", True, True, True, dtype=dtype)
    exact = reference(**case)
    ours = resfuse.ops.conv_bn_act(**case, backend=backend)
    torch_out = torch.relu(F.conv2d(case["x"], case["weight"], case["bias"], 1, 1) + case["residual"])
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= 2 * rel_err(torch_out, exact) + 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    # small: gradcheck runs the op twice per input element, and the Triton interpreter is slow
    case = make_case(((1, 2, 5, 5), (3, 2, 3, 3), 2, 1, 1, 1), "contiguous", True, True, True,
                     dtype=torch.float64)
    tensors = [case[k].requires_grad_(True) for k in ("x", "weight", "bias", "residual")]

    def fn(x, weight, bias, residual):
        return resfuse.ops.conv_bn_act(x, weight, bias, residual, 2, 1, 1, 1, True, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors)


def _flavours():
    names = ["conv_bn_act_triton"] if "triton" in CPU_BACKENDS else []
    if "cuda" in CPU_BACKENDS:
        names.append("conv_bn_act")
    return names


@pytest.mark.parametrize("name", _flavours())
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[4]])
@pytest.mark.parametrize("with_extras", [True, False])
def test_opcheck(name, conv, with_extras):
    case = make_case(conv, "channels_last", with_extras, with_extras, with_extras)
    for k in ("x", "weight", "bias", "residual"):
        if case[k] is not None:
            case[k].requires_grad_(True)
    op = getattr(torch.ops.resfuse, name).default
    conv_args = ([case["stride"]] * 2, [case["padding"]] * 2, [case["dilation"]] * 2, case["groups"])
    args = (case["x"], case["weight"], case["bias"], case["residual"], *conv_args, case["relu"])
    torch.library.opcheck(op, args)
    out = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    backward = getattr(torch.ops.resfuse, "_conv_bn_act_backward" + name[len("conv_bn_act"):]).default
    mask = [True, True, with_extras, with_extras]
    torch.library.opcheck(backward, (randn(*out.shape, seed=8).contiguous(memory_format=torch.channels_last),
                                     case["x"].detach(), case["weight"].detach(), out, *conv_args,
                                     case["relu"], mask))


# ---------------------------------------------------------------------------------------------------------------
# backend="auto" on GPUs: cuDNN's fused conv + bias (+ add) + ReLU where it can run (resfuse/ops/cudnn_fused.py)


def test_cudnn_fused_is_only_for_gpu_relu_no_grad_calls():
    from resfuse.ops import cudnn_fused

    x, w, b = randn(2, 4, 5, 5), randn(6, 4, 3, 3, seed=1), randn(6, seed=2)
    assert cudnn_fused.unusable_reason(x, w, b, None, True) == "not a CUDA tensor"
    if torch.cuda.is_available():
        xc, wc, bc = x.cuda(), w.cuda(), b.cuda()
        assert "ReLU" in cudnn_fused.unusable_reason(xc, wc, bc, None, relu=False)
        assert "dtype" in cudnn_fused.unusable_reason(xc.double(), wc.double(), bc.double(), None, True)
        assert "gradient" in cudnn_fused.unusable_reason(xc, wc.requires_grad_(), bc, None, True)
        with torch.no_grad():
            assert cudnn_fused.unusable_reason(xc, wc, bc, None, True) is None


def test_cudnn_fused_remembers_a_refused_configuration(monkeypatch):
    """A configuration cuDNN refuses is asked once, warned about once, and then left to resfuse's op."""
    from resfuse.ops import cudnn_fused

    calls = []

    def refuse(*args):
        calls.append(args)
        raise RuntimeError("no engine for this configuration")

    def fused(x, w, b, stride, padding, dilation, groups):  # a CPU stand-in with cuDNN's contract
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    monkeypatch.setattr(cudnn_fused, "_refused", set())
    x = randn(2, 4, 6, 6, memory_format=torch.channels_last)
    w, b = randn(5, 4, 3, 3, seed=1), randn(5, seed=2)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", fused)
    out = cudnn_fused.run(x, w, b, None, [1, 1], [1, 1], [1, 1], 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, reference(x, w, b, None, 1, 1, 1, 1, True)) < 1e-6

    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuse)
    with pytest.warns(UserWarning, match="cuDNN refused"):
        assert cudnn_fused.run(x, w, b, None, [2, 2], [1, 1], [1, 1], 1) is None
    assert cudnn_fused.run(x, w, b, None, [2, 2], [1, 1], [1, 1], 1) is None  # not asked again
    assert len(calls) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("conv", CONVS[:4] + CONVS[5:6])
def test_auto_on_gpu_matches_reference(conv, with_residual, dtype, monkeypatch):
    """auto's eval path on a GPU (cuDNN's fused op where it runs, resfuse's op where it refuses) against
    float64, and resfuse's op whenever a gradient is needed."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x_shape, w_shape, stride, padding, dilation, groups = conv
    x = randn(*x_shape, dtype=dtype, seed=1, memory_format=torch.channels_last, device="cuda")
    w = randn(*w_shape, dtype=dtype, seed=2, device="cuda").contiguous(memory_format=torch.channels_last)
    b = randn(w_shape[0], dtype=dtype, seed=3, device="cuda")
    shape = out_shape(x_shape, w_shape, stride, padding, dilation)
    r = randn(*shape, dtype=dtype, seed=4, device="cuda", memory_format=torch.channels_last) if with_residual else None
    expected = reference(x, w, b, r, stride, padding, dilation, groups, True)
    with torch.no_grad():
        out = resfuse.ops.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, True, backend="auto")
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    w.requires_grad_(True)
    out = resfuse.ops.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, True, backend="auto")
    assert out.grad_fn is not None  # resfuse's op, which has a backward
    assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_auto_blocks_take_the_cudnn_route_in_eval(monkeypatch):
    """BasicBlock, Bottleneck (downsample included) and ConvBNReLU in eval under backend="auto" hand every conv
    followed by ReLU to cudnn_fused, and nothing else; checked on CPU with a stand-in for cuDNN."""
    from torchvision.models import resnet as tv

    from _helpers import randomize_bn_
    from resfuse.ops import cudnn_fused

    routed = []

    def stand_in(x, weight, bias, residual, stride, padding, dilation, groups):
        routed.append(residual is not None)
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.relu(y if residual is None else y + residual)

    from resfuse.nn import routing

    monkeypatch.setattr(cudnn_fused, "_device_reason", lambda x: None)  # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(routing, "eval_without_fold", lambda x, impl: False)  # and take the GPU's eval route
    monkeypatch.setattr(cudnn_fused, "run", stand_in)
    ds = torch.nn.Sequential(tv.conv1x1(16, 32, 2), torch.nn.BatchNorm2d(32))
    cases = [(tv.BasicBlock(8, 8), (2, 8, 6, 6), [False, True]),
             (tv.Bottleneck(16, 8, 2, ds), (2, 16, 8, 8), [False, False, True]),
             (resfuse.ConvBNReLU(8, 4, 3, padding=1, backend="reference"), (2, 8, 6, 6), [False])]
    for module, shape, expected in cases:
        theirs = randomize_bn_(module).eval()
        ours = copy.deepcopy(theirs)
        if isinstance(ours, resfuse.ConvBNReLU):
            ours.backend = "auto"
        else:
            ours = resfuse.convert(ours, backend="auto")
        x = randn(*shape)
        routed.clear()
        with torch.no_grad():
            assert rel_err(ours(x), theirs(x)) < 1e-5
        assert routed == expected, type(module).__name__  # the downsample (no ReLU) is resfuse's op


@pytest.mark.skipif(not resfuse._loader.extension_has_cuda(), reason="resfuse._C was built without CUDA kernels")
def test_cuda_conv_kernel_setting(monkeypatch):
    """RESFUSE_CUDA_CONV, read by the CUDA kernels (csrc/cuda/conv_kernels.h): auto by default, a kernel by name,
    and a clear error for anything else. Works without a GPU: CI builds the CUDA kernels."""
    from resfuse.ops.conv_bn_act import cuda_conv_kernel

    monkeypatch.delenv("RESFUSE_CUDA_CONV", raising=False)
    assert cuda_conv_kernel() == "auto"
    for raw, name in (("aten", "aten"), (" IGEMM ", "igemm"), ("sm90", "sm90"), ("Auto", "auto"), ("", "auto")):
        monkeypatch.setenv("RESFUSE_CUDA_CONV", raw)
        assert cuda_conv_kernel() == name, raw
    monkeypatch.setenv("RESFUSE_CUDA_CONV", "cutlass")
    with pytest.raises(RuntimeError, match="RESFUSE_CUDA_CONV=cutlass: expected one of auto, aten, igemm, sm90"):
        cuda_conv_kernel()


@pytest.mark.skipif(resfuse._loader.extension is None, reason="needs the C++ extension (resfuse._C)")
@pytest.mark.parametrize("with_bias,with_residual", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("needs", ["all", "input", "weight", "bias"])
def test_cpp_autograd_routes_each_gradient(with_bias, with_residual, needs):
    """resfuse::conv_bn_act's C++ autograd (csrc/conv_bn_act_autograd.cpp) records a C++ node and hands each
    gradient to its own input, with bias and residual optional and any subset of inputs needing one."""
    conv = dict(stride=[2, 2], padding=[1, 1], dilation=[1, 1])
    x = randn(2, 4, 7, 7, dtype=torch.float64, seed=11)
    w = randn(6, 4, 3, 3, dtype=torch.float64, seed=12)
    b = randn(6, dtype=torch.float64, seed=13) if with_bias else None
    r = randn(*out_shape(x.shape, w.shape, 2, 1, 1), dtype=torch.float64, seed=14) if with_residual else None
    if needs == "bias" and b is None:
        pytest.skip("no bias to differentiate")
    wanted = {"all": (x, w, b, r), "input": (x,), "weight": (w,), "bias": (b,)}[needs]
    leaves = [t.requires_grad_() for t in wanted if t is not None]
    out = torch.ops.resfuse.conv_bn_act(x, w, b, r, *conv.values(), 1, True)
    assert "ConvBnActFunction" in out.grad_fn.name()
    go = randn(*out.shape, dtype=torch.float64, seed=15)
    grads = torch.autograd.grad(out, leaves, go)
    expected = torch.autograd.grad(reference(x, w, b, r, 2, 1, 1, 1, True), leaves, go)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
