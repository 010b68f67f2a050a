"""Kept-score gains of N:M channel swaps: the inner loop of a channel permutation search (Pool and Yu
2021, "Channel Permutations for N:M Sparsity", NeurIPS; the search of NVIDIA apex's permutation
module)."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import SCORE_TYPES, check_dtypes, check_n_m, check_same_device, check_tensor
from .dispatch import call, when_loaded

__all__ = ["nm_swap_gains"]


def nm_swap_gains(channel_scores: Tensor, perm: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """For each position i of `positions` and each channel c: how much the score kept by an N:M mask
    changes in the group of position i when channel c takes that position,

        out[i, c] = Σ_r max(S[c, r], u_r) − max(S[perm[p], r], u_r),   p = positions[i],

    u_r the n-th highest score in row r of the group's other m − 1 channels (+inf for n = 0, −inf for
    n = m); equal operands differ by exactly 0, so ±inf are ordinary values. The groups are the m
    consecutive positions of `perm`; swapping positions a and b of different groups changes the kept
    score by out[a, perm[b]] + out[b, perm[a]] (a swap only changes the two groups involved).

    Args:
        channel_scores: [C, R] float32/float16/bfloat16/float64, channel c's scores over the R rows (the
            transposed [R, C] score matrix of a Linear, or of several stacked); no NaN; C % m == 0.
        perm: int64 [C], a permutation: the channel at each position.
        positions: int64 [P], the positions to evaluate.
        n: entries kept in each group.
        m: the group size.

    Returns:
        [P, C] float32 (float64 for float64 scores), summed in double across rows.
    """
    check_dtypes("channel_scores", channel_scores, SCORE_TYPES)
    n, m = check_n_m(n, m)
    if channel_scores.dim() != 2 or channel_scores.shape[0] % m:
        raise ValueError(f"channel_scores must be [C, R] with C a multiple of m={m}, got {tuple(channel_scores.shape)}")
    channels = channel_scores.shape[0]
    for name, t in (("perm", perm), ("positions", positions)):
        check_tensor(name, t)
        if t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-d int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    check_same_device({"channel_scores": [channel_scores], "perm": [perm], "positions": [positions]})
    if perm.numel() != channels or not torch.equal(perm.sort().values, torch.arange(channels, device=perm.device)):
        raise ValueError(f"perm must be a permutation of range({channels})")
    if positions.numel() and not bool(((positions >= 0) & (positions < channels)).all()):
        raise ValueError(f"positions must be in [0, {channels})")
    if bool(torch.isnan(channel_scores).any()):
        raise ValueError("channel_scores contains NaN; scores must not be NaN")
    return call("nm_swap_gains", channel_scores, channel_scores, perm, positions, n, m)


def _fake_nm_swap_gains(channel_scores, perm, positions, n, m):
    dtype = torch.float64 if channel_scores.dtype == torch.float64 else torch.float32
    return channel_scores.new_empty((positions.shape[0], channel_scores.shape[0]), dtype=dtype)


@when_loaded
def _register() -> None:
    torch.library.register_fake("pyprune_fast::nm_swap_gains", _fake_nm_swap_gains)
