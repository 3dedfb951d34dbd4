"""``python -m resfuse.bench.gpu_check OUT_DIR``: verify and measure a GPU machine with one command, in 8 minutes.

A GPU machine is lent rarely and for minutes, so this command does everything there is to do on one, with no
thinking on the clock. On a fresh machine (torch, triton, nvcc, ninja, pybind11, pytest, pytest-xdist, timm
installed; nothing can be downloaded), from the repository root, it runs in order, each step in subprocesses
with a time limit, logging to OUT_DIR and going on past failures:

1. ``build``: the extension for the GPU present (``pip install --no-build-isolation -e .``; setup.py picks the
   GPU's architecture). The ``nvidia-cutlass`` wheel, from the folder ``--cutlass-wheels DIR`` or
   ``RESFUSE_CUTLASS_WHEELS`` names, is installed first; without it the build leaves out the Hopper (sm90)
   convolution, and the summary says so.
2. ``tests``: every test that runs on the GPU (``pytest -m "cuda or triton"`` with xdist; on a GPU the
   triton-marked files run their kernels there), the kernels' correctness files first, then the rest.
3. ``blocks``: ``python -m resfuse.bench`` on the identity BasicBlock of each stage, eval and train, every
   provider (``--quick``: two stages).
4. ``models``: resnet18, resnet50, timm's seresnet50 and resnet50d whole, B=256, eval and train.
5. ``profile``: ``python -m resfuse.bench.profile``, the training step at C64_H56 and C256_H14.

``--quick`` runs the first three within 4 minutes. Time: the run has a budget (8 minutes, 4 with ``--quick``)
and each step gets a share of what is left when it starts, so a fast step leaves its time to the next. A
command at its limit gets SIGINT (pytest and the bench keep what they finished), then SIGKILL.

OUT_DIR ends with at most 8 files of at most 16 MiB each (what can be brought back from a lent machine):
``summary.md`` (test counts, key ratios, what ran and what did not), ``gpu_check.json``, the benches' result
files (JSON, markdown, the blocks' speedup plot) and ``gpu_check.tar.gz`` holding everything (logs, JUnit XML,
every result file and plot, the profile). ``--dry-run`` resolves every step (commands, paths, the test
selection, the bench plan) and writes it to OUT_DIR without building or timing anything: CI runs it on CPU.

The build starts by deleting the extension's shared object, so that a failed build leaves none behind (the
tests then fail loudly instead of testing a stale one), and the new one is a new file: this process, which
imported resfuse on its way to this module, keeps its mapping of the old one intact.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import gpu_check_report as report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK_DIR = "gpu_check_work"  # inside OUT_DIR while the steps run; packed into the tarball at the end

# Seconds for the whole run, and each step's share of what is left when it starts. The build comes first and
# everything depends on it (~1-2 min expected with 16 cores, not yet measured); the models bench compiles whole
# ResNets (15-55 s each on an H100, r5) and is cut at its limit, keeping the problems it finished.
BUDGET_S = {"full": 480, "quick": 240}
SHARES = {
    "full": {"build": 0.25, "tests": 0.2, "blocks": 0.22, "models": 0.26, "profile": 0.07},
    "quick": {"build": 0.5, "tests": 0.25, "blocks": 0.25},
}
PROBE_S = 60  # the probe's own limit, outside the shares: it takes seconds (importing torch and resfuse)
RESERVE_S = 20  # the summary and the tarball, after the last step
GRACE_S = 10  # from SIGINT to SIGKILL (a quarter of the limit for shorter commands)

# On a GPU the triton-marked files run their kernels on it (DEV is cuda there), as the cuda-marked tests do.
GPU_MARKERS = "cuda or triton"
KERNEL_TEST_FILES = ("tests/test_csrc.py", "tests/test_conv_bn_act.py", "tests/test_triton_kernels.py",
                     "tests/test_triton_conv.py")
TEST_TIMEOUT_S = 120  # per test (pytest-timeout, where installed): a hung test costs this, not the step
BLOCK_STAGES = {"full": None, "quick": "C64_H56,C256_H14"}  # None: every stage of the GPU preset
BLOCK_REPEATS = 100
MODELS = ("resnet18", "resnet50", "timm:seresnet50", "timm:resnet50d")  # the cheapest to compile first: a cut
# keeps more; timm's seresnet50 is resnet50 with an SE gate per block: the pair shows what the fused SE tail adds
# the baselines of the key ratios and resfuse's ways of running a model; Triton's conv and the CUDA-graph
# providers are left to the blocks (compiling whole models twice more does not fit the budget)
MODEL_PROVIDERS = ("eager", "compile", "compile_freezing", "cudnn_fused", "resfuse_cuda", "resfuse_auto",
                   "resfuse_compile")
MODEL_BATCH = 256
MODEL_REPEATS = 20
PROFILE_STAGES = ("C64_H56", "C256_H14")
PROFILE_PROVIDERS = ("eager", "compile", "resfuse_cuda", "resfuse_triton", "resfuse_compile",
                     "resfuse_compile_cudagraphs")
CUTLASS_WHEELS_ENV = "RESFUSE_CUTLASS_WHEELS"


@dataclass
class Command:
    """One subprocess of a step; ``weight``: its part of the step's time against the commands after it."""

    name: str
    argv: list
    weight: float = 1.0
    env: dict = field(default_factory=dict)
    stdout: Optional[str] = None  # a file of WORK for stdout (the profile's report); stderr goes to the log
    # filled in by the run
    rc: Optional[int] = None
    seconds: Optional[float] = None
    limit_s: Optional[float] = None
    timed_out: bool = False
    log: Optional[str] = None


