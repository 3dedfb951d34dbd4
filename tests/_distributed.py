"""Multi-process tests on CPU: a gang of spawned processes joined in one gloo process group on 127.0.0.1.

Spawning a process and importing torch in it takes seconds on a small machine, so a gang is started once per
test module and world size (the ``gang`` fixtures of the test files) and runs many tests: ``gang.run(fn, *args)``
calls the module-level function ``fn(rank, world_size, *args)`` on every rank at once and returns the ranks'
results in rank order. An exception on any rank fails the test with that rank's traceback; a rank that does not
answer within the timeout (a collective that never completes) fails it too, and the gang is stopped.
"""
from __future__ import annotations

import datetime
import multiprocessing
import time
from multiprocessing.connection import wait
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

_TIMEOUT_S = 120.0


def _worker(rank: int, world_size: int, port: int, conn) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                          timeout=datetime.timedelta(seconds=_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=_TIMEOUT_S))
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            fn, args = job
            try:
                conn.send(("ok", fn(rank, world_size, *args)))
            except BaseException:  # noqa: BLE001 - the parent re-raises it with this traceback
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Gang:
    """``world_size`` spawned processes in one gloo group; ``run`` a function on all of them."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = multiprocessing.get_context("spawn")
        # The parent holds the store (port 0: the system picks a free one); the ranks connect to it.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=_TIMEOUT_S))
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, self._store.port, child), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    def run(self, fn: Callable, *args: Any, timeout: float = _TIMEOUT_S) -> list:
        """``[fn(rank, world_size, *args) for every rank]``, run at once on the ranks."""
        if not self._procs:
            raise RuntimeError("this gang was stopped after an earlier test left a rank hanging")
        for conn in self._conns:
            conn.send((fn, args))
        answers: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            pending = [conn for rank, conn in enumerate(self._conns) if rank not in answers]
            # Once a rank has failed, the others may wait forever in a collective it never joined.
            failed = any(status == "error" for status, _ in answers.values())
            left = min(deadline - time.monotonic(), 10.0 if failed else timeout)
            ready = wait(pending, timeout=max(left, 0.0))
            if not ready:
                self.close(force=True)
                silent = [rank for rank in range(self.world_size) if rank not in answers]
                errors = _errors(answers)
                raise TimeoutError(f"ranks {silent} gave no answer running {fn.__name__} (a collective that some "
                                   f"rank did not join?); the gang is stopped" + (f"\n{errors}" if errors else ""))
            for conn in ready:
                answers[self._conns.index(conn)] = conn.recv()
        errors = _errors(answers)
        if errors:
            raise RuntimeError(f"{fn.__name__} failed:\n{errors}")
        return [answers[rank][1] for rank in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        for conn, proc in zip(self._conns, self._procs):
            if not force and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
            proc.join(timeout=0 if force else 30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []


def _errors(answers: dict) -> str:
    return "\n".join(f"--- rank {rank} ---\n{value}" for rank, (status, value) in sorted(answers.items())
                     if status == "error")
