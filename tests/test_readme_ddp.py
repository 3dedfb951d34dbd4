"""The README's DDP recipe runs as written: torchrun with 2 processes on CPU (gloo), the sizes made small through
the environment variables the recipe reads."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def recipe() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training on many GPUs"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_torchrun_recipe_trains_on_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(recipe())
    env = dict(os.environ, ARCH="resnet18", BATCH="3", IMAGE="32", STEPS="2", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="always")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [float(v) for v in re.findall(r"^step \d+ loss (\S+)$", run.stdout, re.M)]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses), run.stdout
    # Every block and the stem fused, and nothing fell back to the modules' eager path.
    assert "8 blocks fused (8 BasicBlock), 1 ResNet stem fused" in run.stderr, run.stderr
    assert "unfused" not in run.stderr, run.stderr
