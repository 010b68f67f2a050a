"""`pyprune-fast bench` end to end: every registered workload at several scales (shapes rounded to what
each implementation takes), and a failing workload reported in the table while the others run."""

import pytest
import torch

from pyprune_fast.app import cli
from pyprune_fast.bench import harness, registry, sparse24


def table(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if line.startswith(name + " ")]


@pytest.mark.parametrize("scale", [0.003, 0.02])  # both failed before (compress_24's 2:4 rows: 16 and 80)
def test_the_quick_bench_runs_every_workload(capsys, scale):
    rc = cli.main(["bench", "--scale", str(scale), "--repeats", "1", "--device", "cpu", "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0, "\n".join(lines)
    assert not [line for line in lines if "failed" in line]
    for name in registry.WORKLOADS:
        rows = table(lines, name)
        assert len(rows) >= 2 and " ours " in rows[0], rows
        assert all(row.rstrip().endswith("x") for row in rows[1:]), rows
    assert f"scale {scale:g}, median of 1" in lines[-1]


@pytest.mark.parametrize("scale", [0.1, 0.2, 0.013, 0.37, 1e-4])
def test_compress_shapes_suit_ours_and_torchs_cutlass_conversion_at_any_scale(scale):
    rows = [harness.scaled(o, scale, sparse24.COMPRESS_ROW_MULTIPLE) for o, _ in sparse24.SPARSE24_SHAPES["llama_7b"]]
    assert all(r % 32 == 0 and r >= 32 for r in rows)
    if scale in (0.1, 0.2):  # the README's default scale and the next one: run both implementations once
        case = sparse24.compress_case("llama_7b", scale=scale)
        assert [t.error for t in harness.time_case(case, repeats=1, warmup=0, keep_going=True)] == [None, None]


def test_scaled_rounds_down_to_the_multiple_and_keeps_one():
    assert harness.scaled(4096, 0.1, 32) == 384 and harness.scaled(11008, 0.1, 32) == 1088
    assert harness.scaled(4096, 1.0, 32) == 4096 and harness.scaled(4096, 1e-6, 32) == 32
    assert harness.scaled(768, 0.5) == 384 and harness.scaled(3, 0.01) == 1
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        harness.scaled(8, 0.5, 0)


def test_a_failing_workload_is_reported_and_the_others_still_run(capsys, monkeypatch):
    x = torch.arange(10.0)

    def fine(device="cpu", scale=1.0):
        return harness.Case(group="fine", ours=lambda: x.sum(), baselines={"python sum": lambda: sum(x.tolist())})

    def broken_build(device="cpu", scale=1.0):
        raise RuntimeError("Number of rows of dense matrix 400 must be divisible by 32\nsecond line")

    def broken_baseline(device="cpu", scale=1.0):
        return harness.Case(group="b", ours=lambda: x.sum(), baselines={"bad": lambda: 1 / 0, "ok": lambda: x.sum()})

    for name, factory in (("toy fine", fine), ("toy broken", broken_build), ("toy bad baseline", broken_baseline)):
        monkeypatch.setitem(registry.WORKLOADS, name, factory)
    argv = ["bench", "--only", "toy broken", "toy fine", "toy bad baseline", "--repeats", "1", "--quiet"]
    assert cli.main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    assert table(lines, "toy broken")[0].endswith(
        "failed: RuntimeError: Number of rows of dense matrix 400 must be divisible by 32"
    )
    assert len(table(lines, "toy fine")) == 2 and table(lines, "toy fine")[1].rstrip().endswith("x")
    bad = table(lines, "toy bad baseline")
    assert " ours " in bad[0] and bad[1].endswith("failed: ZeroDivisionError: division by zero") and "ok" in bad[2]
    assert lines[-1] == "2 of 3 workloads failed: toy broken, toy bad baseline"


def test_time_case_raises_unless_asked_to_keep_going():
    case = harness.Case(group="g", ours=lambda: 1, baselines={"bad": lambda: 1 / 0})
    with pytest.raises(ZeroDivisionError):
        harness.time_case(case, repeats=1)
    timings = harness.time_case(case, repeats=1, keep_going=True)
    assert timings[0].error is None and timings[1].error == "ZeroDivisionError: division by zero"
