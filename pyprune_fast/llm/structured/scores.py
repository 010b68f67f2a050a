"""The scores of MLP channels and attention heads (higher = more important = kept): one registry, `SCORES`
(name -> Score: its function, citation, and whether it reads calibration statistics or block-local
gradients), which prune_structured's `score=` and the command line's `--criterion` read.

A unit u is an MLP channel (rows of the producers gate/up, a column of the consumer down_proj) or a query
head (its head_dim rows of q — with k and v under multi-head attention — and columns of o_proj).
Statistics: those of the consumer's input x (the input of down_proj / o_proj / fc2) over every
calibration token. Gradients: the block-local pass of gradients.py (x_n, ∇_n per calibration sequence).

    magnitude   ‖θ_u‖₂: the L2 norm of every weight coupled to unit u (producer rows and consumer
                columns), as Torch-Pruning's LLM example prunes Llama widths (Fang et al. 2023, "DepGraph:
                Towards Any Structural Pruning", CVPR)
    l1, l2      ‖W_u‖₁, ‖W_u‖₂ of the unit's filter: its producer rows (gate and up; a head's q rows, and
                k/v rows under multi-head attention), the registry's l1/l2 channel criteria (Li et al.
                2017, "Pruning Filters for Efficient ConvNets", ICLR) over the rows of each producer
    wanda       Σ_i |W_ij| · ‖X_j‖₂ summed over the consumer columns j of the unit: Wanda's score (Sun et
                al. 2024, "A Simple and Effective Pruning Approach for Large Language Models", ICLR)
                summed per channel
    flap        Var_t[x_tj] · ‖W_:,j‖₂² summed over the consumer columns j of the unit: FLAP's fluctuation
                metric (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large
                Language Models", AAAI)
    taylor      |E_n[x_nᵀ∇_n]|: the registry's taylor (Molchanov et al. 2017) on the unit's mask, the
                group form of Molchanov et al. 2019 ("Importance Estimation for Neural Network Pruning",
                CVPR)
    fisher      E_n[(x_nᵀ∇_n)²]: the registry's fisher (Theis et al. 2018) on the unit's mask: group
                Fisher (Liu et al. 2021, "Group Fisher Pruning for Practical Network Compression", ICML)
    ide         (E_n[x_n]ᵀ E_n[∇_n])²: the registry's ide (Ide's thesis eq. 4.10; Ide et al. 2020,
                "Robust pruning for efficient CNNs", Pattern Recognition Letters)

A head's score is the sum over its head_dim columns (wanda, flap; taylor, fisher and ide sum x_nᵀ∇_n over
them first); magnitude and l1/l2 take the norm over all its weights (a packed qkv: its rows in the q, k
and v parts, or its 3·head_dim rows when packed per head). The formulas of l1, l2, taylor, fisher and
ide are those of pyprune_fast.criteria, applied here to units. The L_p normalization of those criteria
(`normalize="lp"`) is the global allocation's `normalize` (width.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...criteria import CRITERIA
from ...criteria.channel import FROM_GRADIENTS
from ...criteria.channel_stats import ChannelStats
from ...criteria.input_stats import InputStats
from .layout import Structure

PARTS = ("mlp", "attention")


@dataclass
class Observed:
    """What a block's statistics pass saw, per part ("mlp", "attention"): the consumers' input
    statistics, and the block-local gradient sums when the score needs them."""

    stats: dict[str, InputStats]
    grads: dict[str, ChannelStats] | None = None


@dataclass(frozen=True)
class Score:
    """A registered score: `units(structure, i, part, observed)` is the float32 score of every unit of
    `part` ("mlp": MLP channels; "attention": query heads) of block i; `cite` its source; `statistics`:
    it reads the consumers' calibration statistics; `gradients`: the ChannelStats sums it needs from the
    block-local gradient pass (empty: no gradient pass)."""

    units: Callable[[Structure, int, str, Observed], Tensor]
    cite: str
    statistics: bool = False
    gradients: frozenset[str] = frozenset()


def _consumer(structure: Structure, part: str) -> str:
    return structure.layout.consumer if part == "mlp" else structure.layout.o


def _per_unit(structure: Structure, part: str, columns: Tensor) -> Tensor:
    """Consumer-column values summed per unit: itself for channels, per head_dim columns for heads."""
    return columns if part == "mlp" else columns.reshape(-1, structure.head_dim).sum(1)


def _rows_sq(weight: Tensor) -> Tensor:
    return weight.detach().float().pow(2).sum(1)


def _filters(structure: Structure, part: str) -> tuple[str, ...]:
    """The producers of a unit's filter rows: gate/up (fc1); q, with k and v under multi-head attention
    (one packed qkv once)."""
    layout = structure.layout
    if part == "mlp":
        return layout.producers
    return tuple(dict.fromkeys((layout.q, layout.k, layout.v))) if structure.group == 1 else (layout.q,)


def _rows_per_unit(structure: Structure, part: str, rows: Tensor) -> Tensor:
    """Per-row values of a producer summed per unit (a head's head_dim rows; packed qkv: in q, k and v)."""
    if part == "mlp":
        return rows
    if structure.layout.qkv_per_head:
        return rows.reshape(-1, 3 * structure.head_dim).sum(1)
    if structure.layout.packed_qkv:
        return rows.reshape(3, -1, structure.head_dim).sum((0, 2))
    return rows.reshape(-1, structure.head_dim).sum(1)


def magnitude(structure: Structure, i: int, part: str, _observed: Observed) -> Tensor:
    s = _per_unit(structure, part, _rows_sq(structure.linear(i, _consumer(structure, part)).weight.T))
    for name in _filters(structure, part):
        s = s + _rows_per_unit(structure, part, _rows_sq(structure.linear(i, name).weight).to(s.device))
    return s.sqrt()


def _filter_norm(order: int) -> Callable[[Structure, int, str, Observed], Tensor]:
    """The registry's l1 / l2 channel criterion over a unit's filter rows: Σ_rows ‖row‖_p^p, to the 1/p."""
    criterion = CRITERIA[f"l{order}"]

    def score(structure: Structure, i: int, part: str, _observed: Observed) -> Tensor:
        names = _filters(structure, part)
        norms = criterion(structure.blocks[i], layers=list(names))
        total = sum(_rows_per_unit(structure, part, norms[n].double().pow(order)) for n in names)
        return total.pow(1.0 / order).float()

    return score


def _statistics(observed: Observed, part: str) -> InputStats:
    stats = observed.stats.get(part)
    if stats is None:
        raise ValueError(f"this score reads calibration statistics of the {part} consumer: none were collected")
    return stats


def wanda(structure: Structure, i: int, part: str, observed: Observed) -> Tensor:
    w = structure.linear(i, _consumer(structure, part)).weight.detach().float()
    return _per_unit(structure, part, w.abs().sum(0) * _statistics(observed, part).norms().to(w.device))


def flap(structure: Structure, i: int, part: str, observed: Observed) -> Tensor:
    w = structure.linear(i, _consumer(structure, part)).weight.detach().float()
    return _per_unit(structure, part, _statistics(observed, part).variance().to(w.device) * w.pow(2).sum(0))


def _from_gradients(name: str) -> Callable[[Structure, int, str, Observed], Tensor]:
    formula = FROM_GRADIENTS[name]

    def score(_structure: Structure, _i: int, part: str, observed: Observed) -> Tensor:
        if observed.grads is None or part not in observed.grads:
            raise ValueError(f"score {name!r} reads block-local gradients of the {part} units: none were taken")
        return formula.score(observed.grads[part]).float()

    return score


def _gradient_score(name: str, cite: str) -> Score:
    return Score(_from_gradients(name), cite, statistics=False, gradients=FROM_GRADIENTS[name].needs)


SCORES: dict[str, Score] = {
    "magnitude": Score(magnitude, "Fang et al. 2023, DepGraph: Towards Any Structural Pruning (CVPR)"),
    "wanda": Score(wanda, "Sun et al. 2024, A Simple and Effective Pruning Approach for LLMs (ICLR)", True),
    "flap": Score(flap, "An et al. 2024, Fluctuation-based Adaptive Structured Pruning for LLMs (AAAI)", True),
    "l1": Score(_filter_norm(1), "Li et al. 2017, Pruning Filters for Efficient ConvNets (ICLR)"),
    "l2": Score(_filter_norm(2), "Li et al. 2017, Pruning Filters for Efficient ConvNets (ICLR)"),
    "taylor": _gradient_score("taylor", "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning"),
    "fisher": _gradient_score("fisher", "Liu et al. 2021, Group Fisher Pruning for Practical Network Compression"),
    "ide": _gradient_score("ide", "Ide et al. 2020, Robust pruning for efficient CNNs (PRL); Ide's thesis eq. 4.10"),
}


def check_finite(scores: Tensor, what: str) -> None:
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{what}: the scores hold NaN (non-finite calibration activations or weights)")
