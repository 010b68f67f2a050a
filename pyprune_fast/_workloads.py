"""Benchmark workloads: each op next to what a user would write today, built once and shared by the
pytest-benchmark suite (benchmarks/) and `pyprune-fast bench`."""

from __future__ import annotations

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


def svdvals_autograd(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """What users write today: Σ_l mean σ(F_l) through torch.linalg.svdvals, and its gradient by autograd."""
    value = torch.stack([torch.linalg.svdvals(f).mean(-1).sum() for f in features]).sum()
    return list(torch.autograd.grad(value, features))


def svd_mean_value_and_grad(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same with ops.svd_mean (one [B, N, D] tensor) or ops.svd_mean_list (a list of [N, D] layers)."""
    value = ops.svd_mean(features[0]).sum() if features[0].dim() == 3 else ops.svd_mean_list(features).sum()
    return list(torch.autograd.grad(value, features))


def svd_mean_case(layers: int, n: int, d: int, as_list: bool, device: str = "cpu") -> Case:
    """Value + gradient of ReFer's objective Σ_l mean σ(F_l) for `layers` float32 feature matrices of
    n × d: one [layers, n, d] tensor (ViT-B/16 block outputs: 12 × 64 × 197·768) or a list of [n, d]
    layers (LLM-like: 24 × 16 sequences × 256·4096)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if as_list:
        features = [torch.randn(n, d, generator=g).to(device).requires_grad_(True) for _ in range(layers)]
    else:
        features = [torch.randn(layers, n, d, generator=g).to(device).requires_grad_(True)]
    kind = "list" if as_list else "batch"
    return Case(
        group=f"svd_mean {layers}x{n}x{d} {kind} fp32 {device}",
        ours=lambda: svd_mean_value_and_grad(features),
        baselines={"torch svdvals autograd": lambda: svdvals_autograd(features)},
        elements=layers * n * d,
        bytes_moved=3 * layers * n * d * 4,
        extra={"layers": layers, "n": n, "d": d, "list": as_list},
    )
