"""What is timed: a *problem* (one bench x shape x mode x dtype x layout, with its fp32 eager reference) and a
*runner* per provider (one callable = one timed iteration). Used by ``python -m resfuse.bench`` and by the
pytest-benchmark files in ``benchmarks/``, so both time exactly the same thing.

Benches (the ``bench`` field of a record):

- ``conv_bn_act`` (eval): a 3x3 conv + eval BN + residual + ReLU on an activation shape. Eager runs
  ``nn.Conv2d``, ``nn.BatchNorm2d``, add, ReLU; ``resfuse_*`` and ``cudnn_fused`` run the conv with BN folded into
  its weight and bias (the fold is done once, outside the timed region, as resfuse's modules cache it).
- ``bn_act`` (train): training-mode BN + residual + ReLU, forward and backward.
- ``basicblock``, ``bottleneck``: one block (``resfuse.nn.eager_blocks``, torchvision's), eval and train.
- ``model:<name>``: a whole torchvision ResNet (``resnet18``...) or a timm model (``timm:resnet50d``, built by
  ``timm.create_model(name, pretrained=False)``: random weights, nothing downloaded): eval is one no-grad
  forward, train one step (forward, cross-entropy, backward, SGD step).

Providers (RESULTS.md): ``eager``, ``compile`` (torch.compile, default mode), ``compile_freezing`` (eval;
inductor's ``freezing`` under no_grad), ``cudnn_fused`` (eval, CUDA: BN folded, then
``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``), ``resfuse_cuda``,
``resfuse_triton``, ``resfuse_auto``, ``resfuse_compile`` (torch.compile over the converted module: resfuse's
ops stay opaque, Inductor fuses what is around them), ``compile_cudagraphs`` and ``resfuse_compile_cudagraphs``
(the same two with ``mode="reduce-overhead"``: Inductor's CUDA graphs, GPU only). A provider that cannot run a
problem raises ``Unavailable`` with the reason; nothing is ever replaced by something else.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..layout import memory_format_of
from ..nn.eager_blocks import EagerBasicBlock, EagerBottleneck, conv1x1
from ..ops import autoselect as _autoselect
from ..ops import backend as _backend
from . import counting
from .shapes import ActShape, BlockShape, MODEL_LAYERS

PROVIDERS = ("eager", "compile", "compile_freezing", "cudnn_fused", "resfuse_cuda", "resfuse_triton",
             "resfuse_auto", "resfuse_compile", "compile_cudagraphs", "resfuse_compile_cudagraphs")
# the providers that run torch.compile (their first call compiles; a comparison holding one resets dynamo)
COMPILED = ("compile", "compile_freezing", "resfuse_compile", "compile_cudagraphs", "resfuse_compile_cudagraphs")
# torch.compile(mode="reduce-overhead"): Inductor records CUDA graphs and replays them
CUDAGRAPHS = ("compile_cudagraphs", "resfuse_compile_cudagraphs")
# torch.compile over resfuse.convert()'s module, and the backend its ops take. Under tracing ``auto`` measures
# nothing and applies its fixed rules (ops/autoselect.py): what a user gets from torch.compile(convert(model)).
RESFUSE_COMPILED = ("resfuse_compile", "resfuse_compile_cudagraphs")
RESFUSE_COMPILE_BACKEND = "auto"
TIMM_PREFIX = "timm:"
BENCHES = ("conv_bn_act", "bn_act", "basicblock", "bottleneck", "model")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# the modes each bench has: conv_bn_act is the eval-mode op (BN folded), bn_act the training-mode one
BENCH_MODES = {"conv_bn_act": ("eval",), "bn_act": ("train",), "basicblock": ("eval", "train"),
               "bottleneck": ("eval", "train"), "model": ("eval", "train")}
NUM_CLASSES = 1000


class Unavailable(Exception):
    """A provider cannot run this problem here; the message says why."""


def bench_name(bench: str, shape: Any) -> str:
    return f"model:{shape}" if bench == "model" else bench


# ---------------------------------------------------------------------------------------------------------
# eager modules of the ops


class ConvBNAddReLU(nn.Module):
    """Eager ``relu(bn(conv3x3(x)) + residual)``: what ``resfuse.ops.conv_bn_act`` replaces in eval mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)) + residual)


