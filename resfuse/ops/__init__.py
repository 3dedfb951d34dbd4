"""The fused ops' functional API; each call picks its backend (see ``backend.py``)."""
from .autoselect import auto_choices, clear_auto_choices
from .backend import BACKENDS, available_backends, resolve_backend
from .bn_act import bn_act
from .bn_eval_act import bn_eval_act
from .bn_scale_act import bn_scale_act
from .bn_squeeze import bn_squeeze
from .block_tail import block_tail, drop_path_mask
from .conv_bn_act import conv_bn_act
from .fold_bn import fold_bn

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "bn_act", "conv_bn_act", "auto_choices",
           "clear_auto_choices", "bn_eval_act", "fold_bn",
           "bn_squeeze", "bn_scale_act", "block_tail", "drop_path_mask"]
