"""Magnitude: the data-free baseline, S(w) = |w|, as a registry criterion and as a method of the block
pipeline (one per-weight function for both)."""

from __future__ import annotations

import torch
from torch import Tensor

from .engine import Job
from .input_stats import InputStats
from .method import LayerMethod, register_method
from .registry import criterion


def magnitude_score(weight: Tensor) -> Tensor:
    """|W| in float32 (one new tensor, no temporaries)."""
    return weight.detach().to(torch.float32, copy=True).abs_()


@criterion(needs=())
def magnitude(job: Job) -> list[Tensor]:
    """S(w) = |w|. Needs no data."""
    return [magnitude_score(p) for p in job.tensors]


class Magnitude(LayerMethod):
    """S = |W| per Linear (no data)."""

    name = "magnitude"
    needs_data = False

    def score_layer(self, weight: Tensor, stats: InputStats | None) -> Tensor:
        return magnitude_score(weight)


register_method(Magnitude(), as_criterion=False)