class BNAddReLU(nn.Module):
    """Eager ``relu(bn(x) + residual)``: what ``resfuse.ops.bn_act`` replaces in training mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(self.bn(x) + residual)


class _ResfuseConvBNAct(nn.Module):
    def __init__(self, eager: ConvBNAddReLU, backend: str):
        super().__init__()
        self.weight, self.bias = _fold(eager.conv, eager.bn)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        from ..ops import conv_bn_act

        return conv_bn_act(x, self.weight, self.bias, residual, 1, 1, 1, 1, True, backend=self.backend)


class _ResfuseBNAct(nn.Module):
    def __init__(self, eager: BNAddReLU, backend: str):
        super().__init__()
        self.bn = eager.bn
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        from ..ops import bn_act

        bn = self.bn
        return bn_act(x, bn.weight, bn.bias, residual, bn.running_mean, bn.running_var, bn.momentum, bn.eps,
                      True, backend=self.backend)


# ---------------------------------------------------------------------------------------------------------
# cudnn_fused: BN folded, then cuDNN's fused conv + bias (+ add) + ReLU


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    weight, bias = reference.fold_bn_ref(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                         bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var,
                                         bn.eps)
    return weight.contiguous(memory_format=memory_format_of(conv.weight)), bias


class _CudnnConv:
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        self.weight, self.bias = _fold(conv, bn)
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def __call__(self, x: Tensor, relu: bool = True, residual: Optional[Tensor] = None) -> Tensor:
        if residual is not None:
            return torch.cudnn_convolution_add_relu(x, self.weight, residual, 1.0, self.bias, *self.args)
        if relu:
            return torch.cudnn_convolution_relu(x, self.weight, self.bias, *self.args)
        stride, padding, dilation, groups = self.args
        return F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)


class _CudnnBlock:
    """A torchvision BasicBlock/Bottleneck as fused cuDNN calls; the downsample is a conv with the folded bias."""

    def __init__(self, block: nn.Module):
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if hasattr(block, "conv3"):
            pairs.append((block.conv3, block.bn3))
        self.convs = [_CudnnConv(c, b) for c, b in pairs]
        ds = block.downsample
        if ds is not None and not (isinstance(ds, nn.Sequential) and len(ds) == 2):
            raise Unavailable("cudnn_fused handles a downsample of conv + BN only")
        self.downsample = None if ds is None else _CudnnConv(ds[0], ds[1])

    def __call__(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x, relu=False)
        out = x
        for conv in self.convs[:-1]:
            out = conv(out)
        return self.convs[-1](out, residual=identity)


class _CudnnResNet:
    def __init__(self, model: nn.Module):
        self.stem = _CudnnConv(model.conv1, model.bn1)
        self.maxpool, self.avgpool, self.fc = model.maxpool, model.avgpool, model.fc
        self.blocks = [_CudnnBlock(b) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                       for b in layer]

    def __call__(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _FreezingOnFirstCall:
    """torch.compile with inductor's freezing (the parameters folded into the graph as constants, BN into the
    convs). ``torch.compile(options={"freezing": True})`` alone does not freeze (torch 2.11 and 2.14: inductor
    runs its freezing pass but the generated code still takes the parameters as inputs; dynamo reads the global
    config), so the config is set while the first call compiles, and only then: a provider timed beside this
    one, plain ``compile`` included, compiles without it."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled
        self.frozen = False

    def __call__(self, *args):
        if self.frozen:
            return self.compiled(*args)
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            out = self.compiled(*args)
        self.frozen = True
        return out


class _CudnnConvBNAct:
    def __init__(self, eager: ConvBNAddReLU):
        self.conv = _CudnnConv(eager.conv, eager.bn)

    def __call__(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.conv(x, residual=residual)


# ---------------------------------------------------------------------------------------------------------
# problems


# The 2x rule's floor per bench dtype: what it tolerates where eager's own error is near zero (a step whose sums
# happen to be exact), about one rounding of the dtype. In train mode a pre-activation within a rounding of zero
# can fall on the other side of the ReLU in any two computations, which zeroes or keeps its whole gradient: a
# few such elements among millions give ~1e-3 on a gradient's norm, whoever computes it.
ACCURACY_FLOOR = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 4e-3}
RELU_KINK_FLOOR = 2e-3


