"""The benchmark command and its pieces on CPU: one tiny run of ``python -m resfuse.bench`` (JSON schema,
markdown regeneration, plots), the FLOP and byte counts, the shape table, provider names and reasons, and the
wiring of the cuDNN-fused provider (checked on CPU with stand-ins for cuDNN's fused convolutions)."""
import contextlib
import copy
import datetime
import importlib.util
import io
import json
import os
import platform
import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from resfuse.bench import cases, cli, counting, report, shapes, timing
from resfuse.bench.records import fmt_ms

# the names RESULTS.md allows, and the torch.compile compositions of issue 18 (resfuse under torch.compile, and
# both under Inductor's CUDA graphs)
RESULT_PROVIDERS = {"eager", "compile", "compile_freezing", "cudnn_fused", "resfuse_cuda", "resfuse_triton",
                    "resfuse_auto", "resfuse_compile", "compile_cudagraphs", "resfuse_compile_cudagraphs"}
META_KEYS = {"gpu", "torch", "triton", "cuda", "cudnn", "resfuse", "date", "command"}
RECORD_KEYS = {"bench", "mode", "stage", "N", "C", "H", "W", "stride", "dtype", "layout", "provider", "median_ms",
               "rel_err"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

ARGV = ["--device", "cpu", "--bench", "basicblock,conv_bn_act,bn_act", "--stages", "C512_H7", "--batch", "2",
        "--repeats", "1", "--tag", "test"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ARGV + (["--models", "resnet18", "--resolution", "32"] if HAS_TORCHVISION else []) + ["--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(argv)
    stem = f"cpu-{datetime.date.today():%Y%m%d}-test"
    return {"rc": rc, "out": out, "json": out / f"{stem}.json", "md": out / f"{stem}.md", "stem": stem,
            "stdout": stdout.getvalue()}


def test_cli_runs_and_names_files(run):
    assert run["rc"] == 0, run["stdout"]
    assert run["json"].exists() and run["md"].exists()
    assert re.fullmatch(r"cpu-\d{8}-test", run["stem"])
    assert "vs eager" in run["stdout"] and "skipped" in run["stdout"]


def test_cpu_name_is_the_model_name(tmp_path):
    """CPU result files name the CPU: /proc/cpuinfo's model name, not just the architecture."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cli.cpu_name(str(info)) == "AMD EPYC 9654 96-Core Processor"
    assert cli.cpu_name(str(tmp_path / "missing")) == (platform.processor() or platform.machine())


def test_json_schema(run):
    data = json.loads(run["json"].read_text())
    meta = data["meta"]
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["complete"] is True and meta["gpu"] is None and "python -m resfuse.bench" in meta["command"]
    assert {"copy_gbps", "matmul_tflops", "matmul_dtype"} <= set(meta["ceilings"])
    assert meta["rounds"] == 3 and all(r["repeats"] == 1 for r in data["records"])  # --repeats 1: one slice
    records = data["records"]
    benches = {r["bench"] for r in records}
    assert {"basicblock", "conv_bn_act", "bn_act"} <= benches
    if HAS_TORCHVISION:
        assert "model:resnet18" in benches
        # a whole model's resfuse rows say what convert() fused in it
        converted = [r for r in records if r["bench"] == "model:resnet18" and r["provider"].startswith("resfuse_")]
        assert converted and all("8 blocks fused" in r["convert"] for r in converted)
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert r["provider"] in RESULT_PROVIDERS
        assert r["mode"] in ("eval", "train")
        assert r["median_ms"] > 0 and r["dtype"] == "fp32" and r["layout"] == "channels_last"
        # against the same step in float64, within twice eager's own error (+ a floor): the limit is in the record
        assert r["rel_err"] is not None and r["max_rel_err"] is not None and r["rel_err"] <= r["max_rel_err"], r
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["roofline_frac"] > 0 and r["bound"] in ("compute", "memory")
        assert "peak_mib" in r and r["peak_mib"] is None  # GPU only
    # every comparison has its eager baseline, and bn_act rows are memory-bound, conv rows compute-bound
    assert {(r["bench"], r["mode"]) for r in records if r["provider"] == "eager"} == \
        {(r["bench"], r["mode"]) for r in records}
    assert all(r["bound"] == "memory" for r in records if r["bench"] == "bn_act")
    # what cannot run on CPU is listed with a reason, never replaced
    skipped = {(s["provider"], s["bench"], s["mode"]) for s in data["skipped"]}
    assert ("cudnn_fused", "basicblock", "eval") in skipped and ("resfuse_triton", "basicblock", "train") in skipped
    assert all(s["reason"] for s in data["skipped"]) and not data["failed"]
    assert not {r["provider"] for r in records} & {s[0] for s in skipped if s[1] == "basicblock"}


def test_markdown_regenerates_from_json(run, tmp_path):
    text = run["md"].read_text()
    assert "## basicblock, eval" in text and "## bn_act, train" in text and "cudnn_fused" in text
    # the markdown is made from the JSON file, figure by figure: a changed median in the file changes the table
    data = json.loads(run["json"].read_text())
    record = next(r for r in data["records"] if r["bench"] == "basicblock" and r["provider"] != "eager")
    assert fmt_ms(record["median_ms"]) in text
    record["median_ms"] = 987654.0
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    assert fmt_ms(987654.0) in report.render_markdown(str(edited)) and fmt_ms(987654.0) not in text
    run["md"].write_text("stale")
    report.main([str(run["json"]), "--no-plots"])
    assert run["md"].read_text() == text


def test_plots_written(run):
    if not HAS_MATPLOTLIB:
        pytest.skip("matplotlib is not installed: the command skips the plots (and says so)")
    for kind in ("speedup", "roofline"):
        png = run["out"] / f"{run['stem']}-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in run["md"].read_text()


@pytest.mark.cuda
def test_peak_bytes_counts_what_one_call_allocates():
    device = torch.device("cuda")
    resident = torch.ones(64 << 20, dtype=torch.uint8, device=device)  # allocated before: not counted

    def step():
        scratch = torch.ones(32 << 20, dtype=torch.uint8, device=device)  # freed when the call returns: counted
        return (scratch.sum() + resident[0]).item()

    peak = timing.peak_bytes(step, device)
    assert 32 << 20 <= peak < 40 << 20, peak


def test_provider_names_are_the_results_names():
    assert set(cases.PROVIDERS) == RESULT_PROVIDERS
    assert set(cli.PROVIDER_ALIASES.values()) <= RESULT_PROVIDERS


def test_arguments():
    args = cli.parse_args(["--device", "cpu", "--backends", "cuda,triton"])  # the old flag still works
    assert args.provider_names == ["eager", "resfuse_cuda", "resfuse_triton"]
    assert args.preset == "cpu" and args.dtype == "fp32" and args.left_out == {}
    args = cli.parse_args(["--device", "cpu"])
    assert args.provider_names == list(cases.PROVIDERS) and set(args.left_out) == set(cases.COMPILED)
    assert [i.shape.stage for i in cli.plan(args) if i.bench == "basicblock" and i.mode == "eval"] == \
        ["C64_H56", "C128_H28", "C256_H14", "C512_H7"]
    args = cli.parse_args(["--device", "cpu", "--bench", "bottleneck", "--stages", "64,C512_H28_down", "--mode",
                           "train"])
    assert [(i.shape.stage, i.mode) for i in cli.plan(args)] == \
        [("C64_H56_down", "train"), ("C256_H56", "train"), ("C512_H28_down", "train")]
    args = cli.parse_args(["--device", "cpu", "--full"])
    items = cli.plan(args)
    assert {i.bench for i in items} == set(cases.BENCHES)
    assert len([i for i in items if i.bench == "bottleneck"]) == 2 * len(shapes.BOTTLENECK_SHAPES)
    assert {(i.bench, i.mode) for i in items if i.bench in ("conv_bn_act", "bn_act")} == \
        {("conv_bn_act", "eval"), ("bn_act", "train")}
    for bad in (["--providers", "nope"], ["--stages", "C7_H7"], ["--models", "vgg16"], ["--bench", "x"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["--device", "cpu"] + bad)


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = cli.Progress(4, stream=stream)
    progress.bar = None  # the text fallback, whether tqdm is installed or not
    for label in ("a", "a", "b", "b"):
        progress.step(label, "eager")
        progress.advance()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[  0/4]") and lines[1].startswith("[  2/4]")


def test_result_stem():
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-24"}
    assert cli.result_stem(meta, None) == "h100-80gb-hbm3-20261124"
    assert cli.result_stem(meta, "Full Run") == "h100-80gb-hbm3-20261124-full-run"
    assert cli.result_stem({"gpu": None, "date": "2026-11-24"}, None) == "cpu-20261124"


# ---------------------------------------------------------------------------------------------------------
# FLOPs and bytes


def test_conv_flops_known_shape():
    # ResNet-18 layer1 conv: 64 -> 64, 3x3, 56x56, one image: 2 * 56*56 * 64 * 64 * 9
    assert counting.conv_flops(1, 64, 64, 56, 56, 3, 3) == 231_211_008
    assert counting.conv_flops(2, 64, 64, 56, 56, 3, 3, groups=32) == 2 * 231_211_008 // 32


def test_block_counts_known_shape():
    identity = shapes.BASICBLOCK_SHAPES[0]
    assert identity.stage == "C64_H56"
    assert counting.block_flops(identity, 1, train=False) == 2 * 231_211_008
    assert counting.block_flops(identity, 1, train=True) == 3 * 2 * 231_211_008
    act, weight = 64 * 56 * 56, 64 * 64 * 9
    # conv1 reads x and its weight, writes y; conv2 reads y, its weight and the residual, writes out
    assert counting.block_bytes(identity, 1, 4, train=False) == 4 * ((act + weight + act) + (act + weight + 2 * act))
    down = shapes.BASICBLOCK_SHAPES[1]
    assert down.stage == "C64_H56_down" and down.out_size == 28 and down.out_channels == 128
    expected = (counting.conv_flops(1, 64, 128, 28, 28, 3, 3) + counting.conv_flops(1, 128, 128, 28, 28, 3, 3)
                + counting.conv_flops(1, 64, 128, 28, 28, 1, 1))
    assert counting.block_flops(down, 1, train=False) == expected == 359_661_568


def test_bn_act_bytes_known_shape():
    shape = shapes.OP_SHAPES[0]  # C64_H56
    numel = 2 * 64 * 56 * 56
    assert counting.bn_act_bytes(shape, 2, 2, train=False) == 3 * numel * 2  # x, residual in; out
    assert counting.bn_act_bytes(shape, 2, 2, train=True) == 8 * numel * 2  # + grad_out, x, out in; 2 grads out
    assert counting.bn_act_bytes(shape, 2, 2, train=True, residual=False) == 6 * numel * 2
    assert counting.conv_bn_act_flops(shape, 2) == 2 * 231_211_008


@pytest.mark.parametrize("shape", [shapes.BASICBLOCK_SHAPES[1], shapes.BOTTLENECK_SHAPES[0],
                                   shapes.BOTTLENECK_SHAPES[-1]], ids=lambda s: f"{s.block}-{s.stage}")
def test_block_flops_match_torch_flop_counter(shape):
    """Our counts from the shapes agree with torch's FLOP counter run on the real block, forward and backward."""
    block = cases._block_module(shape)
    x = torch.randn(1, shape.inplanes, shape.size, shape.size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = block(x)
    assert counter.get_total_flops() == counting.block_flops(shape, 1, train=False)
    with FlopCounterMode(display=False) as counter:
        block(x).sum().backward()
    assert counter.get_total_flops() == counting.block_flops(shape, 1, train=True)
    assert out.shape[1:] == (shape.out_channels, shape.out_size, shape.out_size)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_model_flops_match_torch_flop_counter():
    from torchvision.models import resnet18

    model = resnet18()
    count = counting.count_model(model, 64)
    assert len(count.convs) == 20 and count.fc == (512, 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(2, 3, 64, 64))
    assert counter.get_total_flops() == count.flops(2, train=False)


def test_shape_table_covers_every_block():
    for model, layers in shapes.MODEL_LAYERS.items():
        table = shapes.block_shapes(shapes.MODEL_BLOCK[model])
        assert sum(s.count.get(model, 0) for s in table) == sum(layers), model
    names = [s.stage for s in shapes.BASICBLOCK_SHAPES]
    assert len(set(names)) == len(names) == 7
    assert len({s.stage for s in shapes.BOTTLENECK_SHAPES}) == 8
    assert shapes.STAGES == [(64, 56), (128, 28), (256, 14), (512, 7)]


def test_benchmarks_shapes_reexports_the_table():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "shapes.py")
    spec = importlib.util.spec_from_file_location("_benchmarks_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.BASICBLOCK_SHAPES is shapes.BASICBLOCK_SHAPES and module.OP_SHAPES is shapes.OP_SHAPES


# ---------------------------------------------------------------------------------------------------------
# providers


def test_unavailable_providers_say_why():
    problem = cases.make_problem("basicblock", shapes.BASICBLOCK_SHAPES[-1], "train", 2, "cpu", "fp32")
    assert "GPU" in cases.provider_unavailable(problem, "cudnn_fused")
    assert "eval" in cases.provider_unavailable(problem, "compile_freezing")
    assert "interpreter" in cases.provider_unavailable(problem, "resfuse_triton")
    with pytest.raises(cases.Unavailable):
        cases.make_runner(problem, "cudnn_fused")
    with pytest.raises(ValueError):
        cases.provider_unavailable(problem, "tensorrt")


def _stand_in_cudnn(monkeypatch):
    """CPU stand-ins with the signatures of torch.cudnn_convolution_relu / _add_relu."""
    def conv_relu(x, w, b, stride, padding, dilation, groups):
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    def conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)


@pytest.mark.parametrize("shape", [shapes.BASICBLOCK_SHAPES[1], shapes.BOTTLENECK_SHAPES[0]],
                         ids=lambda s: f"{s.block}-{s.stage}")
def test_cudnn_fused_block_wiring(monkeypatch, shape):
    _stand_in_cudnn(monkeypatch)
    small = shapes.BlockShape(shape.block, shape.layer, shape.inplanes // 8, shape.planes // 8, shape.stride, 12,
                              shape.downsample)
    problem = cases.make_problem(shape.block, small, "eval", 2, "cpu", "fp32")
    block, x = problem.master.double(), problem.inputs[0].double()  # fp64: the wiring, not rounding, is checked
    fused = cases._CudnnBlock(copy.deepcopy(block))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_cudnn_fused_model_wiring(monkeypatch):
    _stand_in_cudnn(monkeypatch)
    problem = cases.make_problem("model", "resnet18", "eval", 2, "cpu", "fp32", resolution=32)
    model, x = problem.master.double(), problem.inputs[0].double()
    fused = cases._CudnnResNet(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def test_conv_bn_act_providers_agree_on_cpu(monkeypatch):
    _stand_in_cudnn(monkeypatch)
    problem = cases.make_problem("conv_bn_act", shapes.ActShape(1, 16, 9), "eval", 2, "cpu", "fp32")
    expected = problem.reference()
    fused = cases._CudnnConvBNAct(copy.deepcopy(problem.master))
    with torch.no_grad():
        torch.testing.assert_close(fused(*problem.inputs), expected[0])
    runner = cases.make_runner(problem, "resfuse_cuda" if "cuda" in cases._backend.available_backends("cpu")
                               else "eager")
    assert cases.rel_err(runner.step(), expected) < 1e-5


def test_compile_freezing_compiles_with_freezing_and_compile_without(monkeypatch):
    """Both compiled providers of one comparison are alive together while they are timed round-robin. Each
    must compile its own graph (a deepcopied module passes the other's guards), compile_freezing with inductor's
    freezing and plain compile without it, and the global config must be left as it was."""
    import torch._inductor.freezing as inductor_freezing
    from torch._inductor import config as inductor_config

    frozen_graphs = []
    real_freeze = inductor_freezing.freeze

    def spy_freeze(*args, **kwargs):  # inductor's freezing pass, imported by compile_fx when it runs
        frozen_graphs.append(1)
        return real_freeze(*args, **kwargs)

    monkeypatch.setattr(inductor_freezing, "freeze", spy_freeze)
    problem = cases.make_problem("conv_bn_act", shapes.ActShape(1, 8, 5), "eval", 2, "cpu", "fp32")
    expected = problem.reference()
    before = inductor_config.freezing
    torch._dynamo.reset()
    plain = cases.make_runner(problem, "compile", reset_compiler=False)
    frozen = cases.make_runner(problem, "compile_freezing", reset_compiler=False)
    try:
        assert frozen.compiles and plain.compiles and inductor_config.freezing == before
        assert cases.rel_err(plain.step(), expected) < 1e-5 and frozen_graphs == []
        assert cases.rel_err(frozen.step(), expected) < 1e-5 and frozen_graphs == [1]
        for _ in range(2):
            plain.step()
            frozen.step()
        assert frozen_graphs == [1] and inductor_config.freezing == before
    finally:
        frozen.close()
        plain.close()


HAS_EXTENSION_OPS = "cuda" in cases._backend.available_backends("cpu")


@pytest.mark.skipif(not HAS_EXTENSION_OPS, reason="resfuse_compile needs the C++ extension's CPU kernels here")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_resfuse_compile_keeps_resfuse_ops_inside_inductor_code(mode):
    """torch.compile over the converted block: Inductor's generated code calls resfuse's registered ops (they
    stay opaque; a provider that compiled the eager block would call none) and agrees with the reference."""
    from torch._inductor.utils import run_and_get_code

    small = shapes.BlockShape("basicblock", 4, 16, 16, 1, 5, False)
    problem = cases.make_problem("basicblock", small, mode, 2, "cpu", "fp32")
    runner = cases.make_runner(problem, "resfuse_compile")
    try:
        # auto under tracing: its fixed rule, on CPU tensors the extension's kernels (called in the code below)
        assert runner.compiles and runner.backend == "auto: fixed rule"
        outputs, code = run_and_get_code(runner.step)
        called = set(re.findall(r"torch\.ops\.resfuse\.(\w+)", "\n".join(code)))
        assert called, "no resfuse op in Inductor's code: the compiled module was not the converted one"
        assert cases.rel_err(outputs, problem.reference()) < 1e-5
        assert cases.rel_err(runner.step(), problem.reference()) < 1e-5  # the compiled code, called again
    finally:
        runner.close()


def test_cudagraph_providers_are_gpu_only():
    problem = cases.make_problem("conv_bn_act", shapes.ActShape(1, 8, 5), "eval", 2, "cpu", "fp32")
    for provider in cases.CUDAGRAPHS:
        assert "CUDA graphs need a CUDA GPU" in cases.provider_unavailable(problem, provider)
        with pytest.raises(cases.Unavailable):
            cases.make_runner(problem, provider)


def test_cudagraph_provider_refuses_to_run_without_graphs(monkeypatch):
    """Inductor runs mode="reduce-overhead" without CUDA graphs where it cannot record them (on CPU tensors, as
    here, it always does so, counting a skip). The provider must then fail, not time an ordinary compiled
    graph under the CUDA-graph name."""
    monkeypatch.setattr(cases, "provider_unavailable", lambda problem, provider: None)
    problem = cases.make_problem("conv_bn_act", shapes.ActShape(1, 8, 5), "eval", 2, "cpu", "fp32")
    runner = cases.make_runner(problem, "compile_cudagraphs")
    try:
        with pytest.raises(RuntimeError, match="skipped CUDA graphs"):
            runner.step()
    finally:
        runner.close()


def test_cudagraph_step_returns_copies_while_it_checks():
    """A CUDA-graph replay overwrites the previous replay's outputs: the first calls (the compared outputs among
    them) hand back copies; later calls pass the step's outputs through untouched."""
    out = torch.ones(3)
    step = cases._cudagraph_step(lambda: [out, None])
    for _ in range(cases.CUDAGRAPH_CHECKED_CALLS):
        first = step()
        assert first[1] is None and first[0].data_ptr() != out.data_ptr()
        torch.testing.assert_close(first[0], out)
    assert step()[0] is out


def test_convert_that_fuses_nothing_is_unavailable():
    """A resfuse provider on a model in which resfuse.convert() recognises no block would time eager PyTorch
    under a resfuse name: it is unavailable instead, with what convert() said."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with pytest.raises(cases.Unavailable, match="fused nothing"):
        cases._convert(model, "auto")
    problem = cases.make_problem("basicblock", shapes.BlockShape("basicblock", 4, 8, 8, 1, 5, False), "eval", 2,
                                 "cpu", "fp32")
    _, said = cases._convert(copy.deepcopy(problem.master), "auto")
    assert "1 block fused" in said


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_models_in_the_models_bench():
    """timm:<name> builds the timm model with random weights (no download) and is timed whole; cuDNN's fused
    model is torchvision-only; resfuse providers run what convert() fuses in it, or are unavailable."""
    cases.check_model_name("timm:resnet50d")
    for bad in ("timm:no_such_model", "vgg16"):
        with pytest.raises(ValueError):
            cases.check_model_name(bad)
    args = cli.parse_args(["--device", "cpu", "--models", "resnet18,timm:resnet50d"])
    assert [(i.shape, i.mode) for i in cli.plan(args) if i.bench == "model"] == \
        [("resnet18", "eval"), ("resnet18", "train"), ("timm:resnet50d", "eval"), ("timm:resnet50d", "train")]
    problem = cases.make_problem("model", "timm:resnet50d", "eval", 2, "cpu", "fp32", resolution=32)
    assert problem.bench == "model:timm:resnet50d" and type(problem.master).__module__.startswith("timm.")
    assert "torchvision" in cases.provider_unavailable(problem, "cudnn_fused")
    eager = cases.make_runner(problem, "eager")
    assert cases.rel_err(eager.step(), problem.reference()) < 1e-6
    if HAS_EXTENSION_OPS:  # convert() fuses timm's ResNets: the provider runs, within the 2x rule
        runner = cases.make_runner(problem, "resfuse_cuda")
        assert "blocks fused" in runner.converted, runner.converted
        assert cases.rel_err(runner.step(), problem.reference64()) <= problem.accuracy_limit()


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_se_model_counts_its_fused_tails_and_its_record_leaves_no_block():
    """seresnext26d_32x4d: every block ends in the fused SE tail, so the byte model counts each last conv without
    the residual and the tail's passes on its output; convert() fuses all 8 blocks and their SE tails."""
    problem = cases.make_problem("model", "timm:seresnext26d_32x4d", "train", 2, "cpu", "fp32", resolution=32)
    count = counting.count_model(problem.master, 32)
    assert [(t.channels, t.size, t.drop_path) for t in count.tails] == \
        [(c, s, False) for c, s in ((256, 8), (512, 4), (1024, 2), (2048, 1)) for _ in range(2)]
    assert not any(c.residual for c in count.convs)
    tails = sum(counting.block_tail_bytes(shapes.ActShape(0, t.channels, t.size), 2, 4, True) for t in count.tails)
    assert problem.bytes == counting.ModelCount(count.convs, count.fc).bytes(2, 4, True) + tails > tails > 0
    if HAS_EXTENSION_OPS:
        runner = cases.make_runner(problem, "resfuse_cuda")
        assert runner.converted.startswith("resfuse.convert: 8 blocks fused"), runner.converted
        assert " left as" not in runner.converted and "run as modules" not in runner.converted, runner.converted
        assert "fused into the block tails: 8 x attention SEModule" in runner.converted, runner.converted


def test_round_robin_interleaves_the_providers():
    """Each provider's repetitions are split into rounds; round r starts one provider later; every provider
    gets at least the repetitions it asked for, and its own median."""
    log = []

    def provider(name, ms):
        def fn():
            log.append(name)
            t = time.perf_counter()
            while (time.perf_counter() - t) * 1e3 < ms:  # a measurable cost of its own
                pass
            return [torch.tensor(float(len(name)))]
        return fn

    budget = timing.Budget(warmup_s=0.0, min_warmup=1, target_s=0.0, min_repeats=4, max_repeats=4, rounds=4)
    fns = {"a": provider("a", 0.2), "b": provider("b", 2.0), "c": provider("c", 0.2)}
    results = timing.time_round_robin(fns, torch.device("cpu"), budget)
    assert list(results) == ["a", "b", "c"]
    # warm-up: first call + one warm-up call each, in order; then 4 rounds of one call each, rotated
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]
    assert log[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    for name, result in results.items():
        assert result.repeats == 4 and result.outputs[0].item() == 1.0
    assert results["b"].median_ms > 5 * results["a"].median_ms


def test_round_robin_keeps_timing_the_others_when_one_fails():
    calls = {"bad": 0}

    def bad():
        calls["bad"] += 1
        if calls["bad"] > 2:  # fails after its warm-up, while timed
            raise RuntimeError("kernel failed")
        return []

    budget = timing.Budget(warmup_s=0.0, min_warmup=1, target_s=0.0, min_repeats=3, max_repeats=3, rounds=3)
    results = timing.time_round_robin({"good": lambda: [], "bad": bad}, torch.device("cpu"), budget)
    assert isinstance(results["bad"], RuntimeError) and calls["bad"] == 3
    assert isinstance(results["good"], timing.Timing) and results["good"].repeats == 3


def test_command_names_the_resfuse_settings(monkeypatch):
    """RESFUSE_* variables change what runs, so the recorded command carries them."""
    import argparse

    from resfuse.bench.cli import environment

    for k in [k for k in os.environ if k.startswith("RESFUSE_")]:
        monkeypatch.delenv(k)
    args = argparse.Namespace(device=torch.device("cpu"), preset="cpu")
    assert environment(["--mode", "eval"], args)["command"] == "python -m resfuse.bench --mode eval"
    monkeypatch.setenv("RESFUSE_CUDA_CONV", "igemm")
    assert environment([], args)["command"] == "RESFUSE_CUDA_CONV=igemm python -m resfuse.bench"
