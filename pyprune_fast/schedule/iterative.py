"""Iterative pruning: R rounds of score → mask → (train), each round pruning more of the weights the
earlier rounds kept, to a final sparsity that is exact. SynFlow's iterative form (Tanaka et al. 2020:
data-free, 100 rounds, exponential schedule) and iterative magnitude pruning (magnitude, training
between rounds) are instances:

    ppf.schedule.iterative(model, "synflow", None, sparsity=0.99, rounds=100, input_shape=(3, 32, 32))
    ppf.schedule.iterative(model, "magnitude", None, sparsity=0.9, rounds=5, train=200,
                           train_data=batches, loss_fn=loss)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import criteria
from .. import masks as masks_
from .finetune import finetune

SCHEDULES = ("exponential", "linear", "cubic")
_GRANULARITIES = {"global": masks_.global_unstructured, "layerwise": masks_.layerwise, "per-row": masks_.per_row}


def round_sparsity(sparsity: float, rounds: int, r: int, schedule: str = "exponential") -> float:
    """The sparsity after round r of `rounds` (r = 1..rounds), reaching `sparsity` at the last:
    exponential: 1 − (1 − s)^(r/R) (the same fraction of the remaining weights each round, SynFlow);
    linear: s·r/R; cubic: s·(1 − (1 − r/R)³) (Zhu and Gupta 2017: fast first, slow at the end).

    Args:
        sparsity: the final sparsity.
        rounds: the number of rounds.
        r: the round, 1..rounds.
        schedule: "exponential", "linear" or "cubic".

    Returns:
        The sparsity after round r.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 1 <= r <= rounds:
        raise ValueError(f"round must be in [1, {rounds}], got {r}")
    if r == rounds:
        return float(sparsity)
    t = r / rounds
    if schedule == "exponential":
        return 1.0 - (1.0 - sparsity) ** t
    if schedule == "linear":
        return sparsity * t
    return sparsity * (1.0 - (1.0 - t) ** 3)


@dataclass
class Round:
    """One round: the sparsity asked, the sparsity reached (pruned / scored entries), the metrics of
    `evaluate` after the round's training, the seconds it took."""

    round: int
    target: float
    achieved: float
    pruned: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class IterativeReport:
    """What `iterative` did: the final masks (True = kept) and the rounds."""

    masks: dict[str, Tensor]
    rounds: list[Round]
    schedule: str
    scored: int

    @property
    def sparsity(self) -> float:
        return self.rounds[-1].achieved if self.rounds else 0.0

    def table(self) -> str:
        """The rounds as a Markdown table."""
        keys = list(dict.fromkeys(k for r in self.rounds for k in r.metrics))
        lines = ["| round | target | achieved | " + " | ".join(keys) + (" | " if keys else "") + "seconds |"]
        lines.append("|---" * (4 + len(keys)) + "|")
        for r in self.rounds:
            values = "".join(f"{r.metrics.get(k, float('nan')):.4f} | " for k in keys)
            lines.append(f"| {r.round} | {r.target:.4f} | {r.achieved:.4f} | {values}{r.seconds:.1f} |")
        return "\n".join(lines)


def _scores_of(criterion, model, data, kwargs) -> dict[str, Tensor]:
    if isinstance(criterion, str):
        if criterion not in criteria.CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(sorted(criteria.CRITERIA))}")
        if criteria.CRITERIA[criterion].kind != "weight":
            raise ValueError(f"criterion {criterion!r} scores channels; iterative prunes weights")
        return criteria.CRITERIA[criterion](model, data, **kwargs)
    if callable(criterion):
        return criterion(model, data, **kwargs)
    raise TypeError(f"criterion must be a criterion name or a callable (model, data) -> scores, got {criterion!r}")


