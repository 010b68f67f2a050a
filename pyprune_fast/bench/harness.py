"""The one timing harness of the benchmarks: a Case (ours against one or more baselines on the same
inputs), `scaled` (the one rule that shrinks a workload's sizes to what each implementation accepts),
timing each implementation in turn (`time_call`, `time_case`, used by `pyprune-fast bench`), the
peak-memory sampler and the ratio table that the pytest-benchmark suite (benchmarks/conftest.py) uses."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One comparison: `ours` against one or more baselines on the same inputs."""

    group: str
    ours: Callable[[], object]
    baselines: dict[str, Callable[[], object]]
    elements: int = 0
    bytes_moved: int = 0
    extra: dict = field(default_factory=dict)


def scaled(n: int, scale: float, multiple: int = 1) -> int:
    """A size n (named at scale 1) shrunk by `scale`: n × scale rounded down to a multiple of `multiple`,
    at least one multiple. Each workload passes the multiple its implementations need (torch's CUTLASS
    2:4 conversion, for instance, takes fp16 rows in multiples of 32), so every scale in (0, 1] gives
    shapes that every implementation accepts; scale 1 keeps n when n is such a multiple."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return max(multiple, int(n * scale + 1e-9) // multiple * multiple)


def sync(device: str) -> None:
    """Waits for the GPU when `device` is CUDA, so that a timed call includes its kernels."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones; each call waits for the GPU
    (torch.cuda.synchronize) when the device is CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


@dataclass
class Timing:
    """One implementation of a case: best and median wall seconds, or, when it raised (and time_case
    was asked to go on), `error`: the exception in one line, and NaN times."""

    impl: str
    best: float
    median: float
    error: str | None = None


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def time_case(
    case: Case, device: str = "cpu", repeats: int = 5, warmup: int = 1, keep_going: bool = False
) -> list[Timing]:
    """Ours and each baseline timed in the same process on the same inputs, interleaved: after the
    warm-up calls of each, every round calls each implementation once, ours first in even rounds and
    last in odd ones, so that a load that changes during the run (a shared machine) weighs on all of
    them alike, and so does the place in a round (what the call before left to the allocator and the
    caches). With `keep_going`, an implementation that raises (an Exception) gets a Timing with its
    `error` and the others are still timed; otherwise the exception propagates."""
    impls = {"ours": case.ours, **case.baselines}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    errors: dict[str, str] = {}

    def timed(impl: str, warm: bool) -> None:
        try:
            times[impl].extend(time_call(impls[impl], device, 0 if warm else 1, 1 if warm else 0))
        except Exception as exc:
            if not keep_going:
                raise
            errors[impl] = one_line(exc)

    for impl in impls:
        for _ in range(warmup):
            if impl not in errors:
                timed(impl, True)
    order = list(impls)
    for round_ in range(repeats):
        for impl in order if round_ % 2 == 0 else reversed(order):
            if impl not in errors:
                timed(impl, False)
    return [
        Timing(impl, float("nan"), float("nan"), errors[impl])
        if impl in errors
        else Timing(impl, min(times[impl]), statistics.median(times[impl]))
        for impl in impls
    ]


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory above the level before the call, sampled every millisecond (CPU). Freed
    heap memory is first returned to the system (malloc_trim), so memory the allocator would reuse
    from earlier rounds is counted too."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = resident_bytes()
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        out = fn()
        peak = max(peak, resident_bytes())
        del out
    finally:
        done.set()
        thread.join()
    return peak - before


def ratio_table(times: dict[str, dict[str, float]], memory: dict[str, dict[str, int]] | None = None) -> list[str]:
    """Lines of the ratio table: for each group ({impl: median seconds}, "ours" among them), each
    baseline's time beside ours and how many times faster ours is; then the peak extra memory of each
    implementation measured ({group: {impl: bytes}})."""
    memory = memory or {}
    lines = []
    for group, row in times.items():
        ours = row.get("ours")
        for impl, t in row.items():
            if impl == "ours":
                continue
            ratio = f"{t / ours:7.2f}x" if ours else "   n/a"
            lines.append(
                f"{group:45s} ours {ours * 1e3 if ours else float('nan'):10.2f} ms | {impl:28s} {t * 1e3:10.2f} ms"
                f" | ours faster by {ratio}"
            )
        for impl, extra in memory.get(group, {}).items():
            lines.append(f"{group:45s} peak extra memory {impl:28s} {extra / 2**20:10.0f} MiB")
    return lines
