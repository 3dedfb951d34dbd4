"""``python -m resfuse.bench.gpu_check``, without a GPU: the dry run resolves every step (CI runs it too), a real
run on this machine keeps going past its failing steps and packs OUT_DIR within the limits, commands are cut at
their limit with SIGINT first, and the summary's numbers (test counts, key ratios, the profile) are right."""
import json
import os
import signal
import sys
import tarfile

import pytest

from resfuse.bench import cases, gpu_check, profile
from resfuse.bench import gpu_check_report as report


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    rc = gpu_check.main([str(out), "--dry-run"])
    return rc, json.loads((out / "plan.json").read_text()), (out / "plan.md").read_text(), out


def test_dry_run_resolves_every_step(dry_run):
    rc, plan, text, out = dry_run
    assert rc == 0, text
    assert sorted(os.listdir(out)) == ["plan.json", "plan.md"]  # nothing built, nothing else written
    assert [s["name"] for s in plan["steps"]] == ["build", "probe", "tests", "blocks", "models", "profile"]
    checks = {c["check"]: c for c in plan["checks"]}
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    kernels = checks["tests/kernels: selection"]["detail"]
    assert all(f in kernels for f in gpu_check.KERNEL_TEST_FILES)
    assert not any(f in checks["tests/rest: selection"]["detail"] for f in gpu_check.KERNEL_TEST_FILES)
    blocks = checks["blocks: plan"]["detail"]
    assert blocks.startswith("8 problems") and all(p in blocks for p in cases.PROVIDERS)
    assert "model:timm:resnet50d train" in checks["models: plan"]["detail"]
    assert "model:timm:seresnet50 train" in checks["models: plan"]["detail"]
    assert "resfuse_compile_cudagraphs" in checks["profile: arguments"]["detail"]
    assert checks["probe: runs here"]["detail"].startswith("torch ")
    # the kernels' files run before the rest, and the build before everything
    tests = next(s for s in plan["steps"] if s["name"] == "tests")
    assert [c["name"] for c in tests["commands"]] == ["kernels", "rest"]
    assert "## Checks" in text and "FAILED" not in text