@dataclass
class Problem:
    """One comparison: every provider runs these inputs and is checked against ``reference()``."""

    bench: str  # the record's bench: conv_bn_act, bn_act, basicblock, bottleneck, model:<name>
    kind: str  # op, block or model
    mode: str
    stage: str
    n: int
    c: int
    h: int
    w: int
    stride: Optional[int]
    c_out: int
    device: torch.device
    dtype_name: str
    layout: str
    flops: int
    bytes: int
    master: nn.Module  # fp32 eager module, on the device, in the layout
    inputs: tuple  # fp32 inputs
    grad_out: Optional[Tensor] = None  # fp32 output gradient (train mode of ops and blocks)
    target: Optional[Tensor] = None  # labels (train mode of models)
    _reference: Optional[list] = field(default=None, repr=False)
    _reference64: Optional[list] = field(default=None, repr=False)
    _eager_err: Optional[float] = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def train(self) -> bool:
        return self.mode == "train"

    def base_record(self) -> dict:
        return {"bench": self.bench, "mode": self.mode, "stage": self.stage, "N": self.n, "C": self.c,
                "H": self.h, "W": self.w, "stride": self.stride, "dtype": self.dtype_name, "layout": self.layout,
                "C_out": self.c_out}

    def reference(self) -> list:
        """The eager fp32 outputs (and input gradients in train mode), TF32 off, computed once."""
        if self._reference is None:
            module = copy.deepcopy(self.master).train(self.train)
            inputs = tuple(t.detach().clone().requires_grad_(self.train and self.kind != "model")
                           for t in self.inputs)
            with _no_tf32():
                step = _make_step(self, module, inputs, self.grad_out, self.target)
                self._reference = [t.detach() for t in step()]
            del module
        return self._reference

    def reference64(self) -> list:
        """The same step in float64 on the same device: the truth the 2x rule measures every provider against."""
        if self._reference64 is None:
            module = copy.deepcopy(self.master).double().train(self.train)
            inputs = tuple(t.detach().double().requires_grad_(self.train and self.kind != "model")
                           for t in self.inputs)
            grad_out = None if self.grad_out is None else self.grad_out.double()
            step = _make_step(self, module, inputs, grad_out, self.target)
            self._reference64 = [t.detach() for t in step()]
            del module
        return self._reference64

    def accuracy_limit(self) -> float:
        """The largest rel_err against ``reference64()`` a provider may have: twice eager's own at the bench's
        dtype (the house's 2x rule), plus a floor for where eager happens to be exact."""
        if self._eager_err is None:
            eager = make_runner(self, "eager")
            try:
                self._eager_err = rel_err(eager.step(), self.reference64())
            finally:
                eager.close()
        floor = max(ACCURACY_FLOOR[self.dtype_name], RELU_KINK_FLOOR if self.train else 0.0)
        return 2 * self._eager_err + floor

    def free(self) -> None:
        self.master = None
        self.inputs = ()
        self.grad_out = self.target = self._reference = self._reference64 = None


@contextlib.contextmanager
def _no_tf32():
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _randn(shape: Sequence[int], seed: int, device: torch.device, fmt: torch.memory_format) -> Tensor:
    # drawn on the CPU so that every device sees the same numbers
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device).contiguous(memory_format=fmt)


