"""`pyprune-fast prune` of a model that is not a causal LM over several processes (torchrun): the
calibration batches are shared out among the ranks, every criterion sums its statistics over them,
rank 0 evaluates and writes the one result. Scores equal one process's up to the order of the
floating-point additions (bit for bit where nothing is summed); a rank that fails makes every rank
raise; too few batches for the ranks is refused on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from pyprune_fast import criteria, load_masks
from pyprune_fast.app import cli, runner
from pyprune_fast.distributed import Communicator
from tests import cli_factory
from tests.worlds import run_world

BATCHES = 5  # shared 3 + 2 by two ranks, 2 + 2 + 1 by three
ARGS = ["--model", "tests.cli_factory:tiny", "--criterion", "snip", "magnitude", "--sparsity", "0.5", "--batches", "4"]
ARGS += ["--quiet"]


def _scores(rank: int, world: int):
    bundle = cli_factory.tiny()
    comm = Communicator(dist.group.WORLD)
    for name in sorted(criteria.CRITERIA):
        if name != "bn_scale":  # the MLP has no BatchNorm
            yield name, lambda n=name: runner.score_criterion(bundle, n, BATCHES, comm)


def _prune(rank: int, world: int):
    def run(names, granularity, sparsities, bundle=None, batches=BATCHES):
        kept = {}
        run = runner.prune(
            bundle or cli_factory.tiny(),
            names,
            sparsities,
            granularity,
            batches,
            on_masks=lambda result, keep, model: kept.update({(result.criterion, result.sparsity): keep}),
            group=dist.group.WORLD,
        )
        return None if run is None else ([(r.criterion, r.sparsity, r.achieved, r.metrics) for r in run.results], kept)

    yield "weights", lambda: run(["magnitude", "snip", "refer"], "global", [0.5, 0.9])
    yield "channels", lambda: run(["apoz", "taylor"], "channel", [0.25])

    def failing():
        bundle = cli_factory.tiny()
        evaluate = bundle.evaluate
        calls = []

        def fail_second(model):  # rank 0 evaluates: the dense model, then fails on the first pruned one
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("disk full")
            return evaluate(model)

        bundle.evaluate = fail_second
        return run(["snip", "obd"], "global", [0.5], bundle)

    yield "failing", failing
    yield "few", lambda: run(["snip"], "global", [0.5], batches=world - 1)


JOBS = {"scores": _scores, "prune": _prune}


@pytest.mark.parametrize("world", [2, 3])
def test_every_criterion_over_ranks_scores_like_one_process(tmp_path, world):
    ranks = run_world(__name__, "scores", world, tmp_path)
    bundle = cli_factory.tiny()
    for name, got in ranks[0].items():
        assert all(r[name][0] == "ok" for r in ranks), (name, [r[name] for r in ranks])
        want = runner.score_criterion(bundle, name, BATCHES)
        assert list(got[1]) == list(want), name
        for key, w in want.items():
            for r in ranks[1:]:
                assert torch.equal(r[name][1][key], got[1][key]), (name, key)  # every rank the same scores
            # the ranks' partial sums are added together instead of batch after batch: fp32 rounding
            torch.testing.assert_close(got[1][key], w, rtol=1e-5, atol=1e-6 * float(w.abs().max())), (name, key)


def test_prune_over_two_ranks_rank0_reports_what_one_process_gets(tmp_path):
    ranks = run_world(__name__, "prune", 2, tmp_path)
    for case, names, granularity, sparsities in [
        ("weights", ["magnitude", "snip", "refer"], "global", [0.5, 0.9]),
        ("channels", ["apoz", "taylor"], "channel", [0.25]),
    ]:
        assert ranks[1][case] == ("ok", None), case  # the other rank scores along and reports nothing
        status, (results, kept) = ranks[0][case]
        assert status == "ok"
        want: dict = {}

        def collect(result, keep, model, into=want):
            into[(result.criterion, result.sparsity)] = keep

        single = runner.prune(cli_factory.tiny(), names, sparsities, granularity, BATCHES, on_masks=collect)
        assert [(r[0], r[1], r[2]) for r in results] == [(r.criterion, r.sparsity, r.achieved) for r in single.results]
        for key, masks in want.items():
            for name, m in masks.items():
                agree = float((kept[key][name] == m).float().mean())
                assert agree == 1.0 or (key[0] != "magnitude" and agree > 0.97), (case, key, name, agree)


def test_a_failure_on_rank0_makes_both_raise_and_too_few_batches_is_refused_on_both(tmp_path):
    ranks = run_world(__name__, "prune", 2, tmp_path)
    assert ranks[0]["failing"][:2] == ("error", "RuntimeError") and "disk full" in ranks[0]["failing"][2]
    assert ranks[1]["failing"][:2] == ("error", "RankFailed") and "disk full" in ranks[1]["failing"][2]
    for r in ranks:
        assert r["few"][:2] == ("error", "ValueError") and "cannot be shared by 2 processes" in r["few"][2]


def _torchrun(*args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([*command, "-m", "pyprune_fast", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torchrun_prunes_a_model_that_is_not_a_causal_lm_and_writes_one_result(tmp_path):
    stdout = _torchrun("prune", *ARGS, "--out", str(tmp_path / "two"))
    assert stdout.count("wrote ") == 1  # rank 0 reports and writes; the other rank scores along
    assert cli.main(["prune", *ARGS, "--out", str(tmp_path / "one")]) == 0
    with open(tmp_path / "two" / "report.json") as f:
        two = json.load(f)
    with open(tmp_path / "one" / "report.json") as f:
        one = json.load(f)
    assert [r["criterion"] for r in two["results"]] == ["snip", "magnitude"]
    assert [r["achieved_sparsity"] for r in two["results"]] == [r["achieved_sparsity"] for r in one["results"]]
    for name in ("masks-magnitude-0.5.safetensors", "masks-snip-0.5.safetensors"):
        got, want = load_masks(tmp_path / "two" / name), load_masks(tmp_path / "one" / name)
        for key, m in want.items():
            agree = float((got[key] == m).float().mean())
            assert agree == 1.0 or ("snip" in name and agree > 0.97), (name, key, agree)


def test_torchrun_score_writes_the_scores_of_all_batches_once(tmp_path, capsys):
    from safetensors.torch import load_file

    args = ["--model", "tests.cli_factory:tiny", "--criterion", "snip", "--batches", "4", "--quiet"]
    stdout = _torchrun("score", *args, "--out", str(tmp_path / "two"))
    assert stdout.count("scores-snip.safetensors") == 1  # rank 0's table only
    assert cli.main(["score", *args, "--out", str(tmp_path / "one")]) == 0
    got, want = (load_file(tmp_path / d / "scores-snip.safetensors") for d in ("two", "one"))
    assert list(got) == list(want)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
