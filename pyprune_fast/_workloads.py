"""Benchmark workloads: each op next to what a user would write today, built once and shared by the
pytest-benchmark suite (benchmarks/) and `pyprune-fast bench`."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ops

# The weights scored by default in torchvision's ViT-B/16 (every Linear and Conv weight; the
# attention in_proj is a bare Parameter): 65.06 M values in 38 tensors.
VIT_B16_WEIGHTS = [(768, 3, 16, 16)] + [(768, 768), (3072, 768), (768, 3072)] * 12 + [(1000, 768)]


@dataclass
class Case:
    """One comparison: `ours` against one or more baselines on the same inputs."""

    group: str
    ours: Callable[[], object]
    baselines: dict[str, Callable[[], object]]
    elements: int = 0
    bytes_moved: int = 0
    extra: dict = field(default_factory=dict)


def eager_saliency(grads, weights):
    """What users write: per-tensor |g·w|, then the statistics over the concatenated scores."""
    scores = [(g * w).abs() for g, w in zip(grads, weights)]
    flat = torch.cat([s.reshape(-1) for s in scores])
    finite = torch.isfinite(flat)
    stats = torch.stack(
        [
            torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
            flat.sum(dtype=torch.float64),
            flat.square().sum(dtype=torch.float64),
            flat.min().double(),
            flat.max().double(),
            (~finite).sum().double(),
            torch.isnan(flat).sum().double(),
        ]
    )
    return scores, stats


def saliency_case(device: str = "cpu", dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Case:
    """The fused saliency op on ViT-B/16's weights and random gradients (scale < 1 shrinks each tensor)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(max(1, int(s[0] * scale)),) + tuple(s[1:]) for s in VIT_B16_WEIGHTS]
    weights = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    n = sum(w.numel() for w in weights)
    return Case(
        group=f"saliency vit_b_16 {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: ops.saliency(grads, weights),
        baselines={"torch eager": lambda: eager_saliency(grads, weights)},
        elements=n,
        bytes_moved=n * (2 * weights[0].element_size() + 4),
    )


# Every workload by name: `factory(device="cpu", scale=1.0) -> Case`. `pyprune-fast bench` runs each
# one found here; add a workload by adding its factory.
WORKLOADS: dict[str, Callable[..., Case]] = {
    "saliency fp32": functools.partial(saliency_case, dtype=torch.float32),
    "saliency bf16": functools.partial(saliency_case, dtype=torch.bfloat16),
}


def time_call(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones; each call waits for the GPU
    (torch.cuda.synchronize) when the device is CUDA."""

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


@dataclass
class Timing:
    """One implementation of a case: best and median wall seconds."""

    impl: str
    best: float
    median: float


def time_case(case: Case, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> list[Timing]:
    """Ours, then each baseline, timed in turn in the same process on the same inputs."""
    impls = {"ours": case.ours, **case.baselines}
    out = []
    for impl, fn in impls.items():
        times = time_call(fn, device, repeats, warmup)
        out.append(Timing(impl, min(times), statistics.median(times)))
    return out
