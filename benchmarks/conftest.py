"""The pytest-benchmark side of the benchmark suite: timing ours and each baseline of a
pyprune_fast.bench case in the same run, and the ratio table printed at the end
(`pytest benchmarks/ --benchmark-only`). The timing helpers themselves live in pyprune_fast.bench.harness."""

import platform
from collections import defaultdict

import pytest
import torch

from pyprune_fast.bench.harness import peak_extra_bytes, ratio_table, sync

_ROWS: dict[str, dict[str, float]] = defaultdict(dict)
_MEMORY: dict[str, dict[str, int]] = defaultdict(dict)


def run_case(benchmark, case, impl: str, device: str = "cpu", rounds: int = 5, memory: bool = False):
    """Times one implementation of a bench.harness.Case with pytest-benchmark (median of `rounds` after a
    warm-up); with memory=True also records the peak extra resident memory of one more call."""
    fn = case.ours if impl == "ours" else case.baselines[impl]

    def call():
        out = fn()
        sync(device)
        return out

    benchmark.group = case.group
    benchmark.extra_info.update({"impl": impl, "elements": case.elements, "bytes": case.bytes_moved, **case.extra})
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: each call ran once as a test, nothing was timed
        return
    _ROWS[case.group][impl] = benchmark.stats.stats.median
    if memory and device == "cpu":
        extra = peak_extra_bytes(call)
        benchmark.extra_info["peak_extra_mb"] = extra / 2**20
        _MEMORY[case.group][impl] = extra


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.section(
        f"pyprune_fast ratios (median time; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    for line in ratio_table(_ROWS, _MEMORY):
        terminalreporter.write_line(line)


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return "cuda"
