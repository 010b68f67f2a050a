"""Criteria end to end on ViT-B/16 (random weights, batch 8): `ppf.score` against the hand-written
version of each criterion, time (median of 3 after a warm-up) and peak extra resident memory, ours
and the hand-written version back to back in one process on the same model and batch
(`pyprune-fast bench --only "criterion NAME ViT-B/16"` alternates them round by round).
PYPRUNE_FAST_E2E_SCALE (default 1) shrinks the model on a slow machine (see bench.e2e.vit)."""

import os

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench import e2e

SCALE = float(os.environ.get("PYPRUNE_FAST_E2E_SCALE", "1"))
_CACHE = {}


def case(name):
    if name not in _CACHE:
        _CACHE.clear()  # one model in memory at a time
        _CACHE[name] = e2e.criterion_case(name, scale=SCALE)
    return _CACHE[name]


@pytest.mark.parametrize("impl", ["ours", "hand-written"])
@pytest.mark.parametrize("name", sorted(e2e.HAND_WRITTEN))
def test_criterion_end_to_end(benchmark, name, impl):
    run_case(benchmark, case(name), impl, rounds=3, memory=True)
