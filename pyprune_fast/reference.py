"""Pure-PyTorch definitions of every op: the specification the compiled kernels are tested against,
and the path used when `PYPRUNE_FAST_BACKEND=reference` or no compiled library is available.
"""

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


def svd_mean(features: Tensor) -> Tensor:
    """Mean of the min(N, D) singular values of each [N, D] matrix: [B, N, D] -> [B], [N, D] -> 0-d.
    Computed in float32 for half inputs; differentiable through torch.linalg.svdvals."""
    x = features if features.dtype in (torch.float32, torch.float64) else features.float()
    return torch.linalg.svdvals(x).mean(-1)


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """[svd_mean(F) for F in features] as one 1-d tensor."""
    return torch.stack([svd_mean(f) for f in features])


def _sortable(x: Tensor) -> Tensor:
    """Scores as one float64 vector in which -0.0 and 0.0 compare equal."""
    return x.detach().reshape(-1).double() + 0.0


def prune_lowest(values: Tensor, count: int) -> Tensor:
    """Bool keep-mask of a 1-d tensor with its `count` lowest entries False; among equal values the
    lower index is pruned first (stable sort)."""
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        order = torch.sort(_sortable(values), stable=True).indices
        keep[order[:count]] = False
    return keep


def global_unstructured(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep-masks with exactly round(sparsity * total) entries pruned over all tensors together,
    lowest first, ties by flat index (tensors in dict order, each row-major)."""
    total = sum(s.numel() for s in scores.values())
    flat = torch.cat([_sortable(s).cpu() for s in scores.values()]) if scores else torch.zeros(0)
    keep = prune_lowest(flat, round(sparsity * total))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def layerwise(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Each tensor pruned on its own: round(sparsity * numel) lowest entries of each."""
    return {n: prune_lowest(s, round(sparsity * s.numel())).view(s.shape) for n, s in scores.items()}


def rows_of(score: Tensor) -> Tensor:
    """A score tensor viewed as (out, -1): row i holds output i's entries, row-major."""
    return score.reshape(score.shape[0], -1) if score.dim() > 0 else score.reshape(1, 1)


def per_row(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Each output row its own group (Wanda's rule): round(sparsity * row length) lowest entries of
    every row pruned, ties by lower index first."""
    out = {}
    for name, s in scores.items():
        rows = _sortable(rows_of(s)).view(rows_of(s).shape)
        count = round(sparsity * rows.shape[1])
        keep = torch.ones_like(rows, dtype=torch.bool)
        if count > 0:
            order = torch.sort(rows, dim=1, stable=True).indices[:, :count]
            keep.scatter_(1, order, False)
        out[name] = keep.view(s.shape)
    return out


def n_m(scores: dict[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """N:M keep-masks: each weight viewed as (out, -1), groups of m consecutive entries along a row,
    the n highest of each group kept; among equal scores the lower index is kept."""
    out = {}
    for name, s in scores.items():
        groups = _sortable(rows_of(s)).view(-1, m)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        out[name] = keep.view(s.shape)
    return out
