"""Small shared test utilities: error metrics, backends at hand, seeded random inputs."""
from __future__ import annotations

import torch

import resfuse
from resfuse.ops.backend import unavailable_reason

ALL_BACKENDS = ("cuda", "triton", "reference")


def backends_on(device: str) -> list[str]:
    """Every backend that can run on ``device`` here (triton on CPU means the interpreter)."""
    return [b for b in ALL_BACKENDS if unavailable_reason(b, torch.device(device)) is None]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, memory_format=torch.contiguous_format):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that anything a kernel forgets to write shows up."""
    with torch.no_grad():
        return t.fill_(float("nan"))


def randomize_bn_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN affine and running statistics, so folds and updates are actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return module


__all__ = ["resfuse", "ALL_BACKENDS", "backends_on", "devices", "rel_err", "randn", "poison_", "randomize_bn_"]


def skip_triton_bf16_under_interpreter(backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Triton's interpreter (triton 3.8) gets bf16 wrong where the GPU does not: tl.dot on bf16 operands, and
    fp32 -> bf16 stores, which it truncates instead of rounding to nearest (twice the rounding error). Such
    cases of the Triton backend are GPU-only."""
    import pytest

    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton's interpreter truncates bf16 stores and computes bf16 tl.dot wrongly; covered by the "
                    "GPU tests")
