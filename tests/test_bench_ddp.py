"""``torchrun -m resfuse.bench --ddp`` runs: 2 CPU processes (gloo), tiny sizes, one timed step. A smoke run so
the mode cannot rot: on CPU torch's SyncBatchNorm (eager) is skipped with its reason, and resfuse's synchronised
step runs without the DDP wrapper (DDP refuses SyncBatchNorm in CPU modules)."""
import json
import os
import subprocess
import sys


def test_ddp_mode_runs_under_torchrun_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "resfuse.bench", "--ddp", "--batch", "2", "--model-batch", "2", "--resolution",
                          "32", "--repeats", "1", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads((tmp_path / "ddp-2xcpu.json").read_text())
    assert [(r["problem"], r["provider"]) for r in data["rows"]] == [("basicblock_C64_H56", "resfuse (no DDP)"),
                                                                     ("resnet50", "resfuse (no DDP)")]
    assert all(r["ms"] > 0 for r in data["rows"])
    assert {s["provider"] for s in data["skipped"]} == {"eager"}
    assert "unfused" not in run.stderr, run.stderr
