"""Drop-in modules and model conversion."""
from .blocks import BasicBlock, Bottleneck
from .conv_bn_relu import ConvBNReLU
from .convert import convert, revert
from .fold import clear_fold_cache

__all__ = ["BasicBlock", "Bottleneck", "ConvBNReLU", "convert", "revert", "clear_fold_cache"]