@dataclass
class Step:
    name: str
    what: str
    commands: list
    share: float  # of the time left when it starts, against the shares of the steps after it
    fixed_s: Optional[float] = None  # instead of a share: this limit (within the time left)
    status: str = "not run"  # ok, failed, timed out, no time left, not run
    seconds: Optional[float] = None
    limit_s: Optional[float] = None


# ---------------------------------------------------------------------------------------------------------
# the plan


def cutlass_wheel_dir(flag: Optional[str]) -> Optional[str]:
    return flag or os.environ.get(CUTLASS_WHEELS_ENV) or None


def _pytest(files: list, junit: str, workers: int, timeout: bool) -> list:
    argv = [sys.executable, "-m", "pytest", "-m", GPU_MARKERS, "-q", "-rfE", "-p", "no:cacheprovider",
            f"--junitxml={junit}"]
    if workers > 1:
        argv += ["-n", str(workers)]
    if timeout:
        argv += [f"--timeout={TEST_TIMEOUT_S}"]
    return argv + files


def plan(mode: str, work: str, cutlass_dir: Optional[str], workers: int, has_timeout: bool,
         steps: Optional[list] = None) -> list:
    """The steps of a run, with their commands (nothing is run)."""
    py = sys.executable
    shares = SHARES[mode]
    out: list = []
    build = [Command("clean", ["sh", "-c", "rm -f resfuse/_C*.so"], weight=0.05)]
    if cutlass_dir:
        build.append(Command("cutlass", [py, "-m", "pip", "install", "--no-deps", "--no-index", "--find-links",
                                         cutlass_dir, "nvidia-cutlass"], weight=0.1))
    build.append(Command("pip", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                                 "-e", "."], env={"MAX_JOBS": str(os.cpu_count() or 1)}))
    out.append(Step("build", "the extension for the GPU present", build, shares["build"]))
    # always run (also when the build is not), so that every summary says what it measured with
    out.append(Step("probe", "the GPU, versions and what the extension was built with", [
        Command("probe", [py, "-c", "from resfuse.bench.gpu_check_report import probe; "
                                    f"probe({os.path.join(work, report.ENVIRONMENT)!r})"])], 0.0, fixed_s=PROBE_S))

    kernels = list(KERNEL_TEST_FILES)
    rest = ["tests"] + [f"--ignore={f}" for f in kernels]
    out.append(Step("tests", f"every test that runs on the GPU (-m '{GPU_MARKERS}'), the kernels' files first", [
        Command("kernels", _pytest(kernels, os.path.join(work, "tests-kernels.xml"), workers, has_timeout)),
        Command("rest", _pytest(rest, os.path.join(work, "tests-rest.xml"), workers, has_timeout)),
    ], shares["tests"]))

    blocks = [py, "-m", "resfuse.bench", "--device", "cuda", "--bench", "basicblock", "--mode", "both",
              "--dtype", "bf16", "--batch", "128", "--repeats", str(BLOCK_REPEATS), "--out", work,
              "--tag", report.BLOCKS_TAG]
    if BLOCK_STAGES[mode]:
        blocks += ["--stages", BLOCK_STAGES[mode]]
    out.append(Step("blocks", "identity BasicBlocks, eval + train, every provider", [Command("bench", blocks)],
                    shares["blocks"]))
    if mode == "full":
        models = [py, "-m", "resfuse.bench", "--device", "cuda", "--bench", "models", "--models", ",".join(MODELS),
                  "--mode", "both", "--dtype", "bf16", "--model-batch", str(MODEL_BATCH), "--repeats",
                  str(MODEL_REPEATS), "--providers", ",".join(MODEL_PROVIDERS), "--out", work,
                  "--tag", report.MODELS_TAG]
        out.append(Step("models", f"{', '.join(MODELS)} whole, B={MODEL_BATCH}, eval + train",
                        [Command("bench", models)], shares["models"]))
        profile = [py, "-m", "resfuse.bench.profile", "--bench", "basicblock", "--mode", "train",
                   "--stages", ",".join(PROFILE_STAGES), "--providers", ",".join(PROFILE_PROVIDERS)]
        out.append(Step("profile", f"kernels of a training step at {' and '.join(PROFILE_STAGES)}",
                        [Command("profile", profile, stdout=report.PROFILE)], shares["profile"]))
    if steps:
        unknown = set(steps) - {s.name for s in out}
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(sorted(unknown))} in {mode} mode: "
                             f"{', '.join(s.name for s in out)}")
        out = [s for s in out if s.name in steps or s.name == "probe"]
    return out


