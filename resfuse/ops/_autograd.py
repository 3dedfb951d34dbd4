"""Registration shared by the C++ and the Triton flavour of each op: fake kernels and autograd.

Both flavours have one schema, so one fake kernel and one backward formula serve them; only the backward op
they call differs. The backward is itself a registered op, so torch.compile traces it without a graph break.

Autograd is an ``Autograd``-key kernel (what torchvision registers in C++), not ``register_autograd``, which
refuses ops that mutate an input; ``bn_act`` mutates the running statistics, which are not differentiable.
The same kernel bumps the mutated buffers' version counters, which the dispatcher does not do for ops
defined outside ``custom_op``: the cached eval-mode BN fold (resfuse/nn/fold.py) relies on them.
When the C++ extension is built, every flavour's autograd kernel is the same formula written in C++
(csrc/*_autograd.cpp), the Triton flavours' included, for the host time of a step: this module then registers
only fake kernels, and the Python autograd kernels below serve the Triton flavours of a build without it.

Second-order gradients (``create_graph=True``: gradient penalties, MAML, influence functions) need the backward
itself to be differentiable. Each backward op therefore has an Autograd kernel too (register_backward_autograd):
when autograd must record the call, it computes the backward with differentiable torch math, given by the op's
file; otherwise it runs the device kernel. The forward ops' autograd kernels call the backward op below
autograd when grad mode is off (every ordinary backward), so only a create_graph backward pays for it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..layout import memory_format_of, stats_dtype


def grad_needed(*values) -> bool:
    """Whether autograd would record a call on ``values`` (non-tensors and None are skipped)."""
    return torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in values)


def empty_activation(x: Tensor, shape=None) -> Tensor:
    fmt = memory_format_of(x)
    shape = x.shape if shape is None else shape
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def grads_like(x: Tensor, param_dtype: torch.dtype, output_mask) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outputs of a backward op: (grad_input, grad_weight, grad_bias, grad_residual), empty where not asked."""
    channels = x.shape[1]
    empty_act = x.new_empty((0,))
    empty_param = x.new_empty((0,), dtype=param_dtype)
    return (
        empty_activation(x) if output_mask[0] else empty_act,
        x.new_empty((channels,), dtype=param_dtype) if output_mask[1] else empty_param,
        x.new_empty((channels,), dtype=param_dtype) if output_mask[2] else empty_param.clone(),
        empty_activation(x) if output_mask[3] else empty_act.clone(),
    )


def conv_output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple:
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, out_channels, oh, ow)


_lib = torch.library.Library("resfuse", "FRAGMENT")


def define_triton_op(name: str, schema: str, kernel: Callable) -> None:
    """A Triton flavour: runs on CUDA tensors, and on CPU tensors under the Triton interpreter."""
    _lib.define(name + schema)
    _lib.impl(name, kernel, "CUDA")
    _lib.impl(name, kernel, "CPU")


