"""N:M keep-masks: the n highest of every m consecutive entries of a row (reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import rows_of, sortable


def n_m(scores: dict[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """N:M keep-masks: each weight viewed as (out, -1), groups of m consecutive entries along a row,
    the n highest of each group kept; among equal scores the lower index is kept."""
    out = {}
    for name, s in scores.items():
        groups = sortable(rows_of(s)).view(-1, m)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        out[name] = keep.view(s.shape)
    return out


def nm_mask(scores: Sequence[Tensor], n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """The n_m rule on each tensor of a list (groups of m consecutive entries of the row-major tensor,
    the n highest kept, ties to the lower index), and the number of NaN scores of each (int64)."""
    keep = [n_m({"s": s}, n, m)["s"] for s in scores]
    device = scores[0].device if scores else torch.device("cpu")
    nan = torch.tensor([int(torch.isnan(s).sum()) for s in scores], dtype=torch.int64, device=device)
    return keep, nan
