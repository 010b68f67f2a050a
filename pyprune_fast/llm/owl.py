"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): non-uniform sparsity across decoder
blocks, fewer weights pruned in blocks with more outlier features.

    A = |W_ij| · ‖X_j‖₂                               Wanda's metric, every Linear of block l
    D_l = #{A > M · mean_l(A)} / #A                    the block's outlier ratio (mean over the block)
    z_l = (D_l − min D) / (max D − min D)              (z = 0 for every block when all D_l are equal)
    s_l = s − 2λ · (z_l − z̄),   z̄ = Σ_l P_l z_l / Σ_l P_l   (P_l: the block's prunable weights)

so the sparsities span a band of width 2λ around the target s, higher D_l getting lower s_l, and
their mean weighted by P_l is exactly s (each Linear then rounds its own count). The statistics come
from a dense pass over the calibration data before pruning. Paper defaults: M = 5, λ = 0.08."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..criteria.method import Block
from ..criteria.wanda import Wanda


@dataclass(frozen=True)
class OWL:
    """OWL's hyper-parameters: the outlier threshold `M` (× the block's mean metric) and `lam` (λ)."""

    M: float = 5.0
    lam: float = 0.08

    def block_ratio(self, block: Block) -> float:
        """D_l of one block from its input statistics (every Linear must have been called)."""
        wanda = Wanda()
        return outlier_ratio(
            [wanda.score_layer(block.linears[n].weight, block.stats[n]) for n in block.observed()], self.M
        )

    def __post_init__(self) -> None:
        if isinstance(self.M, bool) or not isinstance(self.M, (int, float)) or not self.M > 0:
            raise ValueError(f"OWL M must be a number > 0, got {self.M!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 <= self.lam <= 0.5:
            raise ValueError(f"OWL lam must be in [0, 0.5], got {self.lam!r}")


def outlier_ratio(scores: Sequence[Tensor], M: float) -> float:
    """Fraction of the entries of all `scores` (one block's metrics) above M × their mean."""
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = torch.stack([s.double().sum() for s in scores]).sum() / total
    above = torch.stack([(s > M * mean).sum() for s in scores]).sum()
    return int(above) / total


def block_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """s_l = s − 2λ(z_l − z̄) from the outlier ratios D_l and the blocks' prunable weights P_l (module
    docstring); ValueError when a block's sparsity would leave [0, 1]."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("OWL needs one outlier ratio and one size per block")
    low, high = min(ratios), max(ratios)
    z = [(r - low) / (high - low) if high > low else 0.0 for r in ratios]
    z_mean = sum(p * v for p, v in zip(sizes, z)) / sum(sizes)
    out = [target - 2.0 * lam * (v - z_mean) for v in z]
    if min(out) < 0.0 or max(out) > 1.0:
        raise ValueError(
            f"OWL with lam={lam} at sparsity {target} gives block sparsities in [{min(out):.3f}, {max(out):.3f}], "
            "outside [0, 1]: use a smaller lam"
        )
    return out
