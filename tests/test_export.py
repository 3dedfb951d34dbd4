"""TorchScript and FX on converted models, against the unconverted ones.

The README's Serving snippets for these routes are run as written (tests/_serving.py). ONNX and AOTInductor,
which compile whole models, have their own files (test_export_onnx.py, test_export_aoti.py).
"""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from _helpers import randn, randomize_bn_, rel_err, resfuse
from _serving import SETail, eager_and_converted, readme_snippet, resfuse_ops_run, run_snippet, serve

TOL = 1e-5  # float32: ||route - eager|| / ||eager||


def _resnet18():
    # 32 px: layer4 sees 1x1 feature maps, a tensor both contiguous and channels_last, which torch.jit.trace
    # used to fail on (resfuse/layout.py)
    return eager_and_converted(torchvision.models.resnet18())


# ---------------------------------------------------------------------------------------------------------------
# TorchScript


def test_readme_trace_snippet_records_the_fused_ops_and_serves_with_resfuse(tmp_path, monkeypatch):
    eager, converted = _resnet18()
    monkeypatch.chdir(tmp_path)
    x = randn(2, 3, 32, 32, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
        traced = run_snippet(readme_snippet("torch.jit.trace"), model=converted, x=x)["traced"]
    graph = str(traced.inlined_graph)
    # one resfuse op per conv-BN(-add)-ReLU: on CPU ATen's conv then resfuse::bn_eval_act (routing.py)
    assert graph.count("resfuse::") == 20 and "aten::batch_norm" not in graph
    with torch.no_grad():  # other batch sizes and another resolution than the trace saw
        for shape in ((1, 3, 32, 32), (3, 3, 48, 40)):
            xs = randn(*shape, seed=shape[0])
            assert rel_err(traced(xs), eager(xs)) < TOL, shape
    served = serve(readme_snippet("torch.jit.load"), x, tmp_path)
    assert served.returncode == 0, served.stderr[-3000:]
    with torch.no_grad():
        assert rel_err(torch.load(tmp_path / "out.pt"), eager(x)) < TOL


def test_traced_module_follows_later_changes_of_weights_and_running_statistics():
    # BN's parameters and running statistics are read by ops in the graph, not baked in as constants when tracing
    eager, converted = _resnet18()
    x = randn(2, 3, 32, 32, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(converted, x)
    with torch.no_grad():
        for model in (eager, converted):
            model.layer1[0].bn1.running_var.mul_(3.0)
            model.layer3[0].downsample[1].running_mean.add_(0.5)
            model.layer2[1].conv2.weight.data.mul_(0.5)
        assert rel_err(traced(x), eager(x)) < TOL


def test_trace_of_a_folding_route_at_1x1_feature_maps():
    # The routes that fold BN into the weight (GPUs, the Triton conv) pick W''s layout from the input's; a 1x1
    # feature map is contiguous in both layouts, and the tracer hands its sizes out as tensors (layout.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", resfuse.ConversionWarning)
        unit = randomize_bn_(resfuse.ConvBNReLU(4, 6, 1, backend="triton")).eval()
    x = randn(2, 4, 1, 1, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # under no_grad: check_trace reruns without grad, and with grad this route folds with torch ops instead of
        # resfuse::_fold_bn (routing.py _folded_weight), a different graph (open: told to the lead)
        with torch.no_grad():
            traced = torch.jit.trace(unit, x)
    graph = str(traced.inlined_graph)
    assert "resfuse::_fold_bn_triton" in graph and "resfuse::conv_bn_act_triton" in graph
    with torch.no_grad():
        assert rel_err(traced(x), torch.relu(unit.bn(unit.conv(x)))) < TOL


@pytest.mark.parametrize("backend, op", [("cuda", "bn_scale_act"), ("triton", "bn_scale_act_triton")])
def test_trace_of_an_se_block_tail_records_bn_scale_act(backend, op, tmp_path):
    # block_tail in eval: torch's mean and the gate's ops, then one bn_scale_act call (BN from the running
    # statistics, the gate's scale, the shortcut, ReLU), which the saved and reloaded trace still calls
    tail = SETail(backend).eval()
    x = randn(2, 3, 8, 8, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
        traced = torch.jit.trace(tail, x)
        torch.jit.save(traced, tmp_path / "tail.ts")
        loaded = torch.jit.load(tmp_path / "tail.ts")
    graph = str(loaded.inlined_graph)
    assert graph.count("resfuse::") == 1 and f"resfuse::{op}(" in graph
    with torch.no_grad():  # other batch sizes and another resolution than the trace saw
        for shape in ((1, 3, 8, 8), (3, 3, 12, 10)):
            xs = randn(*shape, seed=shape[0])
            assert rel_err(loaded(xs), tail.eager(xs)) < TOL, shape


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_script_raises_an_error_that_says_what_to_do_and_leaves_the_model_fused():
    eager, converted = _resnet18()
    modules_before = dict(converted.named_modules())
    with pytest.raises(RuntimeError, match=r"TorchvisionResNet.*torch\.jit\.trace.*resfuse\.revert\(copy\.deepcopy\(model\)\)"):
        torch.jit.script(converted)
    assert dict(converted.named_modules()) == modules_before  # the same objects, still resfuse's classes
    assert type(converted.layer1[0]) is resfuse.BasicBlock
    # inside another model too (each block refuses), and ConvBNReLU, which revert() leaves alone, says to trace
    for block in (resfuse.BasicBlock(8, 8), resfuse.Bottleneck(16, 4)):
        with pytest.raises(RuntimeError, match=f"resfuse's {type(block).__name__}"):
            torch.jit.script(nn.Sequential(block))
    with pytest.raises(RuntimeError, match=r"resfuse's ConvBNReLU.*torch\.jit\.trace") as info:
        torch.jit.script(nn.Sequential(resfuse.ConvBNReLU(3, 4, 3)))
    assert "revert" not in str(info.value)


def test_scripting_an_unfused_copy_as_the_error_says_matches():
    eager, converted = _resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(resfuse.revert(copy.deepcopy(converted)))
    x = randn(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        assert rel_err(scripted(x), eager(x)) < TOL
    assert type(converted.layer1[0]) is resfuse.BasicBlock


# ---------------------------------------------------------------------------------------------------------------
# FX


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_readme_fx_snippet_gives_eager_outputs_and_features(name):
    eager, converted = eager_and_converted(getattr(torchvision.models, name)())
    x = randn(2, 3, 32, 32, seed=4)
    snippet = readme_snippet("create_feature_extractor")
    resfuse._warn_once.forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run_snippet(snippet, model=converted, x=x)
    assert any("traced by torch.fx" in str(w.message) for w in caught)
    theirs = run_snippet(snippet, model=eager, x=x)
    assert rel_err(ours["out"], theirs["out"]) < TOL
    assert ours["features"].keys() == {"c3", "c5"}
    for key, value in theirs["features"].items():
        assert rel_err(ours["features"][key], value) < TOL, key
    # both graphs call torchvision's modules; the converted model itself still runs resfuse's ops
    for graph_module in (ours["graph_module"], ours["extractor"]):
        called = {node.target for node in graph_module.graph.nodes if node.op == "call_module"}
        assert {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn3", "layer4.2.relu"} <= called
    assert resfuse_ops_run(converted, x) == 53