# ---------------------------------------------------------------------------------------------------------
# running


class Clock:
    """The run's deadline, and each step's and command's share of the time left."""

    def __init__(self, budget_s: float, reserve_s: float = RESERVE_S, now=time.monotonic):
        self.now = now
        self.start = now()
        self.deadline = self.start + budget_s - reserve_s

    def elapsed(self) -> float:
        return self.now() - self.start

    def left(self) -> float:
        return max(0.0, self.deadline - self.now())

    @staticmethod
    def share(left: float, weight: float, weights_from_here: float) -> float:
        """The part of ``left`` for an item of ``weight`` when it and the items after it weigh
        ``weights_from_here``: what an earlier item did not use goes to the later ones."""
        return left * weight / weights_from_here if weights_from_here > 0 else 0.0


def run_command(cmd: Command, limit_s: float, log_path: str, work: str) -> None:
    """Run ``cmd`` from the repository root with its output in ``log_path``, for at most ``limit_s``: SIGINT
    ``GRACE_S`` before the limit (pytest writes its JUnit file, the bench its JSON), and SIGKILL to its process
    group at the limit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **cmd.env)
    cmd.log, cmd.limit_s = log_path, round(limit_s, 1)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd.argv)}\n(limit {limit_s:.0f} s)\n")
        log.flush()
        stdout = open(os.path.join(work, cmd.stdout), "w") if cmd.stdout else log
        try:
            proc = subprocess.Popen(cmd.argv, cwd=ROOT, env=env, stdout=stdout, stderr=log,
                                    start_new_session=True)
            grace = min(GRACE_S, limit_s / 4)
            try:
                cmd.rc = proc.wait(timeout=limit_s - grace)
            except subprocess.TimeoutExpired:
                cmd.timed_out = True
                proc.send_signal(signal.SIGINT)
                try:
                    cmd.rc = proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    cmd.rc = proc.wait()
        finally:
            if stdout is not log:
                stdout.close()
    cmd.seconds = round(time.monotonic() - start, 1)


def run_steps(steps: list, clock: Clock, work: str, echo=print) -> None:
    for i, step in enumerate(steps):
        if step.fixed_s is not None:
            step.limit_s = round(min(step.fixed_s, clock.left()), 1)
        else:
            step.limit_s = round(clock.share(clock.left(), step.share, sum(s.share for s in steps[i:])), 1)
        if step.limit_s < 5:
            step.status = "no time left"
            echo(f"[{clock.elapsed():5.0f}s] {step.name}: no time left")
            continue
        step_end = time.monotonic() + step.limit_s
        start = time.monotonic()
        statuses = []
        for j, cmd in enumerate(step.commands):
            left = max(0.0, step_end - time.monotonic())
            limit = clock.share(left, cmd.weight, sum(c.weight for c in step.commands[j:]))
            if limit < 2:
                statuses.append("no time left")
                continue
            echo(f"[{clock.elapsed():5.0f}s] {step.name}/{cmd.name}: {shlex.join(cmd.argv[1:])[:150]} "
                 f"(limit {limit:.0f} s)")
            run_command(cmd, limit, os.path.join(work, f"{step.name}-{cmd.name}.log"), work)
            status = "timed out" if cmd.timed_out else ("ok" if cmd.rc == 0 else f"failed (exit {cmd.rc})")
            statuses.append(status)
            echo(f"[{clock.elapsed():5.0f}s] {step.name}/{cmd.name}: {status} in {cmd.seconds:.0f} s")
        step.seconds = round(time.monotonic() - start, 1)
        step.status = next((s for s in statuses if s != "ok"), "ok") if statuses else "no time left"


# ---------------------------------------------------------------------------------------------------------
# the dry run


def resolve(steps: list, mode: str, cutlass_dir: Optional[str]) -> list:
    """Check that every step would run: paths, the test selection (collected now, as pytest would select it
    there), the benches' arguments and plans. Returns one entry per check: {check, ok, detail}."""
    checks = []

    def check(name: str, fn) -> None:
        errors = io.StringIO()  # argparse says why on stderr before it exits
        try:
            with contextlib.redirect_stderr(errors):
                checks.append({"check": name, "ok": True, "detail": fn()})
        except (Exception, SystemExit) as exc:
            said = errors.getvalue().strip().splitlines()
            checks.append({"check": name, "ok": False,
                           "detail": f"{type(exc).__name__}: {exc}" + (f" ({said[-1]})" if said else "")})

    def setup_py():
        if not os.path.isfile(os.path.join(ROOT, "setup.py")):
            raise FileNotFoundError(f"no setup.py in {ROOT}: run from a source checkout")
        return "setup.py found"

    def cutlass():
        if not cutlass_dir:
            return (f"no wheel folder given (--cutlass-wheels DIR or {CUTLASS_WHEELS_ENV}): the build leaves "
                    "the sm90 conv out unless nvidia-cutlass is installed already")
        wheels = [f for f in os.listdir(cutlass_dir) if f.startswith("nvidia_cutlass") and f.endswith(".whl")]
        if not wheels:
            raise FileNotFoundError(f"no nvidia_cutlass wheel in {cutlass_dir}")
        return ", ".join(sorted(wheels))

    by_name = {s.name: s for s in steps}
    if "build" in by_name:
        check("build: source tree", setup_py)
        check("build: CUTLASS wheel", cutlass)
    if "probe" in by_name:
        check("probe: runs here", _probe_here)
    if "tests" in by_name:
        for cmd in by_name["tests"].commands:
            check(f"tests/{cmd.name}: selection", lambda cmd=cmd: _collect(cmd.argv))
    for name in ("blocks", "models"):
        if name in by_name:
            check(f"{name}: plan", lambda name=name: _bench_plan(by_name[name].commands[0].argv))
    if "profile" in by_name:
        check("profile: arguments", lambda: _profile_args(by_name["profile"].commands[0].argv))
    return checks


