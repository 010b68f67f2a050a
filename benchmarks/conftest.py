"""Shared pieces of the benchmark suite: timing ours and each baseline in the same run, and a ratio
table printed at the end (`pytest benchmarks/ --benchmark-only`)."""

import platform
from collections import defaultdict

import pytest
import torch

_ROWS: dict[str, dict[str, float]] = defaultdict(dict)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(benchmark, case, impl: str, device: str = "cpu"):
    """Times one implementation of a workloads.Case with pytest-benchmark."""
    fn = case.ours if impl == "ours" else case.baselines[impl]

    def call():
        out = fn()
        sync(device)
        return out

    benchmark.group = case.group
    benchmark.extra_info.update({"impl": impl, "elements": case.elements, "bytes": case.bytes_moved, **case.extra})
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    _ROWS[case.group][impl] = benchmark.stats.stats.median


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.section(
        f"pyprune_fast ratios (median time; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    for group, times in _ROWS.items():
        ours = times.get("ours")
        for impl, t in times.items():
            if impl == "ours":
                continue
            ratio = f"{t / ours:7.2f}x" if ours else "   n/a"
            terminalreporter.write_line(
                f"{group:45s} ours {ours * 1e3 if ours else float('nan'):10.2f} ms | {impl:28s} {t * 1e3:10.2f} ms"
                f" | ours faster by {ratio}"
            )


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return "cuda"
