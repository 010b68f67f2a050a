"""Magnitude: the data-free baseline."""

from __future__ import annotations

from torch import Tensor

from .engine import Job
from .registry import criterion


@criterion(needs=())
def magnitude(job: Job) -> list[Tensor]:
    """S(w) = |w|. Needs no data."""
    return [p.detach().abs().float() for p in job.tensors]
