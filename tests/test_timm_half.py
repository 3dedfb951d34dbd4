"""timm's ResNets through resfuse.convert() in half precision, by the 2x rule.

The models of tests/test_timm_resnet.py (the registry's configurations, stage widths cut, 64 px, random weights,
randomized BN statistics) as fp16 and bf16 models, and as float32 models under ``torch.autocast("cpu",
bfloat16)``: eval, and one training step (the output, the input's and every parameter's gradient, every running
statistic after the step's forward). Each converted model's error against the float64 model is at most 2x
timm's own error at that precision (the same model run by timm, at the same dtype, on the same inputs), plus a
small floor. Every call runs the fused ops a float64 call runs (counted) and no block warns that it ran its
modules.

On CPU the "cuda" backend (the C++ kernels) at both dtypes and under autocast, and one small fp16 training
step on the Triton interpreter (a whole model there takes minutes). The "triton" backend on every model and the
registry's real stage widths are the GPU variants, marked ``cuda`` (unverified until a GPU runs them); the
Triton interpreter's bf16 ``tl.dot`` and bf16 stores are wrong (tests/_helpers.py), so its bf16 cases are
GPU-only in any case.
"""
import copy
import warnings

import pytest
import torch

from _helpers import backends_on, randn, randomize_bn_, rel_err, resfuse
from resfuse._warn_once import forget_warnings
from resfuse.nn.convert import ConversionWarning

timm = pytest.importorskip("timm")
from test_timm_resnet import (  # noqa: E402  (the models, their cut widths and the fused-op count)
    MODELS,
    SMALL,
    SMALL_V2,
    CountFusedOps,
    assert_no_module_path_warning,
    expected_fused_ops,
)

# name -> (model dtype, autocast dtype or None)
PRECISIONS = {"fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
              "autocast_bf16": (torch.float32, torch.bfloat16)}

