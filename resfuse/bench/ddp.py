"""``torchrun --nproc_per_node=N -m resfuse.bench --ddp``: a training step per GPU under DistributedDataParallel
with ``nn.SyncBatchNorm``, torch's (eager) against resfuse's (the same model after ``resfuse.convert``).

Problems: a SyncBN BasicBlock step (ResNet-18's layer1 block, C64_H56: forward, a loss, backward) and a
resnet50 step (forward, cross-entropy, backward, SGD step). Every rank times its own step (CUDA events on a GPU;
the steps of the two providers alternate, one warm-up call each first); the table shows, per problem and
provider, the median over repeats of the slowest rank's time and images/s per GPU, as DDP runs at the pace of
its slowest rank. Rank 0 prints it and, with ``--out``, writes it as JSON.

On CPU (gloo; a smoke run, never a measurement) torch's SyncBatchNorm refuses CPU tensors and DDP refuses
SyncBatchNorm in a CPU module: eager is skipped with that reason and resfuse's step runs without the DDP
wrapper (its BatchNorm still synchronised over the ranks), labelled so.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import resfuse

from .timing import synchronize


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m resfuse.bench --ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda", help="resfuse's backend (default: cuda)")
    p.add_argument("--batch", type=int, default=None, help="BasicBlock batch per GPU (default: 64 GPU, 2 CPU)")
    p.add_argument("--model-batch", type=int, default=None, help="resnet50 batch per GPU (default: 64 GPU, 2 CPU)")
    p.add_argument("--resolution", type=int, default=None, help="resnet50 input size (default: 224 GPU, 64 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per provider (default: 50 GPU, 2 CPU)")
    p.add_argument("--out", default=None, help="folder for ddp-<world>x<device>.json (rank 0 writes it)")
    return p.parse_args(argv)


def _block() -> nn.Module:
    return torchvision.models.resnet.BasicBlock(64, 64)


def _problems(args, device: torch.device) -> dict[str, tuple[Callable[[], nn.Module], tuple, bool]]:
    """name -> (model factory, input shape per rank, classifier: cross-entropy + SGD step)."""
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 2)
    model_batch = args.model_batch or (64 if gpu else 2)
    size = args.resolution or (224 if gpu else 64)
    return {"basicblock_C64_H56": (_block, (batch, 64, 56 if gpu else 16, 56 if gpu else 16), False),
            "resnet50": (torchvision.models.resnet50, (model_batch, 3, size, size), True)}


def _step_fn(model: nn.Module, shape: tuple, classifier: bool, device: torch.device) -> Callable[[], None]:
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (shape[0],), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3) if classifier else None
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
            loss = F.cross_entropy(out, y) if classifier else out.float().square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def _providers(factory, args, device: torch.device) -> tuple[dict[str, nn.Module], dict[str, str]]:
    torch.manual_seed(0)
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(factory()).to(device, memory_format=torch.channels_last)
    ours = resfuse.convert(copy.deepcopy(eager), backend=args.backend)
    if device.type == "cuda":
        wrap = lambda m: DistributedDataParallel(m, device_ids=[device.index])  # noqa: E731
        return {"eager": wrap(eager), "resfuse": wrap(ours)}, {}
    return {"resfuse (no DDP)": ours}, {"eager": "torch's SyncBatchNorm refuses CPU tensors"}


def _time_steps(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """ms per step of each provider, alternating providers step by step after one warm-up call each."""
    for step in steps.values():
        step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            dist.barrier()  # every rank starts the step together: a collective waits for the slowest
            synchronize(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("--ddp runs under torchrun: torchrun --nproc_per_node=N -m resfuse.bench --ddp")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (50 if cuda else 2)
    world, rank = dist.get_world_size(), dist.get_rank()
    rows, skipped = [], []
    for name, (factory, shape, classifier) in _problems(args, device).items():
        models, skips = _providers(factory, args, device)
        skipped += [dict(problem=name, provider=p, reason=r) for p, r in skips.items()]
        steps = {p: _step_fn(m, shape, classifier, device) for p, m in models.items()}
        mine = _time_steps(steps, repeats, device)
        every = [None] * world
        dist.all_gather_object(every, mine)
        for provider in steps:
            slowest = [max(r[provider][i] for r in every) for i in range(repeats)]
            ms = statistics.median(slowest)
            rows.append(dict(problem=name, provider=provider, ms=ms, images_per_s_per_gpu=shape[0] / ms * 1e3,
                             batch_per_gpu=shape[0]))
    if rank == 0:
        kind = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"DDP, {world} x {kind}, nn.SyncBatchNorm, median of {repeats} steps of the slowest rank")
        for r in rows:
            print(f"  {r['problem']:<20} {r['provider']:<16} {r['ms']:9.2f} ms  {r['images_per_s_per_gpu']:9.1f} "
                  f"img/s per GPU (batch {r['batch_per_gpu']})")
        for s in skipped:
            print(f"  {s['problem']:<20} {s['provider']:<16} skipped: {s['reason']}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"ddp-{world}x{kind.replace(' ', '-').lower()}.json")
            with open(path, "w") as f:
                json.dump(dict(world_size=world, device=kind, torch=torch.__version__, repeats=repeats, rows=rows,
                               skipped=skipped), f, indent=1)
            print(f"wrote {path}")
    dist.destroy_process_group()
    return 0
