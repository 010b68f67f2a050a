"""What to prune in each Linear: a fraction (unstructured, per row or per layer) or an N:M pattern,
and keep-masks from scores through the project's select ops (`pyprune_fast.masks`).

Rule (the project's): exactly round(s × N) entries of each group pruned, the lowest scores first,
ties by the lower flat index; a group is a row ("row", Wanda's rule), the whole weight ("layer"), or
m consecutive entries of a row of which the n highest are kept (N:M)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from .. import masks

GRANULARITIES = ("row", "layer", "global")


@dataclass(frozen=True)
class Pattern:
    """A sparsity target: `fraction` pruned, unstructured; or n kept in every m (fraction 1 − n/m)."""

    fraction: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{100 * self.fraction:g}%"


def parse_sparsity(sparsity: float | str | tuple[int, int]) -> Pattern:
    """A fraction in [0, 1], or an N:M pattern given as "2:4" or (2, 4) with 0 < n <= m."""
    if isinstance(sparsity, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", sparsity)
        if not match:
            raise ValueError(f"sparsity must be a fraction in [0, 1] or an N:M pattern like '2:4', got {sparsity!r}")
        sparsity = (int(match.group(1)), int(match.group(2)))
    if isinstance(sparsity, tuple):
        if len(sparsity) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in sparsity):
            raise ValueError(f"an N:M sparsity must be two ints (n, m), got {sparsity!r}")
        n, m = sparsity
        if not 0 < n <= m:
            raise ValueError(f"an N:M sparsity needs 0 < n <= m, got {n}:{m}")
        return Pattern(1.0 - n / m, n, m)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1] (or an N:M pattern like '2:4'), got {sparsity!r}")
    return Pattern(float(sparsity))


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def check_fits(name: str, weight: Tensor, pattern: Pattern) -> None:
    """An N:M pattern needs each row's length divisible by m."""
    if pattern.is_nm and weight.shape[-1] % pattern.m:
        raise ValueError(
            f"{name}: in_features {weight.shape[-1]} is not divisible by m={pattern.m} of the {pattern} pattern"
        )


def keep_mask(name: str, score: Tensor, pattern: Pattern, fraction: float, granularity: str) -> Tensor:
    """Keep-mask (True = kept) of one weight from its score: the N:M pattern, or `fraction` of the
    entries pruned per row or per layer (`fraction` is the pattern's, or this layer's under OWL)."""
    scores = {name: score}
    if pattern.is_nm:
        return masks.n_m(scores, pattern.n, pattern.m)[name]
    select = masks.per_row if granularity == "row" else masks.layerwise
    return select(scores, fraction)[name]
