"""The kept-score gains of N:M channel swaps (ops.nm_swap_gains) and the permutation search built on
them (llm.refine.permute.nm_permutation) against the same in pure PyTorch (reference.nm_swap_gains)."""

from __future__ import annotations

import torch

from .. import ops, reference
from ..llm.refine.permute import nm_permutation
from .harness import Case, scaled

# Score matrices [rows, C] of the Linears a permutation is searched for: SmolLM2-135M's down_proj (one
# block's MLP channels) and LLaMA-7B's down_proj.
SHAPES = {"smollm2_down_proj": (576, 1536), "llama7b_down_proj": (4096, 11008)}


def wanda_like(rows: int, channels: int, device: str) -> torch.Tensor:
    """|W|·‖X_j‖-like scores: |Gaussian| weights times log-normal per-channel input norms."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, channels, generator=g).abs()
    return (w * torch.randn(channels, generator=g).exp()).to(device)


def nm_swap_case(
    model: str = "smollm2_down_proj", search: bool = False, device: str = "cpu", scale: float = 1.0
) -> Case:
    """search=False: the gains of every position against every channel (the search's first, largest
    call); search=True: the whole 2:4 permutation search, ours (fused gains) and the same search with the
    reference gains."""
    rows, channels = SHAPES[model]
    rows, channels = scaled(rows, scale), scaled(channels, scale, 4)
    scores = wanda_like(rows, channels, device)
    if search:
        return Case(
            group=f"nm_permutation 2:4 {model} {rows}x{channels} {device}",
            ours=lambda: nm_permutation(scores, 2, 4),
            baselines={"pure-PyTorch search": lambda: nm_permutation(scores, 2, 4, gains=reference.nm_swap_gains)},
            elements=scores.numel(),
        )
    channel = scores.t().contiguous()
    perm = torch.arange(channels, device=device)
    return Case(
        group=f"nm_swap_gains 2:4 {model} {rows}x{channels} all positions {device}",
        ours=lambda: ops.nm_swap_gains(channel, perm, perm, 2, 4),
        baselines={"pure PyTorch": lambda: reference.nm_swap_gains(channel, perm, perm, 2, 4)},
        elements=channels * channels * rows,
    )
