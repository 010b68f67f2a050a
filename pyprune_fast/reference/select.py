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


RADIX_DIGIT_BITS = 16
RADIX_BINS = 1 << RADIX_DIGIT_BITS
_INT_OF_WIDTH = {16: torch.int16, 32: torch.int32, 64: torch.int64}
_REFERENCE_CHUNK = 1 << 24  # elements per step: a 1 B-element tensor never needs more than ~0.5 GB of temporaries


def radix_width(dtype: torch.dtype) -> int:
    """Bits of the order key of a score dtype (16, 32 or 64): the number of 16-bit radix digits is width / 16."""
    return torch.finfo(dtype).bits


def order_keys(x: Tensor) -> Tensor:
    """The order-preserving keys of a float tensor's elements as int64 holding the unsigned key's bits
    (for float64 the int64 holds the 64-bit pattern): key(x) < key(y) (unsigned) iff x < y, with -0.0
    and 0.0 one key; NaN get keys outside the range of every ordered value."""
    width = radix_width(x.dtype)
    bits = x.reshape(-1).view(_INT_OF_WIDTH[width]).long()
    if width < 64:
        bits = bits & ((1 << width) - 1)
    sign = 1 << (width - 1) if width < 64 else -(1 << 63)
    bits = torch.where(bits == sign, torch.zeros_like(bits), bits)
    negative = (bits & sign) != 0
    keys = torch.where(negative, ~bits, bits | sign)
    return keys & ((1 << width) - 1) if width < 64 else keys


def radix_histogram(xs: Sequence[Tensor], digit: int, prefix: int) -> tuple[Tensor, Tensor]:
    """(hist, nan): hist int64 [65536] counts the non-NaN elements of all tensors whose order key's
    digits above 16-bit digit `digit` (0 = most significant) equal those of `prefix` (a key, as its
    int64 bit pattern), by the value of that digit; nan int64 [len(xs)] the NaN count per tensor for
    digit 0, zeros for later digits. Chunked: O(2^24) temporaries whatever the tensors' sizes."""
    width = radix_width(xs[0].dtype)
    passes = width // RADIX_DIGIT_BITS
    if not 0 <= digit < passes:
        raise ValueError(f"pass must be in [0, {passes}) for {xs[0].dtype}, got {digit}")
    device = xs[0].device
    shift = width - (digit + 1) * RADIX_DIGIT_BITS
    high = shift + RADIX_DIGIT_BITS  # bits above the digit: compared with the prefix's
    want = None if high >= width else prefix >> high
    hist = torch.zeros(RADIX_BINS, dtype=torch.long, device=device)
    nan = torch.zeros(len(xs), dtype=torch.long, device=device)
    for i, x in enumerate(xs):
        flat = x.detach().reshape(-1)
        for start in range(0, flat.numel(), _REFERENCE_CHUNK):
            part = flat[start : start + _REFERENCE_CHUNK]
            ordered = ~torch.isnan(part)
            if digit == 0:
                nan[i] += part.numel() - int(ordered.sum())
            keys = order_keys(part)
            if want is not None:
                ordered &= (keys >> high) == want
            digits = (keys[ordered] >> shift) & (RADIX_BINS - 1)
            hist += torch.bincount(digits, minlength=RADIX_BINS)
    return hist, nan
