"""The extension and its C++ runtime: a bad argument is a RuntimeError in every build, never a crash.

Every argument check of csrc/common.h formats its message through std::ostringstream. torch's wheels export
copies of parts of libstdc++ (that stream's constructor, std::string internals, exception_ptr's reference
counting) without a symbol version; an extension linked after torch's libraries binds to those copies, so one
message is built by two libstdc++ builds at once. A g++ 13 build on a GPU image (torch 2.11) segfaulted in
libstdc++ while formatting such a message; off that image the crash did not reproduce, and this mixing is the
mechanism found, so setup.py now links libstdc++ first. Both tests run in a fresh interpreter, so a crash fails
the test instead of ending the pytest process.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("resfuse._C") is None:
    pytest.skip("the resfuse._C extension is not built (RESFUSE_SKIP_CSRC=1?)", allow_module_level=True)

# One bad call per check of csrc/common.h that formats a value (an int64, a shape, a dtype): each prints the
# first line of its message, or the exception's name if it is not a RuntimeError.
_BAD_CALLS = r"""
import torch
import resfuse._C

ops = torch.ops.resfuse
x = torch.randn(2, 3, 4, 5)
w = torch.randn(6, 3, 3, 3)
conv = [[1, 1], [1, 1], [1, 1], 1]
calls = [
    lambda: ops.bn_act(x[0], None, None, None, None, None, 0.1, 1e-5, True),
    lambda: ops.bn_act(x.to(torch.int32), None, None, None, None, None, 0.1, 1e-5, True),
    lambda: ops.bn_act(x, torch.randn(4), None, None, None, None, 0.1, 1e-5, True),
    lambda: ops.bn_act(x, None, None, torch.randn(2, 3, 4, 4), None, None, 0.1, 1e-5, True),
    lambda: ops.bn_act(x, None, None, x.double(), None, None, 0.1, 1e-5, True),
    lambda: ops.bn_act(x[:1, :, :1, :1], None, None, None, None, torch.ones(3), 0.1, 1e-5, True),
    lambda: ops.conv_bn_act(x, w[0], None, None, *conv, True),
    lambda: ops.conv_bn_act(x, w, None, None, [1, 1], [1, 1], [1, 1], 0, True),
]
for call in calls:
    try:
        call()
        print("no error")
    except RuntimeError as e:
        print(str(e).splitlines()[0])
    except Exception as e:
        print(type(e).__name__)
"""

_EXPECTED = [
    "expected input to be a 4-D (N, C, H, W) tensor, but got a 3-D tensor of shape [3, 4, 5]",
    "input must be float16, bfloat16, float32 or float64, but got Int",
    "expected weight of shape [3] (one value per channel), but got shape [4]",
    "residual must have the same shape as input [2, 3, 4, 5], but got [2, 3, 4, 4]",
    "residual must have the same dtype as input (Float), but got Double",
    "expected more than 1 value per channel",
    "expected weight to be a 4-D (C_out, C_in/groups, kH, kW) tensor, but got shape [3, 3, 3]",
    "groups must be positive, but got 0",
]


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_bad_arguments_raise_runtime_errors_without_crashing():
    result = _run(_BAD_CALLS)
    assert result.returncode == 0, f"the process died (exit code {result.returncode}):\n{result.stderr[-3000:]}"
    lines = result.stdout.splitlines()
    assert len(lines) == len(_EXPECTED), lines
    for line, expected in zip(lines, _EXPECTED):
        assert expected in line, (line, expected)


# What a binding line of glibc's LD_DEBUG=bindings says: the object whose reference is bound, the object that
# defines the symbol, the symbol.
_BINDING = re.compile(r"binding file (?P<user>\S+) \[\d+\] to (?P<definer>\S+) \[\d+\]: \w+ symbol `(?P<sym>[^']+)'")
# Symbols of the C++ runtime: namespace std (functions, vtables, typeinfos), but not std templates instantiated
# over torch's own types (std::vector<c10::IValue>), which torch's libraries legitimately define.
_STD_SYMBOL = re.compile(r"^_Z(?:T[VIS])?N?K?St|^_ZSt")
_TORCH_TYPE = re.compile(r"3c10|2at|5torch|6caffe2")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="reads the bindings glibc's dynamic linker reports with LD_DEBUG")
def test_extension_binds_the_cxx_runtime_to_libstdcxx(tmp_path: Path):
    """Every libstdc++ symbol the extension uses resolves to libstdc++.so.6, none to a copy in torch's libraries.
    LD_BIND_NOW binds every reference at load time, called or not."""
    out = tmp_path / "ld"
    result = _run("import torch, resfuse._C", {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(out), "LD_BIND_NOW": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    to_libstdcxx, to_torch = 0, []
    for log in tmp_path.glob("ld.*"):
        with open(log, errors="replace") as f:
            for line in f:
                m = _BINDING.search(line)
                if m is None or not os.path.basename(m["user"]).startswith("_C.") or not _STD_SYMBOL.match(m["sym"]):
                    continue
                definer = os.path.basename(m["definer"])
                if definer.startswith("libstdc++"):
                    to_libstdcxx += 1
                elif definer.startswith(("libc10", "libtorch")) and not _TORCH_TYPE.search(m["sym"]):
                    to_torch.append(f"{m['sym']} -> {definer}")
        log.unlink()  # tens of MB: torch's own libraries are bound too
    assert to_libstdcxx > 0, "no binding of resfuse._C to libstdc++ was reported: LD_DEBUG did not work here"
    assert not to_torch, "C++ runtime symbols of resfuse._C bound to torch's copies:\n" + "\n".join(to_torch)
