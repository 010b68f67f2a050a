"""The end-to-end criteria benchmark at a tiny scale: the hand-written versions compute what ours
computes (so that the timings compare the same formula), and a workload runs in `pyprune-fast bench`."""

import pytest
import torch

from pyprune_fast.app import cli
from pyprune_fast.bench import e2e, harness, registry

SCALE = 0.1  # ViT: 1 layer, width 64, 16 x 16 images (one patch); MiniLM: 2 of its 16 passages (its least)
_WORKLOADS = {}


def workload(name):
    if name not in _WORKLOADS:
        _WORKLOADS[name] = e2e.WORKLOADS[name](scale=SCALE)
    return _WORKLOADS[name]


@pytest.mark.parametrize(("workload_name", "name"), [(w, n) for w in e2e.WORKLOADS for n in e2e.workload_criteria(w)])
def test_hand_written_versions_compute_our_scores(workload_name, name):
    w = workload(workload_name)
    ours = e2e.ours(w, name)
    hand = e2e.HAND_WRITTEN[name](w)
    assert list(ours) == list(hand)
    for n in ours:
        expected = hand[n].float()
        atol = 1e-4 * max(expected.abs().max().item(), 1e-12)  # fp32 rounding through 6 pretrained layers
        torch.testing.assert_close(ours[n], expected, rtol=2e-3, atol=atol, msg=f"{name} {n}")


def test_the_e2e_workloads_are_in_the_bench_and_interleaved(capsys):
    names = [n for n in registry.WORKLOADS if n.startswith("criterion ")]
    assert {n.split()[1] for n in names} == set(e2e.HAND_WRITTEN)
    assert {n.split()[2] for n in names} == set(e2e.WORKLOADS)
    assert len(names) == sum(len(e2e.workload_criteria(w)) for w in e2e.WORKLOADS)
    order = []
    case = harness.Case("g", ours=lambda: order.append("ours"), baselines={"b": lambda: order.append("b")})
    harness.time_case(case, repeats=2, warmup=1)
    assert order == ["ours", "b", "ours", "b", "b", "ours"]  # warm-up, then rounds in alternating order
    assert (
        cli.main(["bench", "--only", "criterion snip ViT-B/16", "--scale", "0.003", "--repeats", "1", "--quiet"]) == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("criterion snip ViT-B/16 ")]
    assert len(rows) == 2 and " ours " in rows[0] and "hand-written" in rows[1] and rows[1].rstrip().endswith("x")
