"""The main job behind `pyprune-fast prune`: score a model once per criterion, build the masks of every
sparsity from those scores, and measure what each pruned model keeps of the dense one."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import criteria, masks
from .criteria.engine import select_params, split_batch
from .zoo import Bundle

# What each criterion needs besides the weights: "data" (calibration batches), "loss" (a loss on
# them), "input" (an input shape, or tensor batches to read one from).
NEEDS: dict[str, tuple[str, ...]] = {
    "magnitude": (),
    "synflow": ("input",),
    "wanda": ("data",),
    "feature_l1": ("data",),
    "refer": ("data",),
    "snip": ("data", "loss"),
    "grasp": ("data", "loss"),
    "obd": ("data", "loss"),
    "afr": ("data", "loss"),
}
_WHAT = {
    "data": "calibration data",
    "loss": "a loss (loss_fn, or integer class targets)",
    "input": "an input shape (or tensor batches to read it from)",
}

GRANULARITIES: dict[str, Callable[[dict[str, Tensor], float], dict[str, Tensor]]] = {
    "global": masks.global_unstructured,
    "layerwise": masks.layerwise,
    "per-row": masks.per_row,
}
TWO_FOUR = "2:4"


class CriterionDataError(ValueError):
    """A criterion asked of a model that lacks what the criterion needs (data, a loss, an input shape)."""


def _available(bundle: Bundle) -> dict[str, bool]:
    first = split_batch(bundle.calibration[0]) if bundle.calibration else (None, None)
    integer_targets = isinstance(first[1], Tensor) and not first[1].is_floating_point()
    return {
        "data": bool(bundle.calibration),
        "loss": bool(bundle.calibration) and (bundle.loss_fn is not None or integer_targets),
        "input": bundle.input_shape is not None or isinstance(first[0], Tensor),
    }


def check_criteria(bundle: Bundle, names: list[str]) -> None:
    """CriterionDataError naming every asked criterion the bundle cannot feed, and what it lacks."""
    unknown = [n for n in names if n not in criteria.CRITERIA]
    if unknown:
        raise ValueError(f"unknown criteria {unknown}; valid criteria: {', '.join(sorted(criteria.CRITERIA))}")
    has = _available(bundle)
    problems = []
    for name in names:
        lacking = [_WHAT[n] for n in NEEDS[name] if not has[n]]
        if lacking:
            problems.append(f"criterion {name!r} needs {' and '.join(lacking)}")
    if problems:
        possible = [n for n in criteria.CRITERIA if all(has[x] for x in NEEDS[n])]
        raise CriterionDataError(
            f"{'; '.join(problems)}, which model {bundle.name!r} does not provide "
            f"({bundle.info.get('data', 'no data')}); criteria it can run: {', '.join(possible) or 'none'}"
        )


def check_sparsities(values: list[float]) -> list[float]:
    """The distinct sparsities in increasing order, each checked to be in [0, 1]."""
    for s in values:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"--sparsity must be in [0, 1], got {s!r}")
    return sorted(set(values))


def two_four_split(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], dict[str, str]]:
    """(names 2:4 applies to, {skipped name: why}): a weight viewed as (out, -1) is eligible when it
    has at least two dimensions and its row length is divisible by 4."""
    eligible, skipped = [], {}
    for name, shape in shapes.items():
        row = math.prod(shape[1:])
        if len(shape) < 2 or row % 4:
            skipped[name] = f"row length {row} (shape {tuple(shape)}) is not divisible by 4: left dense"
        else:
            eligible.append(name)
    return eligible, skipped


def build_masks(scores: dict[str, Tensor], granularity: str, sparsity: float) -> dict[str, Tensor]:
    """Keep-masks of one granularity; for 2:4, masks of the eligible weights only."""
    if granularity == TWO_FOUR:
        eligible, _ = two_four_split({n: tuple(s.shape) for n, s in scores.items()})
        return masks.n_m({n: scores[n] for n in eligible}, 2, 4)
    return GRANULARITIES[granularity](scores, sparsity)


@contextlib.contextmanager
def masked(model: nn.Module, keep: dict[str, Tensor]) -> Iterator[nn.Module]:
    """The model with `keep` applied in place; its weights are restored on exit."""
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in keep}
    try:
        masks.apply_masks(model, keep)
        yield model
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                named[n].copy_(value)


def score_criterion(bundle: Bundle, name: str, batches: int) -> dict[str, Tensor]:
    """The criterion's scores of the bundle's model from its first `batches` calibration batches."""
    kwargs = bundle.criterion_kwargs(batches)
    if name == "synflow" and bundle.input_shape is not None:
        return criteria.CRITERIA[name](bundle.model, None, input_shape=bundle.input_shape, **kwargs)
    return criteria.CRITERIA[name](bundle.model, bundle.calibration, **kwargs)


@dataclass
class Result:
    """One criterion at one sparsity: what was pruned and what the pruned model keeps."""

    criterion: str
    sparsity: float
    achieved: float
    metrics: dict[str, float]
    layers: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """Everything a prune run measured."""

    model: str
    info: dict
    granularity: str
    batches: int
    device: str
    parameters: int
    scored: dict[str, tuple[int, ...]]
    skipped: dict[str, str]
    dense: dict[str, float]
    results: list[Result] = field(default_factory=list)
    score_seconds: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def criteria(self) -> list[str]:
        return list(dict.fromkeys(r.criterion for r in self.results))

    @property
    def sparsities(self) -> list[float]:
        return sorted({r.sparsity for r in self.results})

    @property
    def primary(self) -> str | None:
        """The metric criteria are ranked by: the evaluation's first."""
        return next(iter(self.dense), None)

    def ranking(self) -> list[tuple[str, float]]:
        """(criterion, mean of the primary metric over the sparsities), best first; ties broken by the
        means of the other metrics in order, then by name."""
        if self.primary is None:
            return []
        means = {}
        for name in self.criteria:
            rows = [r.metrics for r in self.results if r.criterion == name]
            means[name] = [sum(m[k] for m in rows) / len(rows) for k in self.dense]
        order = sorted(means, key=lambda n: ([-v for v in means[n]], n))
        return [(n, means[n][0]) for n in order]