def _excluding(scores: Mapping[str, Tensor], keep: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Scores where every already-pruned entry is −inf and every live one finite (−inf clamped to the
    lowest float), so that the pruned entries are the first pruned again, whatever their new score."""
    if keep is None:
        return dict(scores)
    out = {}
    for name, s in scores.items():
        s = s.float()
        out[name] = torch.where(keep[name].to(s.device), s.clamp_min(torch.finfo(s.dtype).min), -torch.inf)
    return out


def _progress(rounds: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=rounds, desc="rounds", unit="round", disable=quiet or not sys.stderr.isatty())


def iterative(
    model: nn.Module,
    criterion: str | Callable[..., dict[str, Tensor]],
    data: Iterable | None = None,
    *,
    sparsity: float,
    rounds: int,
    schedule: str = "exponential",
    train: None | int | Callable[[nn.Module, int], Any] = None,
    train_data: Sequence | None = None,
    granularity: str = "global",
    evaluate: Callable[[nn.Module], float | Mapping[str, float]] | None = None,
    lr: float = 1e-4,
    quiet: bool = False,
    **criterion_kwargs,
) -> IterativeReport:
    """Prunes `model` in place over `rounds` rounds. Round r scores the model as it is (the weights
    pruned so far are zero) with `criterion` (a registered weight criterion's name, or a callable
    `(model, data, **criterion_kwargs) -> {param name: scores}`), then masks it to the round's sparsity
    (`round_sparsity`: `schedule` "exponential", "linear" or "cubic") at `granularity` ("global",
    "layerwise", "per-row"). The masks are kept: a weight pruned in one round stays pruned (its new
    score is ignored), and every round prunes exactly round(s_r × N) entries of its groups, so the
    last round reaches exactly round(sparsity × N).

    train: None (no training between rounds: SynFlow's iterative form), an int (that many AdamW
    steps of `finetune` on `train_data` with `loss_fn`/`forward` from `criterion_kwargs`, at `lr`),
    or a callable `train(model, round)` (your loop; the masks are kept around it, `masks.keep`).
    evaluate: `evaluate(model)` after each round's training, a number or {metric: value}, recorded in
    the report's rounds. A progress bar over the rounds is drawn on a terminal unless `quiet`.
    Returns an IterativeReport (final masks, per-round target and achieved sparsity and metrics).

    Args:
        model: the model, pruned in place.
        criterion: a weight criterion's name or a scoring callable.
        data: the criterion's calibration batches.
        sparsity: the final sparsity.
        rounds: the number of rounds.
        schedule: "exponential", "linear" or "cubic".
        train: None, a number of steps, or `train(model, round)`.
        train_data: the batches the steps train on.
        granularity: "global", "layerwise" or "per-row".
        evaluate: `evaluate(model)` after each round.
        lr: the learning rate of the steps.
        quiet: no progress bar.
        **criterion_kwargs: the criterion's arguments.

    Returns:
        The IterativeReport.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(_GRANULARITIES)}, got {granularity!r}")
    if isinstance(train, bool) or not (train is None or isinstance(train, int) or callable(train)):
        raise TypeError(f"train must be None, a number of steps or a callable (model, round), got {train!r}")
    if isinstance(train, int) and train and not train_data:
        raise ValueError("train= a number of steps needs train_data= (the batches to train on)")
    build = _GRANULARITIES[granularity]
    keep: dict[str, Tensor] | None = None
    report = IterativeReport(masks={}, rounds=[], schedule=schedule, scored=0)
    bar = _progress(rounds, quiet)
    try:
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            target = round_sparsity(float(sparsity), rounds, r, schedule)
            scores = _scores_of(criterion, model, data, criterion_kwargs)
            keep = build(_excluding(scores, keep), target)
            masks_.apply_masks(model, keep)
            if isinstance(train, int) and train:
                finetune(
                    model,
                    train_data,
                    train,
                    masks=keep,
                    loss_fn=criterion_kwargs.get("loss_fn"),
                    forward=criterion_kwargs.get("forward"),
                    lr=lr,
                )
            elif callable(train):
                with masks_.keep(model, keep):
                    train(model, r)
            metrics = {}
            if evaluate is not None:
                value = evaluate(model)
                metrics = (
                    {k: float(v) for k, v in value.items()} if isinstance(value, Mapping) else {"metric": float(value)}
                )
            pruned = sum(int((~m).sum()) for m in keep.values())
            report.scored = sum(m.numel() for m in keep.values())
            report.rounds.append(Round(r, target, pruned / report.scored, pruned, metrics, time.perf_counter() - start))
            bar.set_postfix_str(f"sparsity {pruned / report.scored:.4f}")
            bar.update()
    finally:
        bar.close()
    report.masks = keep
    return report
