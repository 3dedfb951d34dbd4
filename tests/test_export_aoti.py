"""torch.export + AOTInductor: packages of a converted model, built, then served from a separate process.

The README's two routes are run as written: the self-contained package (resfuse.export.decompose), served by a
process that never imports resfuse, and the package that calls resfuse's kernels, served by a process that
imports resfuse (and refused, naming the op, by one that does not). Both against the unconverted model, at
other batch sizes than the export saw. AOTInductor compiles C++ for every package (about 30 s of a 2-core
machine each, most of it the compiler's), so the model is a small ResNet with every kind of fused call: the
stem, BasicBlocks and Bottlenecks with and without a downsample, grouped convs.
"""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import resfuse.export
from _helpers import randn, randomize_bn_, rel_err, resfuse
from _serving import (EagerTail, EvalBNAct, Fold, FoldedConv, ScaleAct, SETail, conv_and_bn, eager_and_converted,
                      ops_left_out_of, readme_snippet, resfuse_op_count, run_snippet, serve,
                      small_converted_seresnext)


TOL = 1e-5  # float32: ||package - eager|| / ||eager||


class _SmallResNet(nn.Module):
    """A torchvision ResNet stem and stages of BasicBlocks, then a grouped Bottleneck stage."""

    def __init__(self):
        super().__init__()
        self.net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
        self.net.layer4 = nn.Sequential(
            Bottleneck(256, 64, stride=2, groups=4, base_width=32, downsample=nn.Sequential(
                nn.Conv2d(256, 256, 1, stride=2, bias=False), nn.BatchNorm2d(256))),
            Bottleneck(256, 64, groups=4, base_width=32))
        self.net.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.net(x)


# the stem, 2 per BasicBlock (3 of them, 2 with a downsample), 3 per Bottleneck (2, 1 with a downsample)
FUSED_OPS = 1 + 3 * 2 + 2 + 2 * 3 + 1


def _build_packages(model, x, folder):
    """Run the README's export snippets on ``model`` in ``folder``: both packages there; the exported program."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        ep = run_snippet(readme_snippet('package_path="model.pt2"'), model=model, x=x)["ep"]
        run_snippet(readme_snippet('package_path="model_resfuse.pt2"'), model=model, x=x, ep=ep)
    return ep


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The README's export snippets run on the small ResNet: (eager model, example input, folder with both
    packages, the exported program)."""
    eager, converted = eager_and_converted(_SmallResNet())
    folder = tmp_path_factory.mktemp("aoti")
    x = randn(2, 3, 32, 32, seed=1)
    return eager, x, folder, _build_packages(converted, x, folder)


def _check_served(eager, folder):
    assert rel_err(torch.load(folder / "out.pt"), eager(torch.load(folder / "x.pt"))) < TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_self_contained_package_serves_without_resfuse(exported, batch):
    eager, _, folder, ep = exported
    assert resfuse_op_count(ep.graph) == FUSED_OPS  # what was exported called resfuse's ops
    served = serve(readme_snippet('aoti_load_package("model.pt2")'), randn(batch, 3, 32, 32, seed=batch), folder)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "resfuse imported: False" in served.stdout
    with torch.no_grad():
        _check_served(eager, folder)


def test_package_with_resfuse_kernels_serves_where_resfuse_is_imported(exported):
    eager, _, folder, _ = exported
    snippet = readme_snippet('aoti_load_package("model_resfuse.pt2")')
    served = serve(snippet, randn(3, 3, 32, 32, seed=3), folder)
    assert served.returncode == 0, served.stderr[-3000:]
    with torch.no_grad():
        _check_served(eager, folder)
    # what the README says happens without the import
    refused = serve(snippet.replace("import resfuse\n", ""), randn(3, 3, 32, 32, seed=3), folder)
    assert refused.returncode != 0 and "Could not find schema for resfuse::" in refused.stderr


# ---------------------------------------------------------------------------------------------------------------
# resfuse.export.decompose on its own