def _probe_here() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, report.ENVIRONMENT)
        with contextlib.redirect_stdout(io.StringIO()):
            report.probe(path)
        with open(path) as f:
            env = json.load(f)
    return f"torch {env['torch']}, GPU {env['gpu']}, extension CUDA kernels {env.get('with_cuda')}"


def _collect(argv: list) -> str:
    """Collect what a pytest command selects (files, markers), here: ``<count> tests in <files>``."""
    keep = [a for a in argv[3:] if a not in ("-q", "-rfE") and not a.startswith(("--junitxml", "--timeout"))]
    if "-n" in keep:
        i = keep.index("-n")
        del keep[i:i + 2]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"] + keep, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    if out.returncode not in (0,) or not ids:
        raise RuntimeError(f"pytest --collect-only exited {out.returncode} with {len(ids)} tests:\n"
                           + (out.stdout + out.stderr)[-2000:])
    files: dict = {}
    for test_id in ids:
        files[test_id.split("::")[0]] = files.get(test_id.split("::")[0], 0) + 1
    return f"{len(ids)} tests: " + ", ".join(f"{f} {n}" for f, n in files.items())


def _bench_plan(argv: list) -> str:
    """The bench's arguments through its own parser (with the device as cpu: this machine has no GPU, and
    every size the run uses is named on the command line) and the problems it would time."""
    from . import cli

    args = argv[argv.index("resfuse.bench") + 1:]
    args[args.index("--device") + 1] = "cpu"
    parsed = cli.parse_args(args)
    items = cli.plan(parsed)
    if not items:
        raise ValueError("the bench would time nothing")
    names = [f"{_item_label(i)} {i.mode}" for i in items]
    return (f"{len(items)} problems x providers {', '.join(parsed.provider_names)}: " + ", ".join(names))


