"""The fused saliency op: |g·w| of every tensor and the statistics of all scores (reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

STATS_FIELDS = ("count", "sum", "sumsq", "min", "max", "nonfinite", "nan")


def stats_of(values: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """float64 [count, sum, sumsq, min, max, nonfinite, nan] over all elements of all tensors;
    sum, sumsq, min and max over the finite values only (min = +inf, max = -inf when there are none)."""
    if device is None:
        device = values[0].device if values else torch.device("cpu")
    flat = [v.detach().reshape(-1).double() for v in values]
    x = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64, device=device)
    finite = torch.isfinite(x)
    xf = x[finite]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    return torch.stack(
        [
            torch.tensor(float(x.numel()), dtype=torch.float64, device=device),
            xf.sum(),
            (xf * xf).sum(),
            xf.min() if xf.numel() else inf,
            xf.max() if xf.numel() else -inf,
            (~finite).sum().double(),
            torch.isnan(x).sum().double(),
        ]
    )


def saliency(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """s_i = |g_i * w_i| in float32, and stats_of(s)."""
    scores = [(g.float() * w.float()).abs() for g, w in zip(grads, weights)]
    return scores, stats_of(scores, weights[0].device if weights else None)


def saliency_accumulate_(
    acc: Sequence[Tensor], grads: Sequence[Tensor], weights: Sequence[Tensor], scale: float = 1.0, power: int = 1
) -> Tensor:
    """acc_i += scale * |g_i * w_i|^power in place, and stats_of(acc)."""
    for a, g, w in zip(acc, grads, weights):
        s = (g.float() * w.float()).abs()
        if power == 2:
            s = s * s
        a.add_(s * scale)
    return stats_of(acc, weights[0].device if weights else None)
