"""Kept-score gains of N:M channel swaps (reference): what a channel permutation search evaluates."""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one [C, rows] slab of the computation (the rows are processed in slabs of this size).
_SLAB = 1 << 22


def nm_swap_gains(channel_scores: Tensor, perm: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """out[i, c] = Σ_r δ_r: the change of the N:M-kept score when channel c replaces the channel at
    position positions[i] (groups: m consecutive positions of perm; channel_scores [C, R] holds each
    channel's scores over the R rows). In row r, with s the scores of the position's group and u the n-th
    highest of the group's other m − 1 scores (+inf for n = 0, −inf for n = m),

        δ_r = max(x, u) − max(s_i, u),   x = channel_scores[c, r],   equal operands giving exactly 0.

    Computed in float64; returned as float32 (float64 for float64 scores)."""
    channels, rows = channel_scores.shape
    out_dtype = torch.float64 if channel_scores.dtype == torch.float64 else torch.float32
    out = torch.zeros(positions.numel(), channels, dtype=torch.float64, device=channel_scores.device)
    if out.numel() == 0 or rows == 0:
        return out.to(out_dtype)
    s = channel_scores.double()
    groups = s[perm].view(channels // m, m, rows)
    slab = max(1, _SLAB // max(channels, 1))
    for k, pos in enumerate(positions.tolist()):
        group, i = divmod(pos, m)
        others = torch.cat([groups[group, :i], groups[group, i + 1 :]]).sort(dim=0, descending=True).values
        if n == 0:
            u = torch.full((rows,), float("inf"), dtype=torch.float64, device=s.device)
        elif n == m:
            u = torch.full((rows,), float("-inf"), dtype=torch.float64, device=s.device)
        else:
            u = others[n - 1]
        kept = torch.maximum(groups[group, i], u)
        for r0 in range(0, rows, slab):
            p = torch.maximum(s[:, r0 : r0 + slab], u[r0 : r0 + slab])
            k_ = kept[r0 : r0 + slab]
            out[k] += torch.where(p == k_, 0.0, p - k_).sum(dim=1)
    return out.to(out_dtype)
