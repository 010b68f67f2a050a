"""Criteria end to end on ViT-B/16 (random weights, batch 8), the default MiniLM (its first
calibration batch) and ResNet-18 (batch 8, the BatchNorm criterion): `ppf.score` against the hand-written
version of each criterion, time (median of 3 after a warm-up) and peak extra resident memory, ours
and the hand-written version back to back in one process on the same model and batch
(`pyprune-fast bench --only "criterion NAME ViT-B/16"` alternates them round by round).
PYPRUNE_FAST_E2E_SCALE (default 1) shrinks the workloads on a slow machine (see bench.e2e)."""

import os

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench import e2e

SCALE = float(os.environ.get("PYPRUNE_FAST_E2E_SCALE", "1"))
_CACHE = {}


def case(workload, name):
    if (workload, name) not in _CACHE:
        _CACHE.clear()  # one model in memory at a time
        _CACHE[workload, name] = e2e.criterion_case(name, workload, scale=SCALE)
    return _CACHE[workload, name]


@pytest.mark.parametrize("impl", ["ours", "hand-written"])
@pytest.mark.parametrize(("workload", "name"), [(w, n) for w in e2e.WORKLOADS for n in e2e.workload_criteria(w)])
def test_criterion_end_to_end(benchmark, workload, name, impl):
    run_case(benchmark, case(workload, name), impl, rounds=3, memory=True)
