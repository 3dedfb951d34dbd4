"""``torch.jit.script`` on resfuse's fused modules: an error that says what to do, instead of the compiler's.

TorchScript compiles a module's forward from its source; a fused module's forward picks its kernels in Python
(routing.py), which TorchScript cannot compile. Before compiling, ``torch.jit.script`` calls each module's
``__prepare_scriptable__``, and that is where this error is raised, before anything is compiled or changed.
No eager stand-in is returned from that hook: torch writes what it returns into the parent's ``_modules`` in
place (torch/jit/_script.py, ``call_prepare_scriptable_func_impl``), so scripting would leave the user's own
model unfused, silently.
"""
from __future__ import annotations

from typing import NoReturn

from torch import nn


def refuse_scripting(module: nn.Module, revertible: bool = True) -> NoReturn:
    """Raise the error for ``torch.jit.script(module)``; ``revertible``: ``resfuse.revert()`` gives the module
    its eager class back (converted blocks and ResNets, not ConvBNReLU)."""
    unfused = (" Or script an unfused copy: torch.jit.script(resfuse.revert(copy.deepcopy(model)))."
               if revertible else "")
    raise RuntimeError(
        f"resfuse: torch.jit.script cannot compile resfuse's {type(module).__name__}: its forward picks the fused "
        f"kernels in Python. torch.jit.trace(model, example_input) records the fused ops instead (the traced "
        f"module runs where resfuse is imported).{unfused}")
