"""One exact global threshold over scores split across gloo ranks: ours (`masks.global_unstructured`
with `group=`, summed radix histograms) against what users do today (all_gather every rank's scores
to every rank, then the exact single-process selection, `ops.kth_smallest` + the threshold masks of
this rank's part: the fastest exact baseline, so the comparison isolates the communication).

Both run in the same spawned world; bytes are what each rank handed to collectives (`payload`) and
what a ring algorithm sends from each rank (`wire`: all_reduce 2(N-1)/N of the buffer, all_gather
(N-1) times this rank's part), tallied from the calls actually made."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["IMPLS", "measure"]

IMPLS = ("ours (radix histograms)", "all_gather scores + kth_smallest")


def _scores(rank: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    half = n // 2
    return {f"r{rank}.a": torch.randn(half, generator=g).abs_(), f"r{rank}.b": torch.rand(n - half, generator=g)}


def _baseline(scores: dict[str, torch.Tensor], sparsity: float, world: int) -> tuple[dict, int, int]:
    from .. import ops

    local = torch.cat([t.reshape(-1) for t in scores.values()]) if scores else torch.empty(0)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.numel()]))
    parts = [torch.empty(int(s), dtype=local.dtype) for s in sizes]
    dist.all_gather(parts, local)
    k = round(sparsity * sum(int(s) for s in sizes))
    value, counts = ops.select_counts(parts, k)
    # this rank's masks: entries below the value pruned, and the ties whose rank in the global flat
    # order is below k (the lower ranks' ties come first)
    lower_ties = sum(int((p == value).sum()) for p in parts[: dist.get_rank()])
    need = k - int(counts[0]) - lower_ties
    tensors = list(scores.values())
    less = sum(int((t < value).sum()) for t in tensors)
    equal = sum(int((t == value).sum()) for t in tensors)
    local_k = less + min(max(need, 0), equal)
    masks = ops.threshold_masks(tensors, value, torch.tensor([less, equal]), local_k)
    payload = 8 + local.numel() * local.element_size()
    return dict(zip(scores, masks)), payload, (world - 1) * payload


def _worker(rank: int, world: int, port: int, n: int, sparsity: float, repeats: int, out: str, impls) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )  # fmt: skip
    from .. import distributed

    scores = _scores(rank, n)
    result = {}
    for impl in impls:
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            if impl == IMPLS[0]:
                comm = distributed.Communicator(dist.group.WORLD)
                with comm.session():
                    tensors = list(scores.values())
                    got = distributed.global_threshold(comm, tensors, sparsity, list(scores))
                payload, wire = comm.payload_bytes, comm.wire_bytes
                got = dict(zip(scores, got))
            else:
                got, payload, wire = _baseline(scores, sparsity, world)
            times.append(time.perf_counter() - start)
        result[impl] = {"seconds": min(times), "payload_bytes": payload, "wire_bytes": wire}
        result[impl + " masks"] = got
    both = len(impls) > 1
    same = both and all(torch.equal(result[impls[0] + " masks"][n], result[impls[1] + " masks"][n]) for n in scores)
    if rank == 0:
        for impl in impls:
            del result[impl + " masks"]
        result["same_masks"] = same if both else None
        torch.save(result, out)
    dist.destroy_process_group()


def measure(total: int, world: int = 2, sparsity: float = 0.5, repeats: int = 1, impls=IMPLS) -> dict:
    """Spawns `world` gloo ranks holding total / world fp32 scores each and times one exact global
    threshold (masks of each rank's scores) with each of `impls` (default both); rank 0's seconds and
    bytes per impl, and whether both gave the same masks (None when only one ran: at 1 B scores the
    gathering baseline needs every score on every rank, more than this 24 GB machine holds for 2)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        ctx = mp.get_context("spawn")
        args = (world, port, total // world, sparsity, repeats, out, tuple(impls))
        procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a benchmark rank failed: exit codes {[p.exitcode for p in procs]}")
        return torch.load(out)