def _register_autograd_kernel(name: str, setup_context: Callable, backward: Callable,
                              mutated: Sequence[int] = ()) -> None:
    """The Python autograd kernel of ``resfuse::<name>``, unless the C++ extension registered its own (every
    flavour's when it is built: less host time per call)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse::{name}", "Autograd"):
        return
    op = getattr(torch.ops.resfuse, name).default

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            setup_context(ctx, args, output)
            if isinstance(output, tuple):
                ctx.mark_non_differentiable(*output[1:])
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def autograd_kernel(*args):
        if grad_needed(*args):
            output = _Function.apply(*args)
        else:
            # Nothing to record (eval, or no_grad): the Function would only add host time to every call.
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
        for index in mutated:
            if args[index] is not None:
                torch.autograd.graph.increment_version(args[index])
        return output

    _lib.impl(name, autograd_kernel, "Autograd")


def register_backward_autograd(backward_name: str, differentiable: Callable) -> None:
    """The Autograd kernel of backward op ``resfuse::<backward_name>``: ``differentiable(*args)`` (the same
    backward in torch ops, recorded by autograd) when a tensor argument requires grad and grad mode is on,
    else the device kernel."""
    op = getattr(torch.ops.resfuse, backward_name).default

    def autograd_kernel(*args):
        if grad_needed(*args):
            return differentiable(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _lib.impl(backward_name, autograd_kernel, "Autograd")


def call_backward(backward_op, *args):
    """A backward op called from a forward op's backward: below autograd in an ordinary backward (no Python
    Autograd kernel on the way), through it when create_graph=True asks autograd to record the backward."""
    if torch.is_grad_enabled():
        return backward_op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return backward_op(*args)


def register_bn_act(name: str, backward_name: str) -> None:
    """Fake kernels + autograd for one bn_act flavour (``resfuse::<name>`` and its backward op); the autograd
    kernel only where csrc/bn_act_autograd.cpp did not register the same formula and version-counter bump."""
    backward_op = getattr(torch.ops.resfuse, backward_name).default

    @torch.library.register_fake(f"resfuse::{name}", lib=_lib)
    def _fake(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
        stats = input.new_empty((input.shape[1],), dtype=stats_dtype(input))
        return empty_activation(input), stats, stats.clone()

    @torch.library.register_fake(f"resfuse::{backward_name}", lib=_lib)
    def _fake_backward(grad_out, input, weight, out, save_mean, save_invstd, relu, output_mask):
        param_dtype = weight.dtype if weight is not None else torch.float32
        return grads_like(input, param_dtype, output_mask)

    def setup_context(ctx, inputs, output):
        input, weight, bias, residual = inputs[:4]
        out, save_mean, save_invstd = output
        ctx.save_for_backward(input, weight, out, save_mean, save_invstd)
        ctx.relu = inputs[8]
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None

    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        input, weight, out, save_mean, save_invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2],
                ctx.has_residual and needs[3]]
        if not any(mask):
            return (None,) * 9
        gi, gw, gb, gr = call_backward(backward_op, grad_out.contiguous(memory_format=memory_format_of(out)),
                                       input, weight, out, save_mean, save_invstd, ctx.relu, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                gr if mask[3] else None, None, None, None, None, None)

    _register_autograd_kernel(name, setup_context, backward, mutated=(4, 5))


def _register_fake_conv_backward(backward_name: str) -> None:
    @torch.library.register_fake(f"resfuse::{backward_name}", lib=_lib)
    def _fake_backward(grad_out, input, weight, out, stride, padding, dilation, groups, relu, output_mask):
        gi, gw, gb, gr = grads_like(input, weight.dtype, output_mask)
        if output_mask[1]:
            gw = torch.empty_like(weight, memory_format=memory_format_of(weight))
        if output_mask[2]:
            gb = weight.new_empty((weight.shape[0],))
        if output_mask[3]:
            gr = empty_activation(input, out.shape)
        return gi, gw, gb, gr


def register_conv_bn_act(name: str, backward_name: str, backward_registered: bool = False) -> None:
    """Fake kernels + autograd for one conv_bn_act flavour; the autograd kernel only where
    csrc/conv_bn_act_autograd.cpp did not register the same formula. ``backward_registered``: its backward op is
    another flavour's, whose fake kernel is already registered."""
    @torch.library.register_fake(f"resfuse::{name}", lib=_lib)
    def _fake(input, weight, bias, residual, stride, padding, dilation, groups, relu):
        return empty_activation(input, conv_output_shape(input, weight, stride, padding, dilation))

    if not backward_registered:
        _register_fake_conv_backward(backward_name)
    backward_op = getattr(torch.ops.resfuse, backward_name).default

    def setup_context(ctx, inputs, output):
        input, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
        ctx.save_for_backward(input, weight, output)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None

    def backward(ctx, grad_out):
        input, weight, out = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], ctx.has_bias and needs[2], ctx.has_residual and needs[3]]
        if not any(mask):
            return (None,) * 9
        stride, padding, dilation, groups = ctx.conv_args
        gi, gw, gb, gr = call_backward(backward_op, grad_out.contiguous(memory_format=memory_format_of(out)),
                                       input, weight, out, stride, padding, dilation, groups, ctx.relu, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                gr if mask[3] else None, None, None, None, None, None)

    _register_autograd_kernel(name, setup_context, backward)


def register_bn_eval_act(name: str, backward_name: str) -> None:
    """Fake kernels + autograd for one bn_eval_act flavour (``resfuse::<name>`` and its backward op); the autograd
    kernel only where csrc/bn_eval_act_autograd.cpp did not register the same formula. The running statistics
    are buffers: never differentiated, and an error when they require grad (as for F.batch_norm)."""
    backward_op = getattr(torch.ops.resfuse, backward_name).default

    @torch.library.register_fake(f"resfuse::{name}", lib=_lib)
    def _fake(input, weight, bias, residual, running_mean, running_var, eps, relu):
        return empty_activation(input)

    @torch.library.register_fake(f"resfuse::{backward_name}", lib=_lib)
    def _fake_backward(grad_out, input, weight, out, running_mean, running_var, eps, relu, output_mask):
        param_dtype = weight.dtype if weight is not None else torch.float32
        return grads_like(input, param_dtype, output_mask)

    def setup_context(ctx, inputs, output):
        input, weight, bias, residual, running_mean, running_var, eps, relu = inputs
        for stat_name, stat in (("running_mean", running_mean), ("running_var", running_var)):
            if stat.requires_grad:
                raise RuntimeError(f"resfuse::{name} is not differentiable with respect to {stat_name} (a "
                                   "BatchNorm buffer): it cannot require grad")
        ctx.save_for_backward(input, weight, output, running_mean, running_var)
        ctx.eps, ctx.relu = eps, relu
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None

    def backward(ctx, grad_out):
        input, weight, out, running_mean, running_var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2],
                ctx.has_residual and needs[3]]
        if not any(mask):
            return (None,) * 8
        gi, gw, gb, gr = call_backward(backward_op, grad_out.contiguous(memory_format=memory_format_of(out)),
                                       input, weight, out, running_mean, running_var, ctx.eps, ctx.relu, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                gr if mask[3] else None, None, None, None, None)

    _register_autograd_kernel(name, setup_context, backward)
