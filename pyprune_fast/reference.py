"""Pure-PyTorch definitions of every op: the specification the compiled kernels are tested against,
and the path used when `PYPRUNE_FAST_BACKEND=reference` or no compiled library is available.
"""

from __future__ import annotations

import math
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


def threshold_masks(xs: Sequence[Tensor], value: Tensor, counts: Tensor, k: int) -> list[Tensor]:
    """Keep-masks with the k lowest entries of all tensors pruned, ties by flat index (tensors in order,
    each row-major): a stable sort of the concatenation (value and counts are not needed here)."""
    keep = prune_lowest(torch.cat([_sortable(x) for x in xs]), k)
    return [m.view(x.shape) for m, x in zip(torch.split(keep, [x.numel() for x in xs]), xs)]


def _nan_counts(xs: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.isnan(x).sum() for x in xs]).long()


def layerwise_masks(xs: Sequence[Tensor], ks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Each tensor its own group: ks[i] lowest entries of xs[i] pruned. Masks and NaN counts."""
    return [prune_lowest(x, k).view(x.shape) for x, k in zip(xs, ks)], _nan_counts(xs)


def rows_of(score: Tensor) -> Tensor:
    """A score tensor viewed as (out, -1): row i holds output i's entries, row-major."""
    return score.reshape(score.shape[0], math.prod(score.shape[1:])) if score.dim() > 0 else score.reshape(1, 1)


def per_row_masks(xs: Sequence[Tensor], counts: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Each row of each tensor (viewed as (size(0), -1)) its own group: counts[i] lowest entries of every
    row of xs[i] pruned, ties by lower index (a stable sort per row). Masks and NaN counts."""
    masks = []
    for x, count in zip(xs, counts):
        rows = rows_of(_sortable(x).view(x.shape))
        keep = torch.ones_like(rows, dtype=torch.bool)
        if count > 0 and rows.numel():
            keep.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :count], False)
        masks.append(keep.view(x.shape))
    return masks, _nan_counts(xs)


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


def kth_smallest_counts(xs: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(value, counts, nan): the k-th smallest value (1-based) of all elements in the inputs' dtype,
    int64 [elements < value, elements == value], int64 NaN count per tensor. By sorting."""
    device = xs[0].device
    nan = torch.stack([torch.isnan(x).sum() for x in xs]).long()
    flat = torch.cat([_sortable(x) for x in xs])
    if int(nan.sum()) > 0:
        return torch.zeros((), dtype=xs[0].dtype, device=device), torch.zeros(2, dtype=torch.long, device=device), nan
    value = torch.sort(flat).values[k - 1]
    counts = torch.stack([(flat < value).sum(), (flat == value).sum()]).long()
    return value.to(xs[0].dtype), counts, nan


# --- N:M masks and 2:4 semi-structured sparsity (issue 5) ---------------------------------------


def nm_mask(scores: Sequence[Tensor], n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """The n_m rule on each tensor of a list (groups of m consecutive entries of the row-major tensor,
    the n highest kept, ties to the lower index), and the number of NaN scores of each (int64)."""
    keep = [n_m({"s": s}, n, m)["s"] for s in scores]
    device = scores[0].device if scores else torch.device("cpu")
    nan = torch.tensor([int(torch.isnan(s).sum()) for s in scores], dtype=torch.int64, device=device)
    return keep, nan


# The metadata layout of csrc/include/pyprune_fast/sparse24.h: word [mt][kt][2g + p] holds, at bits
# 16h + 4q, the nibble of chunk 8kt + 4p + q of row 16mt + 8h + g (g < 8, p, h < 2, q < 4).
_META_SHIFTS = (16 * torch.arange(2).view(2, 1) + 4 * torch.arange(4).view(1, 4)).to(torch.int64)


def pack_meta(nibbles: Tensor) -> Tensor:
    """Nibbles i0 | i1 << 2 of each chunk, int64 [out, in/4] -> int32 meta [out/16, in/32, 16]."""
    out, chunks = nibbles.shape
    t = nibbles.to(torch.int64).view(out // 16, 2, 8, chunks // 8, 2, 4).permute(0, 3, 2, 4, 1, 5)
    words = (t << _META_SHIFTS.to(t.device)).sum((-2, -1)).reshape(out // 16, chunks // 8, 16)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_meta(meta: Tensor) -> Tensor:
    """int32 meta [out/16, in/32, 16] -> the nibble of each chunk, int64 [out, in/4]."""
    mt, kt, _ = meta.shape
    words = (meta.to(torch.int64) & 0xFFFFFFFF).view(mt, kt, 8, 2, 1, 1)
    nibbles = (words >> _META_SHIFTS.to(meta.device)) & 0xF  # [mt, kt, g, p, h, q]
    return nibbles.permute(0, 4, 2, 1, 3, 5).reshape(mt * 16, kt * 8)


def compress_24(w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """w [out, in] -> (values [out, in/2], meta, invalid). Each chunk of 4 keeps its non-zero entries
    (or, with a mask, its masked-in entries), padded with its lowest other positions to two, in
    increasing position order; invalid counts chunks with more than two (with a mask: not exactly two)."""
    out, cols = w.shape
    chunks = w.reshape(out, cols // 4, 4)
    flags = mask.reshape(out, cols // 4, 4) if mask is not None else chunks != 0
    count = flags.sum(-1)
    invalid = (count != 2).sum() if mask is not None else (count > 2).sum()
    key = (~flags).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = key.argsort(-1)[..., :2].sort(-1).values
    values = chunks.gather(-1, pos).reshape(out, cols // 2)
    return values, pack_meta(pos[..., 0] | pos[..., 1] << 2), invalid


def decompress_24(values: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """(values, meta) -> (dense w [out, in], invalid): kept values at their positions, zeros elsewhere;
    chunks whose nibble is not an ordered pair (i0 < i1) are zeros and counted in invalid."""
    out, half = values.shape
    nib = unpack_meta(meta)
    i0, i1 = nib & 3, nib >> 2 & 3
    valid = i0 < i1
    pos = torch.where(valid.unsqueeze(-1), torch.stack((i0, i1), -1), torch.tensor([0, 1], device=values.device))
    kept = torch.where(valid.unsqueeze(-1), values.view(out, half // 2, 2), 0)
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device).scatter_(-1, pos, kept)
    return dense.view(out, 2 * half), (~valid).sum()


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None, activation: str = "none"
) -> Tensor:
    """act(x @ Wᵀ + bias) with W = decompress_24(values, meta), computed in float32 and rounded once to
    x's dtype; act is 'none', 'relu' or 'gelu' (exact: x/2 · (1 + erf(x/√2)))."""
    w, invalid = decompress_24(values, meta)
    if int(invalid):
        raise ValueError(f"meta holds {int(invalid)} chunks whose index pair is not an ordered 2:4 pair")
    y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    return y.to(x.dtype)