# Floors as tests/test_gpu_blocks.py has them: eager's own half-precision error (~1e-3 fp16, ~1e-2 bf16) makes
# the factor of 2 the slack; the floor only matters where eager happens to be nearly exact.
OUT_FLOOR = 2e-4
GRAD_FLOOR = 2e-3
# A training step's gradients in half precision are dominated by ReLU kinks, not by arithmetic: an output that
# rounds to the other side of zero keeps or drops its whole gradient. Which outputs do differs between any two
# half-precision computations (ours rounds BN + add + ReLU once, eager rounds each), in the same number: at
# 64 px, 4 samples, resnet18 fp16, 17 outputs of the blocks flip against float64 in ours, 19 in timm's. Their
# effect goes as sqrt(eps), not eps: timm's own gradients are 5-30% off in fp16 and bf16 (1e-3 for the outputs),
# and where ours flip a different handful (last block of resnet18, 16 values per channel) one parameter's
# gradient can be 4-30x timm's error for that parameter, timm's being 5x lower there than for its neighbours.
# So each gradient gets RELU_KINK_FLOOR (observed excess over 2x timm's: <= 0.10 fp16, <= 0.26 bf16, over three
# input seeds of every model), and the gradients are held to the 2x rule together, by their mean relative
# error, where the kinks average out (ours / timm's: 0.4-1.4 over the same runs).
RELU_KINK_FLOOR = {torch.float16: 0.15, torch.bfloat16: 0.3}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread while a test runs whole models on the CPU: with -n 2 on two shared cores, the workers'
    OpenMP threads spin against each other (a training case took 60 s instead of 2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def damp_residual_branches_(model, factor=0.1):
    """Scales by ``factor`` what timm's ``zero_init_last()`` zeroes in each block (the last norm's weight, or a
    pre-activation block's last conv): timm starts training there, near zero. randomize_bn_ makes those norm
    weights O(1), and a deep net whose every residual branch adds an O(1) batch-normalised term is chaotic at
    init in training mode: a 1e-3 rounding of fp16 becomes a 10% change of the output in timm's own model
    (resnet50d), under which the 2x rule could not fail. Damped, the outputs are eps-accurate again."""
    with torch.no_grad():
        for block in model.modules():
            if block is model or not hasattr(block, "zero_init_last"):
                continue
            before = {name: p.clone() for name, p in block.named_parameters()}
            block.zero_init_last()
            for name, p in block.named_parameters():
                if not torch.equal(p, before[name]):
                    p.copy_(before[name] * factor)
    return model


def _models(name, dtype, backend, config, device):
    """(float64 truth, timm's model at ``dtype``, a copy converted by resfuse): the same weights and statistics."""
    torch.manual_seed(0)
    exact = timm.create_model(name, pretrained=False, num_classes=8, **config)
    exact = damp_residual_branches_(randomize_bn_(exact)).to(device).double()
    theirs = copy.deepcopy(exact).to(dtype)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        resfuse.convert(ours, backend=backend)
    return exact, theirs, ours


def _run(model, x, grad, train, autocast_dtype):
    """(output, the input's gradient) of one forward (and backward, in training) of ``model`` on ``x``."""
    model.train(train)
    x = x.detach().clone().requires_grad_(train)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(x)
    if train:
        out.backward(grad.to(out.dtype))
    return out.detach(), x.grad


def _fused_ops_expected(model, train, autocast):
    """What a call of the converted model runs fused: as in float64, less resnetv2's pre-activation norm1 in eval
    under autocast, which runs as the module (its eval op is not autocast-aware: timm_blocks.py)."""
    count = expected_fused_ops(model)
    if autocast and not train:
        count -= sum(type(m).__name__ in ("TimmPreActBasic", "TimmPreActBottleneck") for m in model.modules())
    return count


class Errors:
    """The 2x rule over many tensors; every violation is gathered so that a failure names them all."""

    def __init__(self):
        self.bad = []
        self.grads = []  # (ours, timm's) relative error of each gradient

    def check(self, what, ours, theirs, exact, floor):
        mine, eager = rel_err(ours, exact), rel_err(theirs, exact)
        if not mine <= 2 * eager + floor:
            self.bad.append(f"{what}: ours {mine:.3g}, timm's {eager:.3g}")
        return mine, eager

    def check_grad(self, what, ours, theirs, exact, kink_floor):
        self.grads.append(self.check(what, ours, theirs, exact, kink_floor))

    def check_grads_together(self, floor):
        mine, eager = (sum(e) / len(self.grads) for e in zip(*self.grads))
        if not mine <= 2 * eager + floor:
            self.bad.append(f"mean over the {len(self.grads)} gradients: ours {mine:.3g}, timm's {eager:.3g}")

    def assert_none(self):
        assert not self.bad, f"{len(self.bad)} over 2x timm's error + floor:\n" + "\n".join(self.bad)


def check_half_precision(name, precision, backend, train, config=None, device="cpu", batch=4, size=64):
    """``config``: timm's keyword arguments for the model, by default the stage widths cut (``SMALL``)."""
    dtype, autocast = PRECISIONS[precision]
    if config is None:
        config = SMALL_V2 if name.startswith("resnetv2") else SMALL
    exact, theirs, ours = _models(name, dtype, backend, config, device)
    if device == "cuda":
        theirs, ours = (m.to(memory_format=torch.channels_last) for m in (theirs, ours))
    x = randn(batch, 3, size, size, device=device, seed=1)
    grad = randn(batch, 8, device=device, seed=2)
    out64, gx64 = _run(exact, x.double(), grad.double(), train, None)
    out_t, gx_t = _run(theirs, x.to(dtype), grad, train, autocast)
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught, CountFusedOps() as counter:
        warnings.simplefilter("always")
        out_o, gx_o = _run(ours, x.to(dtype), grad, train, autocast)
    assert_no_module_path_warning(caught)
    assert counter.count == _fused_ops_expected(ours, train, autocast is not None)
    assert out_o.dtype == out_t.dtype and out_o.dtype == (autocast or dtype)
    errors = Errors()
    errors.check("output", out_o, out_t, out64, OUT_FLOOR)
    if train:
        kink_floor = RELU_KINK_FLOOR[autocast or dtype]
        errors.check_grad("grad input", gx_o, gx_t, gx64, kink_floor)
        for (pname, p64), p_t, p_o in zip(exact.named_parameters(), theirs.parameters(), ours.parameters()):
            assert p_o.grad.dtype == p_t.grad.dtype == dtype, pname
            errors.check_grad(f"grad {pname}", p_o.grad, p_t.grad, p64.grad, kink_floor)
        errors.check_grads_together(GRAD_FLOOR)
        for (bname, b64), b_t, b_o in zip(exact.named_buffers(), theirs.buffers(), ours.buffers()):
            if bname.endswith("num_batches_tracked"):
                assert torch.equal(b_o, b_t), bname
            else:
                assert b_o.dtype == b_t.dtype == dtype, bname
                errors.check(bname, b_o, b_t, b64, OUT_FLOOR)
    errors.assert_none()


CPU_CASES = [pytest.param(name, precision, "cuda", id=f"{name}-{precision}-cpp")
             for name in MODELS for precision in PRECISIONS]


@pytest.mark.skipif("cuda" not in backends_on("cpu"), reason="needs the resfuse._C extension's CPU kernels")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name, precision, backend", CPU_CASES)
def test_timm_model_in_half_precision_within_2x_of_timm(name, precision, backend, train):
    check_half_precision(name, precision, backend, train)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_on("cpu"), reason="needs triton's interpreter (TRITON_INTERPRET=1)")
def test_resnet18_training_step_in_fp16_on_the_triton_interpreter():
    """The Triton BN kernels (bn_act fp16, forward and backward) through a whole timm model: a training step runs
    them after ATen's convs. One block per stage and half the widths, at 32 px: the interpreter takes 8-13 s even so
    (eval, where the Triton conv runs too, 30 s: left to the GPU variants)."""
    config = {"channels": (8, 16, 32, 64), "stem_width": 8, "layers": (1, 1, 1, 1)}
    check_half_precision("resnet18", "fp16", "triton", True, config=config, size=32)


@pytest.mark.cuda
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
@pytest.mark.parametrize("name", MODELS)
def test_timm_model_at_real_widths_on_gpu(name, backend, precision, train):
    """Unverified: no GPU has run it. The registry's stage widths, channels_last, 128 px."""
    if backend != "auto":
        reason = resfuse.ops.backend.unavailable_reason(backend, torch.device("cuda"))
        if reason is not None:
            pytest.skip(reason)
    check_half_precision(name, precision, backend, train, config={}, device="cuda", batch=8, size=128)
