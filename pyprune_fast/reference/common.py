"""Helpers shared by several reference ops: scores as sortable float64, and a tensor viewed as rows."""

from __future__ import annotations

import math

from torch import Tensor


def sortable(x: Tensor) -> Tensor:
    """Scores as one float64 vector in which -0.0 and 0.0 compare equal."""
    return x.detach().reshape(-1).double() + 0.0


def rows_of(score: Tensor) -> Tensor:
    """A score tensor viewed as (out, -1): row i holds output i's entries, row-major."""
    return score.reshape(score.shape[0], math.prod(score.shape[1:])) if score.dim() > 0 else score.reshape(1, 1)
