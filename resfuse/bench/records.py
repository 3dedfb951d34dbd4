"""Helpers shared by the command's table and the markdown report: which records compare, speedups, formats."""
from __future__ import annotations

PROVIDER_ORDER = ("eager", "compile", "compile_freezing", "cudnn_fused", "resfuse_cuda", "resfuse_triton",
                  "resfuse_auto", "resfuse_compile", "compile_cudagraphs", "resfuse_compile_cudagraphs")


def comparison_key(r: dict) -> tuple:
    """Records with the same key were timed against each other (same problem, same run)."""
    return (r["bench"], r["mode"], r["stage"], r["N"], r["dtype"], r["layout"])


def speedups(records: list[dict]) -> dict:
    """id(record) -> eager's median / the record's median, within its comparison (None without eager)."""
    eager = {comparison_key(r): r["median_ms"] for r in records if r["provider"] == "eager"}
    out = {}
    for r in records:
        base = eager.get(comparison_key(r))
        out[id(r)] = base / r["median_ms"] if base and r["median_ms"] else None
    return out


def fmt_ms(ms: float) -> str:
    return f"{ms:.4f}" if ms < 1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def fmt_mib(mib) -> str:
    """Peak memory of a row in MiB; '-' where none was measured (CPU runs, files written before it was)."""
    return "-" if mib is None else f"{mib:.0f}" if mib >= 10 else f"{mib:.2g}"


def achieved(record: dict) -> str:
    """GB/s for memory-bound rows, TFLOP/s for compute-bound ones (the roofline's binding ceiling)."""
    if record.get("bound") == "memory":
        return f"{record['gbps']:.3g} GB/s"
    return f"{record['tflops']:.3g} TFLOP/s"


def group_of(record: dict) -> str:
    """The section a record belongs to: its bench, with every whole model in one ``models`` section."""
    return "models" if record["bench"].startswith("model:") else record["bench"]


def row_label(record: dict) -> str:
    if record["bench"].startswith("model:"):
        return f"{record['bench'][len('model:'):]} {record['stage']}"
    return record["stage"]


def provider_label(record: dict) -> str:
    """The provider, with the backend that ``resfuse_auto`` resolved to."""
    if record["provider"] == "resfuse_auto" and record.get("backend"):
        return f"resfuse_auto ({record['backend']})"
    return record["provider"]
