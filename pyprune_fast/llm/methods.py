"""The pruning methods of the block pipeline, and the two metrics that need no solver.

    magnitude   S = |W|                                      (no data)
    wanda       S = |W_ij| · ‖X_j‖₂  (Sun et al. 2024)       ‖X_j‖ over every calibration token
    sparsegpt   OBS weight update (see llm.sparsegpt)        H = 2XᵀX/n
    snip, refer, afr, feature_l1                             block-local forms (see llm.local)

Each method's default granularity is its paper's: Wanda per output row, the others per layer
(SparseGPT: per block of 128 columns jointly, with exact counts per layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Method:
    name: str
    needs_data: bool
    hessian: bool = False
    granularity: str = "layer"
    local: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", needs_data=False),
        Method("wanda", needs_data=True, granularity="row"),
        Method("sparsegpt", needs_data=True, hessian=True),
        Method("snip", needs_data=True, local=True),
        Method("refer", needs_data=True, local=True),
        Method("afr", needs_data=True, local=True),
        Method("feature_l1", needs_data=True, local=True),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def magnitude_score(weight: Tensor) -> Tensor:
    """|W| in float32 (one new tensor, no temporaries)."""
    return weight.detach().to(torch.float32, copy=True).abs_()


def wanda_score(weight: Tensor, norms: Tensor) -> Tensor:
    """Wanda's S_ij = |W_ij| · ‖X_j‖₂ (norms: ‖X_j‖₂ per input feature) in float32 (one new tensor)."""
    return weight.detach().to(torch.float32, copy=True).abs_().mul_(norms.to(weight.device).unsqueeze(0))
