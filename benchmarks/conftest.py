"""Shared pieces of the benchmark suite: timing ours and each baseline in the same run, and a ratio
table printed at the end (`pytest benchmarks/ --benchmark-only`)."""

import ctypes
import gc
import os
import platform
import threading
import time
from collections import defaultdict

import pytest
import torch

_ROWS: dict[str, dict[str, float]] = defaultdict(dict)
_MEMORY: dict[str, dict[str, int]] = defaultdict(dict)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(fn) -> int:
    """Peak resident memory above the level before the call, sampled every millisecond (CPU). Freed
    heap memory is first returned to the system (malloc_trim), so memory the allocator would reuse
    from earlier rounds is counted too."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss()
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        out = fn()
        peak = max(peak, _rss())
        del out
    finally:
        done.set()
        thread.join()
    return peak - before


def run_case(benchmark, case, impl: str, device: str = "cpu", rounds: int = 5, memory: bool = False):
    """Times one implementation of a workloads.Case with pytest-benchmark (median of `rounds` after a
    warm-up); with memory=True also records the peak extra resident memory of one more call."""
    fn = case.ours if impl == "ours" else case.baselines[impl]

    def call():
        out = fn()
        sync(device)
        return out

    benchmark.group = case.group
    benchmark.extra_info.update({"impl": impl, "elements": case.elements, "bytes": case.bytes_moved, **case.extra})
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
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
        for impl, extra in _MEMORY.get(group, {}).items():
            terminalreporter.write_line(f"{group:45s} peak extra memory {impl:28s} {extra / 2**20:10.0f} MiB")


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return "cuda"
