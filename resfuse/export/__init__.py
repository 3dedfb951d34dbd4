"""Serving a converted model: what torch's export routes need to know about resfuse's ops.

- ``onnx_translations()``: the ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``; the
  ONNX model holds standard ops only (resfuse/export/onnx.py).
- ``decompose(ep)``: an exported program with resfuse's ops written as ATen ops, which needs only torch:
  AOTInductor packages it self-contained (resfuse/export/decompose.py).
"""
from __future__ import annotations

from .decompose import decompose, decomposition_table


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` (resfuse/export/onnx.py).
    Imports onnxscript, which only this needs."""
    from .onnx import onnx_translations as table

    return table()


__all__ = ["decompose", "decomposition_table", "onnx_translations"]
