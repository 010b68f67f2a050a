"""The mean singular value of feature matrices, ReFer's objective (reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def svd_mean(features: Tensor) -> Tensor:
    """Mean of the min(N, D) singular values of each [N, D] matrix: [B, N, D] -> [B], [N, D] -> 0-d.
    Computed in float32 for half inputs; differentiable through torch.linalg.svdvals."""
    x = features if features.dtype in (torch.float32, torch.float64) else features.float()
    return torch.linalg.svdvals(x).mean(-1)


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """[svd_mean(F) for F in features] as one 1-d tensor."""
    return torch.stack([svd_mean(f) for f in features])
