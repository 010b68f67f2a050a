"""The LLM block pipeline over 2 gloo ranks (calibration sequences split, statistics summed, SparseGPT
solves spread over the ranks): every rank ends with the same model, equal to one process's up to the
order of the floating-point additions; bit for bit where nothing is summed (magnitude); a rank that
fails makes both raise; disk streaming over ranks writes one checkpoint."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pyprune_fast import llm
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_pipeline import BATCH, N_SAMPLES, SEQ_LEN, block_weights, calibration
from tests.worlds import run_world

OPTIONS = {"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "batch_size": BATCH, "progress": False}
CASES = [
    ("magnitude", 0.5, {}),
    ("wanda", 0.5, {}),
    ("sparsegpt", 0.5, {}),
    ("sparsegpt", "2:4", {}),
    ("snip", 0.5, {}),
    ("wanda", 0.6, {"granularity": "global"}),
    ("wanda", 0.5, {"owl": llm.OWL(M=2.0, lam=0.05)}),
]


def pruned(method, sparsity, extra, group=None):
    model = tiny_causal_lm("qwen2")
    llm.prune(model, calibration(), method=method, sparsity=sparsity, group=group, **OPTIONS, **extra)
    return block_weights(model)


def _job(rank: int, world: int):
    for method, sparsity, extra in CASES:
        yield (
            f"{method}/{sparsity}/{sorted(extra)}",
            lambda m=method, s=sparsity, e=extra: {
                n: w.detach().clone() for n, w in pruned(m, s, e, dist.group.WORLD).items()
            },
        )
    # a bad argument on one rank only: both raise, neither hangs
    yield "bad", lambda: pruned("wanda", 0.5 if rank == 0 else 1.5, {}, dist.group.WORLD)
    # too few sequences for the ranks
    model = tiny_causal_lm("qwen2")
    yield "few", lambda: llm.prune(model, calibration(), method="wanda", group=dist.group.WORLD,
                                   num_samples=1, seq_len=SEQ_LEN, progress=False)  # fmt: skip


def _disk_job(rank: int, world: int):
    import os

    root = os.environ["PYPRUNE_TEST_DIR"]
    yield "disk", lambda: llm.prune(f"{root}/dense", calibration(), method="sparsegpt", offload="disk",
                                    out=f"{root}/pruned", group=dist.group.WORLD, **OPTIONS).resumed_blocks  # fmt: skip


JOBS = {"prune": _job, "disk": _disk_job}


def test_pruning_over_two_ranks_equals_one_process(tmp_path):
    ranks = run_world(__name__, "prune", 2, tmp_path)
    for method, sparsity, extra in CASES:
        name = f"{method}/{sparsity}/{sorted(extra)}"
        got = [r[name] for r in ranks]
        assert all(g[0] == "ok" for g in got), (name, got)
        want = pruned(method, sparsity, extra)
        for key, w in want.items():
            assert torch.equal(got[0][1][key], got[1][1][key]), (name, key)  # the same model on every rank
            mine = got[0][1][key]
            if method == "magnitude":
                assert torch.equal(mine, w), (name, key)
                continue
            agree = float(((mine == 0) == (w == 0)).float().mean())
            assert agree > 0.99, (name, key, agree)  # masks: equal but for near-ties of reassociated sums
            assert int((mine == 0).sum()) == int((w == 0).sum()) or extra, (name, key)
            both = (mine != 0) & (w != 0)
            torch.testing.assert_close(mine[both], w[both], rtol=1e-3, atol=1e-4)


def test_a_failing_rank_makes_every_rank_raise(tmp_path):
    ranks = run_world(__name__, "prune", 2, tmp_path)
    assert ranks[1]["bad"][:2] == ("error", "ValueError") and "sparsity" in ranks[1]["bad"][2]
    assert ranks[0]["bad"][:2] == ("error", "RankFailed") and "sparsity" in ranks[0]["bad"][2]
    for r in ranks:
        assert r["few"][:2] == ("error", "ValueError") and "shared by 2 ranks" in r["few"][2]


def test_disk_streaming_over_two_ranks_writes_one_checkpoint(tmp_path, monkeypatch):
    from tests.test_llm_offload import load

    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    monkeypatch.setenv("PYPRUNE_TEST_DIR", str(tmp_path))
    ranks = run_world(__name__, "disk", 2, tmp_path)
    assert [r["disk"] for r in ranks] == [("ok", 0), ("ok", 0)]
    llm.prune(model, calibration(), method="sparsegpt", **OPTIONS)
    got = block_weights(load(tmp_path / "pruned"))
    for key, w in block_weights(model).items():
        assert float(((got[key] == 0) == (w == 0)).float().mean()) > 0.99, key
