"""Drop-in modules and model conversion."""
from .blocks import BasicBlock, Bottleneck
from .conv_bn_relu import ConvBNReLU
from .convert import ConversionWarning, convert, revert

__all__ = ["BasicBlock", "Bottleneck", "ConvBNReLU", "ConversionWarning", "convert", "revert"]