def test_decompose_leaves_only_aten_ops_that_compute_the_same():
    eager, converted = eager_and_converted(torchvision.models.resnet18())
    x = randn(2, 3, 32, 32, seed=5)
    ep = torch.export.export(converted, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert resfuse_op_count(ep.graph) == 20
    decomposed = resfuse.export.decompose(ep)
    assert resfuse_op_count(decomposed.graph) == 0
    assert all(node.target.namespace == "aten" for node in decomposed.graph.nodes
               if isinstance(node.target, torch._ops.OpOverload))
    with torch.no_grad():
        for batch in (1, 3):
            xb = randn(batch, 3, 32, 32, seed=batch)
            assert rel_err(decomposed.module()(xb), eager(xb)) < TOL


@pytest.mark.parametrize("relu, backend", [(True, "cuda"), (False, "triton")])  # the C++ op, the Triton op
def test_decomposition_of_every_conv_option(relu, backend):
    unit = randomize_bn_(resfuse.ConvBNReLU(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                                            relu=relu, backend=backend)).eval()
    x, residual = randn(2, 4, 9, 11, seed=6), randn(2, 6, 5, 11, seed=7)
    ep = torch.export.export(unit, (x, residual))
    assert resfuse_op_count(ep.graph) == 1
    with torch.no_grad():
        expected = unit.bn(unit.conv(x)) + residual
        expected = torch.relu(expected) if relu else expected
        assert rel_err(resfuse.export.decompose(ep).module()(x, residual), expected) < TOL


def _decomposed(module, args):
    """(the exported program's module with resfuse's op decomposed, how many resfuse ops the export held)."""
    ep = torch.export.export(module, args)
    decomposed = resfuse.export.decompose(ep)
    assert resfuse_op_count(decomposed.graph) == 0
    return decomposed.module(), resfuse_op_count(ep.graph)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("affine, relu", [(True, True), (False, False)])
def test_decomposition_of_bn_eval_act(affine, relu, backend):
    bn = randomize_bn_(nn.BatchNorm2d(6, affine=affine, eps=1e-3)).eval()
    x, residual = randn(2, 6, 5, 7, seed=8), randn(2, 6, 5, 7, seed=9)
    module, fused_ops = _decomposed(EvalBNAct(bn, affine, relu, backend), (x, residual))
    assert fused_ops == 1
    with torch.no_grad():
        expected = bn(x) + residual
        expected = torch.relu(expected) if relu else expected
        assert rel_err(module(x, residual), expected) < TOL


@pytest.mark.parametrize("impl, layout", [("cuda", "contiguous"), ("cuda", "channels_last"), ("triton", "gemm")])
@pytest.mark.parametrize("conv_bias, affine", [(True, True), (False, False)])
def test_decomposition_of_fold_bn(conv_bias, affine, impl, layout):
    conv, bn = conv_and_bn(conv_bias, affine)
    x = randn(2, 4, 5, 7, seed=12)
    folded_conv, fused_ops = _decomposed(FoldedConv(conv, bn, impl, layout), (x,))
    assert fused_ops == 1
    with torch.no_grad():
        assert rel_err(folded_conv(x), bn(conv(x))) < TOL
    # the fold itself: the op's dtype, and W' stored as the op stores it
    fold = Fold(conv, bn, impl, layout, dtype=torch.float16)
    decomposed_fold, _ = _decomposed(fold, (x,))
    weight, bias = decomposed_fold(x)
    expected_weight, expected_bias = fold(x)
    assert weight.dtype == bias.dtype == torch.float16
    assert weight.stride() == expected_weight.stride()
    assert rel_err(weight, expected_weight) < 1e-3 and rel_err(bias, expected_bias) < 1e-3  # fp16 roundings


def test_decompose_refuses_batch_statistics_with_a_clear_error():
    block = resfuse.BasicBlock(8, 8).train()
    ep = torch.export.export(block, (randn(2, 8, 6, 6, seed=8),))
    with pytest.raises(RuntimeError, match=r"still calls resfuse::bn_act.*training mode.*model\.eval\(\)"):
        resfuse.export.decompose(ep)


# ---------------------------------------------------------------------------------------------------------------
# The SE / ECA tail in eval: block_tail's one bn_scale_act call, its squeeze and gate in torch ops


def test_every_flavour_of_every_op_has_a_decomposition_or_is_training_only():
    # a flavour missing from resfuse/export/flavours.py would stop the export of a model that calls it
    assert ops_left_out_of(resfuse.export.decomposition_table()) == []


@pytest.fixture(scope="module")
def exported_tail(tmp_path_factory):
    """The README's export snippets run on an SE tail with the C++ op (what a CPU model calls): (its eager
    twin, folder with both packages, the exported program)."""
    tail = SETail("cuda").eval()
    folder = tmp_path_factory.mktemp("aoti_tail")
    return EagerTail(tail), folder, _build_packages(tail, randn(2, 3, 16, 16, seed=1), folder)


@pytest.mark.parametrize("package, import_resfuse", [("model.pt2", False), ("model_resfuse.pt2", True)])
def test_packages_of_an_se_block_tail_serve(exported_tail, package, import_resfuse):
    eager, folder, ep = exported_tail
    assert resfuse_op_count(ep.graph) == 1
    served = serve(readme_snippet(f'aoti_load_package("{package}")'), randn(3, 3, 16, 16, seed=3), folder)
    assert served.returncode == 0, served.stderr[-3000:]
    assert f"resfuse imported: {import_resfuse}" in served.stdout
    with torch.no_grad():
        _check_served(eager, folder)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bn, gate, residual, relu", [("running", True, True, True), ("plain", False, True, True),
                                                      ("folded", True, False, False)])
