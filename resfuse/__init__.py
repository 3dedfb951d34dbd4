"""resfuse: fused kernels for the building blocks of residual networks.

    import resfuse
    model = resfuse.convert(torchvision.models.resnet50())   # same weights, same numbers, fused blocks
"""
from . import ops, reference
from .nn import BasicBlock, Bottleneck, ConversionWarning, ConvBNReLU, convert, revert
from .ops import auto_choices, available_backends, clear_auto_choices

__version__ = "0.1.0"

__all__ = ["BasicBlock", "Bottleneck", "ConvBNReLU", "ConversionWarning", "convert", "revert", "ops", "reference",
           "available_backends", "auto_choices", "clear_auto_choices", "__version__"]
