"""Whether the Triton kernels run under Triton's interpreter (on CPU tensors), read once.

triton reads ``TRITON_INTERPRET`` when it decorates a kernel, i.e. when this package is imported; every
launcher and ``resfuse.ops.backend`` ask this one value, so none of them can disagree with the kernels.
"""
import os

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