def _item_label(item) -> str:
    return f"model:{item.shape}" if item.bench == "model" else f"{item.bench} {item.shape.stage}"


def _profile_args(argv: list) -> str:
    from . import profile

    args = profile.parse_args(argv[argv.index("resfuse.bench.profile") + 1:])
    return f"{args.bench} {args.mode} at {args.stages}: {', '.join(args.provider_names)}"


# ---------------------------------------------------------------------------------------------------------
# the command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m resfuse.bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="steps: build, tests, blocks, models, profile (--quick: the first three)")
    p.add_argument("out", help="folder for the results (created; at most 8 files are left in it)")
    p.add_argument("--quick", action="store_true", help="build, tests and two stages of the blocks bench: 4 min")
    p.add_argument("--dry-run", action="store_true", help="resolve and write the plan; build and time nothing")
    p.add_argument("--cutlass-wheels", default=None,
                   help=f"folder holding the nvidia-cutlass wheel (default: ${CUTLASS_WHEELS_ENV})")
    p.add_argument("--steps", default=None, help="comma-separated steps to run (e.g. tests,blocks on a machine "
                   "where the build is done)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480, --quick 240)")
    p.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: min(8, CPUs / 2))")
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    args.budget = args.budget or BUDGET_S[args.mode]
    args.step_names = [s.strip() for s in (args.steps or "").split(",") if s.strip()] or None
    return args


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    work = os.path.join(out, WORK_DIR)
    os.makedirs(work, exist_ok=True)
    workers = args.workers or (min(8, (os.cpu_count() or 2) // 2) if _has_module("xdist") else 1)
    cutlass_dir = cutlass_wheel_dir(args.cutlass_wheels)
    steps = plan(args.mode, work, cutlass_dir, workers, _has_module("pytest_timeout"), args.step_names)
    run = {"mode": args.mode, "budget_s": args.budget, "argv": ["python", "-m", "resfuse.bench.gpu_check"]
           + list(sys.argv[1:] if argv is None else argv), "root": ROOT, "cutlass_wheels": cutlass_dir,
           "workers": workers, "dry_run": args.dry_run}
    if args.dry_run:
        checks = resolve(steps, args.mode, cutlass_dir)
        data = {"run": run, "steps": [asdict(s) for s in steps], "checks": checks}
        text = report.render_plan(data)
        with open(os.path.join(out, "plan.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(out, "plan.md"), "w") as f:
            f.write(text)
        if not os.listdir(work):
            os.rmdir(work)
        print(text)
        return 0 if all(c["ok"] for c in checks) else 1
    clock = Clock(args.budget)
    print(f"gpu_check: {args.mode}, {args.budget:.0f} s, steps {', '.join(s.name for s in steps)}; "
          f"logs in {work}", flush=True)

    def snapshot() -> dict:
        done = [asdict(s) for s in steps]
        return {"run": dict(run, elapsed_s=round(clock.elapsed(), 1)), "steps": done,
                "results": report.collect(work, done)}

    def echo(line: str) -> None:
        print(line, flush=True)
        report.write_summary(out, snapshot())  # after every command: a run cut short keeps its summary

    run_steps(steps, clock, work, echo)
    data = snapshot()
    data["files"] = report.pack(out, work, WORK_DIR)
    print(report.write_summary(out, data), flush=True)
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