def test_decomposition_of_bn_scale_act(bn, gate, residual, relu, backend):
    tail = SETail(backend, bn=bn, gate=gate, residual=residual, relu=relu).eval()
    x = randn(2, 3, 7, 5, seed=13)
    module, fused_ops = _decomposed(tail, (x,))
    assert fused_ops == 1
    with torch.no_grad():
        assert rel_err(module(x), tail.eager(x)) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_decomposition_of_bn_scale_act_keeps_the_op_dtypes_and_layout(dtype):
    # the op computes in float32 (float64 for float64) from statistics and a scale in float32, and writes the
    # input's dtype and memory format
    n, c = 2, 6
    x = randn(n, c, 5, 7, seed=14, dtype=dtype, memory_format=torch.channels_last)
    residual = randn(n, c, 5, 7, seed=15, dtype=dtype, memory_format=torch.channels_last)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    mean, weight, bias = (randn(c, seed=s, dtype=stats) for s in (16, 17, 18))
    invstd, scale = randn(c, seed=19, dtype=stats).abs() + 0.2, randn(n, c, seed=20, dtype=stats).sigmoid()
    module, _ = _decomposed(ScaleAct("cuda"), (x, mean, invstd, weight, bias, scale, residual))
    out = module(x, mean, invstd, weight, bias, scale, residual)
    expected = resfuse.ops.bn_scale_act(x, weight, bias, mean, invstd, scale, residual, backend="cuda")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < (1e-3 if dtype == torch.float16 else 1e-12)  # float16: one rounding each


def test_decompose_of_a_small_converted_seresnext():
    # timm's SE blocks converted end in bn_scale_act in eval (one per block), which decompose() writes as ATen
    # ops. Stage widths cut 4x as in tests/test_timm_resnet.py, 64 px.
    x = randn(2, 3, 64, 64, seed=0)
    eager, converted, ops = small_converted_seresnext(x)
    module, fused_ops = _decomposed(converted, (x,))
    assert fused_ops == sum(ops.values())
    with torch.no_grad():
        assert rel_err(module(x), eager(x)) < TOL


@pytest.mark.parametrize("bn", ["running", "batch"])  # training mode; eval without running statistics
def test_decompose_refuses_batch_statistics_of_a_block_tail_with_a_clear_error(bn):
    tail = SETail("cuda", bn=bn).train(bn == "running")
    ep = torch.export.export(tail, (randn(2, 3, 6, 6, seed=8),))
    with pytest.raises(RuntimeError, match=r"still calls resfuse::bn_squeeze.*training mode.*model\.eval\(\)"):
        resfuse.export.decompose(ep)


@pytest.mark.cuda
@pytest.mark.parametrize("decompose", [True, False])
def test_packages_on_gpu(decompose, tmp_path):
    # Unverified here (no GPU on the machine these tests were written on). fp32 without TF32, against eager.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    eager, converted = eager_and_converted(_SmallResNet())
    eager, converted = eager.cuda(), converted.cuda()
    x = randn(2, 3, 32, 32, seed=1, device="cuda")
    ep = torch.export.export(converted, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert resfuse_op_count(ep.graph) == FUSED_OPS
    program = resfuse.export.decompose(ep) if decompose else ep
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    served = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for batch in (1, 3):
            xb = randn(batch, 3, 32, 32, seed=batch, device="cuda")
            assert rel_err(served(xb), eager(xb)) < TOL, batch
