"""Spawned gloo worlds for the distributed tests: 2-4 local processes (a 30 s process-group timeout
unless a test asks for another) each run every case of a job and save what they got (a value, or the
error they raised); a world that does not finish within WALL_CLOCK_S has hung and fails the test."""

from __future__ import annotations

import datetime
import importlib
import os
import pathlib
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WALL_CLOCK_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, job: str, out_dir: str, timeout_s: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    results: dict = {}
    try:
        for name, run in importlib.import_module(module).JOBS[job](rank, world):
            try:
                results[name] = ("ok", run())
            except Exception as error:  # recorded: the tests check who raised what
                results[name] = ("error", type(error).__name__, str(error))
    except Exception:
        results["__crash__"] = ("error", "crash", traceback.format_exc())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_world(module: str, job: str, world: int, tmp: pathlib.Path, timeout_s: float = 30) -> list[dict]:
    """Runs `module`.JOBS[job](rank, world) — pairs (case name, callable) — on `world` spawned gloo
    ranks; every rank's {case name: ("ok", value) | ("error", type, message)}, in rank order.
    `timeout_s`: the process-group timeout, after which a rank left waiting in a collective raises (a
    small one makes a test of a would-be hang fail in seconds)."""
    out = tmp / f"{job}-{world}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, module, job, str(out), timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WALL_CLOCK_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of the {job} world did not finish in {WALL_CLOCK_S} s"
    results = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    for r, res in enumerate(results):
        assert "__crash__" not in res, f"rank {r}: {res['__crash__']}"
    return results
