"""The fused saliency op |g·w| + statistics on ViT-B/16's weights, against the eager loop users write."""

from __future__ import annotations

import torch

from .. import ops
from .harness import Case, scaled

# The weights scored by default in torchvision's ViT-B/16 (every Linear and Conv weight; the
# attention in_proj is a bare Parameter): 65.06 M values in 38 tensors.
VIT_B16_WEIGHTS = [(768, 3, 16, 16)] + [(768, 768), (3072, 768), (768, 3072)] * 12 + [(1000, 768)]


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
    shapes = [(scaled(s[0], scale),) + tuple(s[1:]) for s in VIT_B16_WEIGHTS]
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
