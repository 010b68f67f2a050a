"""Scores of MLP channels and attention heads (higher = more important = kept), from the coupled weights
and the statistics of the consumer's input x (the input of down_proj / o_proj / fc2) over every
calibration token.

    magnitude   ‖θ_u‖₂: the L2 norm of every weight coupled to unit u (producer rows, consumer columns;
                the q rows and o columns of a query head, + k/v rows under multi-head attention), as
                Torch-Pruning's LLM example prunes Llama widths (Fang et al. 2023, "DepGraph: Towards Any
                Structural Pruning", CVPR)
    wanda       Σ_i |W_ij| · ‖X_j‖₂ summed over the consumer columns j of the unit: Wanda's score (Sun et
                al. 2024, "A Simple and Effective Pruning Approach for Large Language Models", ICLR)
                summed per channel
    flap        Var_t[x_tj] · ‖W_:,j‖₂² summed over the consumer columns j of the unit: FLAP's fluctuation
                metric (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large
                Language Models", AAAI)

A head's score is the sum over its head_dim columns (magnitude: the norm over all its weights; with a
packed qkv Linear, its rows in the q, k and v parts)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...criteria.input_stats import InputStats
from .layout import Structure

SCORES = ("magnitude", "wanda", "flap")


def _column_scores(score: str, weight: Tensor, stats: InputStats | None) -> Tensor:
    """Per consumer column j: the unit score's share (magnitude: the squared norm, summed later)."""
    w = weight.detach().float()
    if score == "magnitude":
        return w.pow(2).sum(0)
    if stats is None:
        raise ValueError(f"score {score!r} reads calibration statistics: none were collected")
    if score == "wanda":
        return w.abs().sum(0) * stats.norms().to(w.device)
    return stats.variance().to(w.device) * w.pow(2).sum(0)


def _rows_sq(weight: Tensor) -> Tensor:
    return weight.detach().float().pow(2).sum(1)


def channel_scores(score: str, structure: Structure, i: int, stats: InputStats | None) -> Tensor:
    """The float32 score of every MLP channel of block i [intermediate]."""
    layout = structure.layout
    s = _column_scores(score, structure.linear(i, layout.consumer).weight, stats)
    if score == "magnitude":
        for p in layout.producers:
            s = s + _rows_sq(structure.linear(i, p).weight).to(s.device)
        s = s.sqrt()
    return s


def head_scores(score: str, structure: Structure, i: int, stats: InputStats | None) -> Tensor:
    """The float32 score of every query head of block i [heads] (under multi-head attention the head
    with its key and value rows)."""
    layout, d = structure.layout, structure.head_dim
    s = _column_scores(score, structure.linear(i, layout.o).weight, stats).reshape(-1, d).sum(1)
    if score == "magnitude":
        q = _rows_sq(structure.linear(i, layout.q).weight).to(s.device)
        if layout.packed_qkv:  # rows (q | k | v) × heads × head_dim: a head's rows in all three parts
            return (s + q.reshape(3, -1, d).sum((0, 2))).sqrt()
        s = s + q.reshape(-1, d).sum(1)
        if structure.group == 1:
            for name in (layout.k, layout.v):
                s = s + _rows_sq(structure.linear(i, name).weight).to(s.device).reshape(-1, d).sum(1)
        s = s.sqrt()
    return s


def check_finite(scores: Tensor, what: str) -> None:
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{what}: the scores hold NaN (non-finite calibration activations or weights)")