def _calibrate_bn(module: nn.Module, inputs: tuple, seed: int = 1) -> None:
    """Give every BN a non-trivial affine and running statistics equal to the batch statistics of ``inputs``,
    so eval mode is a realistic test of BN folding (fresh BNs are the identity up to eps)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            bn.weight.copy_(0.5 + torch.rand(c, generator=g))
            bn.bias.copy_(0.1 * torch.randn(c, generator=g))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the running statistics to its own
        training = module.training
        module.train()(*inputs)
        module.train(training)
    for bn in bns:
        bn.momentum = 0.1


def _block_module(shape: BlockShape) -> nn.Module:
    cls = EagerBasicBlock if shape.block == "basicblock" else EagerBottleneck
    downsample = None
    if shape.downsample:
        downsample = nn.Sequential(conv1x1(shape.inplanes, shape.out_channels, shape.stride),
                                   nn.BatchNorm2d(shape.out_channels))
    return cls(shape.inplanes, shape.planes, shape.stride, downsample)


def check_model_name(name: str) -> None:
    """Raise ValueError (a message a user understands) unless ``name`` is a model the models bench can build:
    a torchvision ResNet of the shape table, or ``timm:<name>`` of a model timm knows."""
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except Exception as exc:  # an optional dependency
            raise ValueError(f"{name}: timm is not importable ({exc})") from None
        if not timm.is_model(name[len(TIMM_PREFIX):]):
            raise ValueError(f"{name}: timm has no model {name[len(TIMM_PREFIX):]!r}")
        return
    if name not in MODEL_LAYERS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_LAYERS)} or timm:<name>")


def _model(name: str) -> nn.Module:
    """A whole model with random weights (nothing is downloaded)."""
    check_model_name(name)
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=NUM_CLASSES)
    try:
        from torchvision import models
    except Exception as exc:  # an optional dependency
        raise Unavailable(f"torchvision is not importable ({exc})") from None
    return getattr(models, name)(weights=None, num_classes=NUM_CLASSES)


def make_problem(bench: str, shape: Any, mode: str, batch: int, device: torch.device | str, dtype: str,
                 layout: str = "channels_last", resolution: int = 224, seed: int = 0) -> Problem:
    """Build the fp32 master module and inputs of one comparison. ``shape`` is an ``ActShape`` for the ops, a
    ``BlockShape`` for the blocks and a model name for ``model``."""
    device = torch.device(device)
    if bench not in BENCHES:
        raise ValueError(f"unknown bench {bench!r}: expected one of {', '.join(BENCHES)}")
    if mode not in BENCH_MODES[bench]:
        raise ValueError(f"{bench} has no {mode} mode (it has: {', '.join(BENCH_MODES[bench])})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    fmt = LAYOUTS[layout]
    train = mode == "train"
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    torch.manual_seed(seed)
    if bench in ("conv_bn_act", "bn_act"):
        assert isinstance(shape, ActShape)
        c, s = shape.channels, shape.size
        master = ConvBNAddReLU(c) if bench == "conv_bn_act" else BNAddReLU(c)
        inputs = (_randn((batch, c, s, s), seed, device, fmt), _randn((batch, c, s, s), seed + 1, device, fmt))
        kind, stage, stride, c_out, h = "op", shape.stage, 1, c, s
        if bench == "conv_bn_act":
            flops = counting.conv_bn_act_flops(shape, batch, train)
            nbytes = counting.conv_bn_act_bytes(shape, batch, itemsize, train)
        else:
            flops = counting.bn_act_flops(shape, batch, train)
            nbytes = counting.bn_act_bytes(shape, batch, itemsize, train)
        out_shape = (batch, c, s, s)
    elif bench in ("basicblock", "bottleneck"):
        assert isinstance(shape, BlockShape) and shape.block == bench
        master = _block_module(shape)
        inputs = (_randn((batch, shape.inplanes, shape.size, shape.size), seed, device, fmt),)
        kind, stage, stride, c, c_out, h = "block", shape.stage, shape.stride, shape.inplanes, shape.out_channels, \
            shape.size
        flops = counting.block_flops(shape, batch, train)
        nbytes = counting.block_bytes(shape, batch, itemsize, train)
        out_shape = (batch, shape.out_channels, shape.out_size, shape.out_size)
    else:
        master = _model(shape)
        inputs = (_randn((batch, 3, resolution, resolution), seed, device, fmt),)
        kind, stage, stride, c, c_out, h = "model", f"{resolution}px", None, 3, NUM_CLASSES, resolution
        count = counting.count_model(master, resolution)
        flops, nbytes = count.flops(batch, train), count.bytes(batch, itemsize, train)
        out_shape = None
    master = master.to(device, memory_format=fmt)
    _calibrate_bn(master, inputs)
    master.train(train)
    grad_out = target = None
    if train and out_shape is not None:
        grad_out = _randn(out_shape, seed + 2, device, fmt)
    if train and kind == "model":
        target = torch.randint(0, NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(seed + 3))
        target = target.to(device)
    return Problem(bench_name(bench, shape), kind, mode, stage, batch, c, h, h, stride, c_out, device, dtype,
                   layout, flops, nbytes, master, inputs, grad_out, target)


# ---------------------------------------------------------------------------------------------------------
# runners


@dataclass
class Runner:
    provider: str
    step: Callable[[], list]  # one timed iteration; returns the outputs compared with the reference
    backend: Optional[str] = None  # the resfuse backend that runs (resfuse_auto resolves to one)
    compiles: bool = False  # its first call compiles or autotunes (compile_s is reported)
    keep: Any = None  # what the step closes over, released by close()
    describe: Optional[Callable[[], str]] = None  # the backend label, known only once the step has run
    converted: Optional[str] = None  # what resfuse.convert() said it fused and left (whole models)

    def close(self) -> None:
        self.keep = None
        self.step = None
        if self.provider in COMPILED:
            torch._dynamo.reset()


def _make_step(problem: Problem, fn: Callable, inputs: tuple, grad_out: Optional[Tensor],
               target: Optional[Tensor], params: Optional[list] = None) -> Callable[[], list]:
    if not problem.train:
        def step_eval():
            with torch.no_grad():
                return [fn(*inputs)]
        return step_eval
    if params is None:
        params = [p for p in getattr(fn, "parameters", lambda: [])() if p.requires_grad]
    if problem.kind == "model":
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

        def step_model():
            opt.zero_grad(set_to_none=True)
            out = fn(*inputs)
            F.cross_entropy(out.float(), target).backward()
            opt.step()
            return [out.detach()]
        return step_model

    def step_train():
        for t in inputs:
            t.grad = None
        for p in params:
            p.grad = None
        out = fn(*inputs)
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in inputs]
    return step_train


# the first calls of a CUDA-graph provider: compilation (forward, then backward) and the first recordings, when
# Inductor decides whether it can use CUDA graphs at all
CUDAGRAPH_CHECKED_CALLS = 3


def _cudagraph_step(step: Callable[[], list]) -> Callable[[], list]:
    """``step`` as a CUDA-graph provider must run it. Each call begins a new iteration for Inductor's CUDA graph
    trees, whose outputs live in memory that the next replay overwrites: the first calls return copies (the
    outputs compared with the reference are the first call's). Where Inductor decides to run without CUDA
    graphs (it counts a skip), the call raises: timing that as ``*_cudagraphs`` would pretend to a fast path
    that did not run."""
    from torch._dynamo.utils import counters

    calls = 0

    def run() -> list:
        nonlocal calls
        torch.compiler.cudagraph_mark_step_begin()
        if calls >= CUDAGRAPH_CHECKED_CALLS:
            return step()
        skips = counters["inductor"]["cudagraph_skips"]
        outputs = step()
        if counters["inductor"]["cudagraph_skips"] > skips:
            raise RuntimeError("Inductor skipped CUDA graphs for this problem, so mode='reduce-overhead' ran "
                               "without them (TORCH_LOGS=cudagraphs says why)")
        calls += 1
        return [None if t is None else t.clone() for t in outputs]
    return run


def resfuse_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``resfuse_<backend>`` is not timed on ``device`` (None: it is)."""
    if backend == "triton" and device.type != "cuda":
        return "Triton kernels run on CPU only under the interpreter, a test vehicle that is never timed"
    if backend == "auto":
        resolved = _backend.resolve_backend("auto", device)
        if resolved == "reference":
            return "auto resolves to the reference backend here: nothing fused to time"
        return None
    return _backend.unavailable_reason(backend, device)


def provider_unavailable(problem: Problem, provider: str) -> Optional[str]:
    """Why ``provider`` cannot run ``problem`` here, decided without building anything (None: it can)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if provider == "compile_freezing" and problem.train:
        return "freezing is an inference transform (eval under no_grad): no train mode"
    if provider in CUDAGRAPHS and problem.device.type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    if provider == "cudnn_fused":
        if problem.bench.startswith("model:" + TIMM_PREFIX):
            return "the cuDNN-fused model is wired for torchvision's ResNet layout only"
        if problem.device.type != "cuda":
            return "cuDNN's fused convolutions need a CUDA GPU"
        if problem.train:
            return "BN folded into the conv is eval-only: no train mode"
        if problem.bench == "bn_act":
            return "no convolution to fuse into"
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
    if provider in RESFUSE_COMPILED:
        return resfuse_unavailable(RESFUSE_COMPILE_BACKEND, problem.device)
    if provider.startswith("resfuse_"):
        return resfuse_unavailable(provider[len("resfuse_"):], problem.device)
    return None


def _convert(module: nn.Module, backend: str) -> tuple[nn.Module, str]:
    """``resfuse.convert(module)`` and what it said it did. A module in which it fused nothing raises
    ``Unavailable``: timing it would time eager PyTorch under a resfuse name."""
    from ..nn import convert
    from ..nn.convert import ConversionWarning

    classes = {id(m): type(m) for m in module.modules()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(module, backend=backend)
    said = []
    for w in caught:
        if issubclass(w.category, ConversionWarning):
            said.append(str(w.message))
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report = "; ".join(said)
    # convert() re-classes modules in place (or swaps in new ones): anything whose class changed was fused
    if all(classes.get(id(m)) is type(m) for m in module.modules()):
        raise Unavailable(f"resfuse.convert() fused nothing in this model ({report})")
    return module, report


def make_runner(problem: Problem, provider: str, reset_compiler: bool = True) -> Runner:
    """The provider's timed callable for ``problem`` (raises ``Unavailable`` when it cannot run here).

    ``reset_compiler=False`` keeps torch.compile's caches: for a runner built beside others of the same
    problem that are timed together (a reset would drop their compiled code and recompile it while timed)."""
    reason = provider_unavailable(problem, provider)
    if reason is not None:
        raise Unavailable(reason)
    module = copy.deepcopy(problem.master).to(problem.dtype).train(problem.train)
    # copies: each runner owns its inputs (and their .grad), whatever the dtype
    inputs = tuple(t.detach().to(problem.dtype, copy=True).requires_grad_(problem.train and problem.kind != "model")
                   for t in problem.inputs)
    grad_out = None if problem.grad_out is None else problem.grad_out.to(problem.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    backend, compiles, describe, converted = None, False, None, None
    # reduce-overhead: Inductor's CUDA graphs (default mode otherwise)
    mode = "reduce-overhead" if provider in CUDAGRAPHS else None
    fn: Callable = module
    if provider in COMPILED and reset_compiler:  # a fresh cache: no reuse of another problem's graph, no
        torch._dynamo.reset()  # automatic dynamic shapes
    if provider == "compile_freezing":
        # options that differ from plain compile's make dynamo keep a cache entry per provider: with the same
        # backend, a deepcopy of the module passes the other runner's guards and reuses its graph
        fn = _FreezingOnFirstCall(torch.compile(module, dynamic=False, options={"freezing": True}))
        compiles = True
    elif provider in ("compile", "compile_cudagraphs"):
        fn = torch.compile(module, dynamic=False, mode=mode)
        compiles = True
    elif provider == "cudnn_fused":
        if problem.kind == "op":
            fn = _CudnnConvBNAct(module)
        elif problem.kind == "block":
            fn = _CudnnBlock(module)
        else:
            fn = _CudnnResNet(module)
        try:  # whether cuDNN has a fused engine for this dtype/layout is only known by asking it
            with torch.no_grad():
                fn(*inputs)
            torch.cuda.synchronize(problem.device)
        except RuntimeError as exc:
            raise Unavailable(f"cuDNN cannot run the fused convolution here: {str(exc).splitlines()[0]}") from None
    elif provider.startswith("resfuse_"):
        compiled = provider in RESFUSE_COMPILED
        name = RESFUSE_COMPILE_BACKEND if compiled else provider[len("resfuse_"):]
        backend = _backend.resolve_backend(name, problem.device)
        compiles = backend == "triton"
        if name == "auto" and _autoselect.device_measurable(problem.device):
            if compiled:  # traced: auto's fixed rules are in the graph, nothing is measured
                backend = "auto: fixed rule"
            else:
                # auto measures its candidates on the first call of each configuration (ops/autoselect.py): the
                # record names what it chose, read after the run
                _autoselect.clear_auto_choices()
                describe, compiles = _auto_chosen, True
        if problem.bench == "conv_bn_act":
            fn = _ResfuseConvBNAct(module, name)
        elif problem.bench == "bn_act":
            fn = _ResfuseBNAct(module, name)
        else:
            fn, said = _convert(module, name)
            converted = said if problem.kind == "model" else None
        if compiled:
            fn = torch.compile(fn, dynamic=False, mode=mode)
            compiles = True
    step = _make_step(problem, fn, inputs, grad_out, problem.target, params)
    if provider in CUDAGRAPHS:
        step = _cudagraph_step(step)
    return Runner(provider, step, backend, compiles, keep=(module, fn, inputs), describe=describe,
                  converted=converted)


def _auto_chosen() -> str:
    """What ``auto`` ran, from its choices since the runner was made: e.g. ``auto: cudnn_fused+cuda``."""
    chosen = sorted({entry["chosen"] or "fixed rule" for entry in _autoselect.auto_choices()})
    return "auto: " + ("+".join(chosen) if chosen else "fixed rule")


def rel_err(outputs: Sequence[Tensor], expected: Sequence[Tensor]) -> Optional[float]:
    """The largest ||out - ref|| / ||ref|| over the compared tensors (float64 norms)."""
    errs = []
    for a, e in zip(outputs, expected):
        if a is None or e is None:
            continue
        a, e = a.detach().double(), e.detach().double()
        errs.append(((a - e).norm() / e.norm().clamp_min(1e-30)).item())
    return max(errs) if errs else None