def _bars(quiet: bool, scoring: int, evaluations: int):
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    return (
        tqdm(total=scoring, desc="scoring   ", unit="criterion", position=0, disable=disable),
        tqdm(total=evaluations, desc="evaluating", unit="model", position=1, disable=disable),
    )


def prune(
    bundle: Bundle,
    names: list[str],
    sparsities: list[float],
    granularity: str = "global",
    batches: int = 4,
    *,
    on_masks: Callable[[Result, dict[str, Tensor]], None] | None = None,
    quiet: bool = True,
) -> Run:
    """Scores the bundle's model with each criterion once; for each sparsity builds the masks from
    those scores, applies them, evaluates, calls `on_masks(result, masks)` while they are applied
    (to save them or the pruned weights) and restores the weights. The dense model is evaluated once.
    For 2:4 the sparsity list is [0.5] and ineligible weights are left dense (Run.skipped)."""
    if granularity != TWO_FOUR and granularity not in GRANULARITIES:
        raise ValueError(f"--granularity must be one of {[*GRANULARITIES, TWO_FOUR]}, got {granularity!r}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"--batches must be a positive int, got {batches!r}")
    check_criteria(bundle, names)
    sparsities = [0.5] if granularity == TWO_FOUR else check_sparsities(sparsities)
    model = bundle.model
    shapes = {n: tuple(p.shape) for n, p in select_params(model, bundle.params).items()}
    skipped = {}
    if granularity == TWO_FOUR:
        eligible, skipped = two_four_split(shapes)
        if not eligible:
            raise ValueError("--granularity 2:4: no scored weight has a row length divisible by 4")
    used = min(batches, len(bundle.calibration)) if bundle.calibration else 0
    start = time.perf_counter()
    scoring_bar, eval_bar = _bars(quiet, len(names), 1 + len(names) * len(sparsities))
    try:
        dense = {k: float(v) for k, v in bundle.evaluate(model).items()} if bundle.evaluate is not None else {}
        eval_bar.update()
        run = Run(
            model=bundle.name,
            info=dict(bundle.info),
            granularity=granularity,
            batches=used,
            device=str(next(model.parameters()).device),
            parameters=sum(p.numel() for p in model.parameters()),
            scored=shapes,
            skipped=skipped,
            dense=dense,
            seconds={"dense_evaluation": time.perf_counter() - start},
        )
        for name in names:
            scoring_bar.set_postfix_str(name)
            t0 = time.perf_counter()
            scores = score_criterion(bundle, name, batches)
            run.score_seconds[name] = time.perf_counter() - t0
            scoring_bar.update()
            for sparsity in sparsities:
                eval_bar.set_postfix_str(f"{name} @ {sparsity:g}")
                keep = build_masks(scores, granularity, sparsity)
                pruned = sum(int((~m).sum()) for m in keep.values())
                with masked(model, keep):
                    metrics = bundle.evaluate(model) if bundle.evaluate is not None else {}
                    result = Result(
                        criterion=name,
                        sparsity=sparsity,
                        achieved=pruned / sum(math.prod(s) for s in shapes.values()),
                        metrics={k: float(v) for k, v in metrics.items()},
                        layers={n: 1.0 - keep[n].float().mean().item() if n in keep else 0.0 for n in shapes},
                    )
                    if on_masks is not None:
                        on_masks(result, keep)
                run.results.append(result)
                eval_bar.update()
            del scores
    finally:
        scoring_bar.close()
        eval_bar.close()
    run.seconds["prune"] = time.perf_counter() - start
    return run
