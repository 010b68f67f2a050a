"""Exact selection: the k-th smallest score and keep-masks with the lowest scores pruned, globally,
per tensor or per row; among equal scores the lower flat index is pruned first (reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import rows_of, sortable


def prune_lowest(values: Tensor, count: int) -> Tensor:
    """Bool keep-mask of a 1-d tensor with its `count` lowest entries False; among equal values the
    lower index is pruned first (stable sort)."""
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        order = torch.sort(sortable(values), stable=True).indices
        keep[order[:count]] = False
    return keep


def threshold_masks(xs: Sequence[Tensor], value: Tensor, counts: Tensor, k: int) -> list[Tensor]:
    """Keep-masks with the k lowest entries of all tensors pruned, ties by flat index (tensors in order,
    each row-major): a stable sort of the concatenation (value and counts are not needed here)."""
    keep = prune_lowest(torch.cat([sortable(x) for x in xs]), k)
    return [m.view(x.shape) for m, x in zip(torch.split(keep, [x.numel() for x in xs]), xs)]


def _nan_counts(xs: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.isnan(x).sum() for x in xs]).long()


def layerwise_masks(xs: Sequence[Tensor], ks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Each tensor its own group: ks[i] lowest entries of xs[i] pruned. Masks and NaN counts."""
    return [prune_lowest(x, k).view(x.shape) for x, k in zip(xs, ks)], _nan_counts(xs)


def per_row_masks(xs: Sequence[Tensor], counts: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Each row of each tensor (viewed as (size(0), -1)) its own group: counts[i] lowest entries of every
    row of xs[i] pruned, ties by lower index (a stable sort per row). Masks and NaN counts."""
    masks = []
    for x, count in zip(xs, counts):
        rows = rows_of(sortable(x).view(x.shape))
        keep = torch.ones_like(rows, dtype=torch.bool)
        if count > 0 and rows.numel():
            keep.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :count], False)
        masks.append(keep.view(x.shape))
    return masks, _nan_counts(xs)


def kth_smallest_counts(xs: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(value, counts, nan): the k-th smallest value (1-based) of all elements in the inputs' dtype,
    int64 [elements < value, elements == value], int64 NaN count per tensor. By sorting."""
    device = xs[0].device
    nan = torch.stack([torch.isnan(x).sum() for x in xs]).long()
    flat = torch.cat([sortable(x) for x in xs])
    if int(nan.sum()) > 0:
        return torch.zeros((), dtype=xs[0].dtype, device=device), torch.zeros(2, dtype=torch.long, device=device), nan
    value = torch.sort(flat).values[k - 1]
    counts = torch.stack([(flat < value).sum(), (flat == value).sum()]).long()
    return value.to(xs[0].dtype), counts, nan
