"""Triton launches on the current CUDA device, whatever device the tensors live on: every public launcher runs
with the current device set to its first tensor's, as ATen's CUDA kernels do with a device guard."""
import functools

import torch


def on_tensor_device(launcher):
    """Wrap ``launcher(tensor, ...)`` so that it runs with ``tensor``'s CUDA device current."""

    @functools.wraps(launcher)
    def guarded(t, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)

    return guarded
