"""Every argument check of a group= API runs inside the distributed session: a bad argument on one
rank makes every rank raise at once (the others RankFailed naming it), never leaves them waiting in a
collective until the process-group timeout. The worlds run with a 5 s timeout, so that a rank left
waiting shows up as a timeout error within seconds."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pyprune_fast import masks
from tests.worlds import run_world

TIMEOUT_S = 5


def _channel_scores(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {f"r{rank}.conv": torch.randn(8, generator=g)}


def _one_bad_rank_job(rank: int, world: int):
    good = _channel_scores(rank)
    world_group = dist.group.WORLD
    scope = "layers" if rank == 0 else "global"
    yield "channels_bad_scope", lambda: masks.channels(good, 0.5, scope, group=world_group)
    scope = "layer" if rank == 0 else "global"
    yield "channels_layer_scope_with_group", lambda: masks.channels(good, 0.5, scope, group=world_group)
    flat = {n: s.reshape(2, -1) for n, s in good.items()} if rank == 0 else good
    yield "channels_2d_scores", lambda: masks.channels(flat, 0.5, group=world_group)
    sparsity = 1.5 if rank == 0 else 0.5
    yield "channels_bad_sparsity", lambda: masks.channels(good, sparsity, group=world_group)
    yield "channels_still_work_after", lambda: masks.channels(good, 0.5, group=world_group)


JOBS = {"one_bad_rank": _one_bad_rank_job}


def test_a_bad_argument_on_one_rank_raises_on_every_rank_at_once(tmp_path):
    results = run_world(__name__, "one_bad_rank", 2, tmp_path, timeout_s=TIMEOUT_S)
    expected = {
        "channels_bad_scope": "scope must be 'global' or 'layer'",
        "channels_layer_scope_with_group": "group= needs scope='global'",
        "channels_2d_scores": "channel scores must be 1-D",
        "channels_bad_sparsity": "sparsity",
    }
    for case, message in expected.items():
        mine, other = results[0][case], results[1][case]
        assert mine[0] == "error" and mine[1] in ("ValueError", "TypeError") and message in mine[2], (case, mine)
        assert other[:2] == ("error", "RankFailed") and message in other[2], (case, other)
    for res in results:
        assert res["channels_still_work_after"][0] == "ok", res["channels_still_work_after"]