def test_dry_run_fails_on_a_step_that_does_not_resolve(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MODELS", ("resnet18", "timm:no_such_model"))
    monkeypatch.setattr(gpu_check, "KERNEL_TEST_FILES", ("tests/test_no_such_file.py",))
    assert gpu_check.main([str(tmp_path), "--dry-run", "--steps", "tests,models"]) == 1
    checks = {c["check"]: c for c in json.loads((tmp_path / "plan.json").read_text())["checks"]}
    assert not checks["models: plan"]["ok"] and "no_such_model" in checks["models: plan"]["detail"]
    assert not checks["tests/kernels: selection"]["ok"]


def test_quick_plan_and_cutlass_wheels(tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_check.CUTLASS_WHEELS_ENV, raising=False)
    steps = gpu_check.plan("quick", str(tmp_path), None, 4, True)
    assert [s.name for s in steps] == ["build", "probe", "tests", "blocks"]
    assert [c.name for c in steps[0].commands] == ["clean", "pip"]
    assert "C64_H56,C256_H14" in steps[3].commands[0].argv
    assert {"-n", "4", f"--timeout={gpu_check.TEST_TIMEOUT_S}"} <= set(steps[2].commands[0].argv)
    # the probe runs whatever the steps: every summary says what it measured with
    assert [s.name for s in gpu_check.plan("full", str(tmp_path), None, 1, False, ["tests"])] == ["probe", "tests"]
    monkeypatch.setenv(gpu_check.CUTLASS_WHEELS_ENV, str(tmp_path))
    steps = gpu_check.plan("full", str(tmp_path), gpu_check.cutlass_wheel_dir(None), 1, False)
    cutlass = steps[0].commands[1]
    assert cutlass.name == "cutlass" and str(tmp_path) in cutlass.argv and "--no-index" in cutlass.argv
    with pytest.raises(ValueError, match="unknown step"):
        gpu_check.plan("quick", str(tmp_path), None, 1, False, ["models"])


def test_time_left_goes_to_the_later_steps():
    t = [0.0]
    clock = gpu_check.Clock(100, reserve_s=10, now=lambda: t[0])
    assert clock.left() == 90
    assert clock.share(clock.left(), 0.2, 0.5) == pytest.approx(36)
    t[0] = 20.0  # the first step took 20 s of its 36: the next ones share 70 s
    assert clock.share(clock.left(), 0.1, 0.3) == pytest.approx(70 / 3)
    t[0] = 200.0
    assert clock.left() == 0


def test_command_at_its_limit_gets_sigint_then_sigkill(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1.0)
    marker = tmp_path / "interrupted"
    # handles SIGINT as pytest does: writes what it finished, then exits
    polite = gpu_check.Command("polite", [sys.executable, "-c", (
        "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
        f"    open({str(marker)!r}, 'w').write('kept')\n    raise SystemExit(2)")])
    gpu_check.run_command(polite, 3.0, str(tmp_path / "polite.log"), str(tmp_path))
    assert polite.timed_out and polite.rc == 2 and marker.read_text() == "kept" and polite.seconds < 10
    deaf = gpu_check.Command("deaf", [sys.executable, "-c", (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)")])
    gpu_check.run_command(deaf, 3.0, str(tmp_path / "deaf.log"), str(tmp_path))
    assert deaf.timed_out and deaf.rc == -signal.SIGKILL and deaf.seconds < 10
    quick = gpu_check.Command("quick", [sys.executable, "-c", "print('hello')"])
    gpu_check.run_command(quick, 30.0, str(tmp_path / "quick.log"), str(tmp_path))
    assert quick.rc == 0 and not quick.timed_out and "hello" in (tmp_path / "quick.log").read_text()


def test_run_without_a_gpu_goes_on_past_failures_and_packs_out_dir(tmp_path):
    """Here the benches and the profile fail at once (no GPU): each step is recorded as failed, the next one
    still runs, and OUT_DIR holds the summary, its data and the tarball with every log."""
    rc = gpu_check.main([str(tmp_path), "--steps", "blocks,profile", "--budget", "300"])
    assert rc == 1
    files = sorted(os.listdir(tmp_path))
    assert files == sorted([report.SUMMARY, report.DATA, report.TARBALL])
    data = json.loads((tmp_path / report.DATA).read_text())
    assert [(s["name"], s["status"]) for s in data["steps"]] == \
        [("probe", "ok"), ("blocks", "failed (exit 2)"), ("profile", "failed (exit 1)")]
    assert data["results"]["environment"]["torch"] and data["results"]["environment"]["gpu"] is None
    with tarfile.open(tmp_path / report.TARBALL) as tar:
        names = tar.getnames()
    assert f"{gpu_check.WORK_DIR}/blocks-bench.log" in names and f"{gpu_check.WORK_DIR}/profile.txt" in names
    summary = (tmp_path / report.SUMMARY).read_text()
    assert "No result file: the blocks bench did not run" in summary and "failed (exit 2)" in summary
    assert "blocks/bench: last lines" in summary and "no CUDA GPU is visible" in summary  # why, from its log


def test_pack_keeps_out_dir_within_what_can_be_brought_back(tmp_path):
    work = tmp_path / gpu_check.WORK_DIR
    (work / "sub").mkdir(parents=True)
    for i in range(12):
        (work / "sub" / f"log{i}.txt").write_text("line\n" * 1000)
    (work / "huge.bin").write_bytes(os.urandom(report.MAX_BYTES + 1024))  # incompressible
    for tag in (report.BLOCKS_TAG, report.MODELS_TAG):
        stem = work / f"h200-20261201-{tag}"
        (work / f"{stem.name}.json").write_text("{}")
        (work / f"{stem.name}.md").write_text("# report")
        (work / f"{stem.name}-speedup.png").write_bytes(b"png")
        (work / f"{stem.name}-roofline.png").write_bytes(b"png")
    files = report.pack(str(tmp_path), str(work), gpu_check.WORK_DIR)
    assert files["left_out"] == ["huge.bin"]
    assert os.path.getsize(tmp_path / report.TARBALL) <= report.MAX_BYTES
    assert len(files["top"]) <= report.MAX_FILES and files["top"][-1] == report.TARBALL
    assert "h200-20261201-gpucheck-blocks-speedup.png" in files["top"] and not work.exists()
    on_disk = set(os.listdir(tmp_path))
    assert on_disk == set(files["top"]) - {report.SUMMARY, report.DATA}  # the summary is written after
    with tarfile.open(tmp_path / report.TARBALL) as tar:
        names = tar.getnames()
    assert f"{gpu_check.WORK_DIR}/sub/log11.txt" in names and f"{gpu_check.WORK_DIR}/huge.bin" not in names
    assert f"{gpu_check.WORK_DIR}/h200-20261201-gpucheck-models-roofline.png" in names


def _record(mode, stage, provider, ms, bench="basicblock"):
    return {"bench": bench, "mode": mode, "stage": stage, "N": 128, "dtype": "bf16", "layout": "channels_last",
            "provider": provider, "median_ms": ms}


def test_key_ratios_are_baseline_over_resfuse():
    records = [_record("eval", "C64_H56", "eager", 4.0), _record("eval", "C64_H56", "cudnn_fused", 1.0),
               _record("eval", "C64_H56", "compile_freezing", 1.5), _record("eval", "C64_H56", "resfuse_auto", 0.5),
               _record("train", "C64_H56", "eager", 3.0), _record("train", "C64_H56", "compile", 1.5),
               _record("train", "C64_H56", "resfuse_cuda", 1.0),
               _record("train", "C128_H28", "resfuse_cuda", 2.0)]  # no baseline timed beside it
    tables = report.key_ratios(records)
    (auto,) = tables[("basicblock", "eval")]
    assert auto["provider"] == "resfuse_auto"
    assert auto["ratios"] == {"cudnn_fused": 2.0, "compile_freezing": 3.0, "compile_cudagraphs": None}
    first, second = tables[("basicblock", "train")]
    assert first["ratios"] == {"eager": 3.0, "compile": 1.5, "compile_cudagraphs": None}
    assert second["ratios"] == {"eager": None, "compile": None, "compile_cudagraphs": None}
    text = "\n".join(report._bench_lines({"file": "x.json", "meta": {"complete": False, "wall_s": 9},
                                          "records": records, "failed": [], "skipped": 0}, "blocks"))
    assert "| C64_H56 | resfuse_auto | 0.5000 | 2.00x | 3.00x | - |" in text and "cut at its time limit" in text


def test_test_counts_from_junit_and_log(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                     '<testcase classname="tests.test_a" name="test_ok"/>'
                     '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
                     '<testcase classname="tests.test_b" name="test_ok2"/></testsuite></testsuites>')
    counts = report.junit_counts(str(junit))
    assert (counts["passed"], counts["failures"], counts["errors"], counts["skipped"]) == (2, 1, 1, 1)
    assert counts["failing"] == ["tests.test_a::test_bad", "tests.test_b::test_err"]
    assert report.junit_counts(str(tmp_path / "missing.xml")) is None
    log = tmp_path / "x.log"
    log.write_text("created: 8/8 workers\n8 workers [935 items]\n....\n")
    assert report.selected_count(str(log)) == 935
    log.write_text("collected 1200 items / 153 deselected / 1047 selected\n")
    assert report.selected_count(str(log)) == 1047


def test_profile_lines_read_back(tmp_path):
    where = profile.label("basicblock", "train", "C256_H14", 128, "bf16", "resfuse_compile")
    text = ["", profile.summary_line(where, 0.561, 53, 2.2), "   12.0 us  x2  some_kernel",
            profile.label("basicblock", "train", "C64_H56", 128, "bf16", "compile_cudagraphs") + ": skipped (why)"]
    (tmp_path / report.PROFILE).write_text("\n".join(text))
    rows = report.profile_rows(str(tmp_path / report.PROFILE))
    assert rows == [{"stage": "C256_H14", "provider": "resfuse_compile", "kernels_ms": 0.561, "launches": 53,
                     "wall_ms": 2.2},
                    {"stage": "C64_H56", "provider": "compile_cudagraphs", "note": "skipped (why)"}]
    assert "| C256_H14 | resfuse_compile | 0.561 | 53 | 2.200 | 3.92 |" in "\n".join(report._profile_lines(rows))


def test_summary_says_when_the_sm90_conv_was_left_out():
    env = {"gpu": "NVIDIA H200", "with_cuda": True, "with_cutlass": False, "sm90_build_reason": "no CUTLASS",
           "extension_error": None}
    text = "\n".join(report._environment_lines(env, {"cutlass_wheels": None}))
    assert "left out the sm90 conv" in text and "--cutlass-wheels" in text
    env["with_cutlass"] = True
    assert "sm90 conv is built in" in "\n".join(report._environment_lines(env, {"cutlass_wheels": "/w"}))
