"""Sensitivity analysis: prune one layer (or one block) at a time at each sparsity, measure, restore;
and the per-layer sparsities that meet a global budget with the least loss the measured curves
predict (greedy over the curves)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import criteria
from .. import masks as masks_
from ..modeling import select_params

GRANULARITIES = ("layer", "block")


def units_of(names: Sequence[str], granularity: str) -> dict[str, list[str]]:
    """The units pruned together, {unit: parameter names}, in order: "layer" — each parameter (its
    module's name); "block" — the parameters under the same numbered child of a container (the name
    up to its first all-digit part, e.g. `bert.encoder.layer.3`), each other parameter its own unit.

    Args:
        names: parameter names.
        granularity: "layer" or "block".

    Returns:
        {unit: parameter names}.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    out: dict[str, list[str]] = {}
    for name in names:
        unit = name.rsplit(".", 1)[0] if "." in name else name
        if granularity == "block":
            match = re.match(r"^(.*?\.\d+)(\.|$)", name)
            unit = match.group(1) if match else unit
        out.setdefault(unit, []).append(name)
    return out


@dataclass
class SensitivityReport:
    """Per unit and sparsity the metric measured with only that unit pruned (`curves[unit][i]` at
    `sparsities[i]`), the dense metric, each unit's parameters and entry count."""

    metric: str
    dense: float
    sparsities: list[float]
    curves: dict[str, list[float]]
    units: dict[str, list[str]]
    sizes: dict[str, int]
    higher_better: bool = True

    def loss(self, unit: str) -> list[float]:
        """The predicted loss of pruning `unit` at each sparsity (0 first): how much worse than dense."""
        sign = 1.0 if self.higher_better else -1.0
        return [0.0] + [sign * (self.dense - v) for v in self.curves[unit]]

    def table(self) -> str:
        """A Markdown table: one row per unit, one column per sparsity."""
        head = "| unit | entries | " + " | ".join(f"{s:g}" for s in self.sparsities) + " |"
        lines = [head, "|---" * (2 + len(self.sparsities)) + "|"]
        for unit, values in self.curves.items():
            lines.append(f"| {unit} | {self.sizes[unit]} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> None:
        """The curves (metric vs sparsity, one line per unit, the dense value dashed) as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for unit, values in self.curves.items():
            ax.plot([0.0, *self.sparsities], [self.dense, *values], marker="o", label=unit)
        ax.axhline(self.dense, color="gray", linestyle="--", label="dense")
        ax.set_xlabel("sparsity of the unit (the rest dense)")
        ax.set_ylabel(self.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(title or f"sensitivity: {self.metric} with one unit pruned")
        fig.savefig(path, format="png", dpi=110)


def _metric(value, metric: str | None) -> tuple[str, float]:
    if isinstance(value, Mapping):
        key = metric or next(iter(value))
        if key not in value:
            raise ValueError(f"metric {key!r} is not among evaluate's metrics {list(value)}")
        return key, float(value[key])
    return metric or "metric", float(value)


def sensitivity(
    model: nn.Module,
    data: Iterable | None,
    evaluate: Callable[[nn.Module], float | Mapping[str, float]],
    *,
    sparsities: Sequence[float] = (0.5, 0.7, 0.9),
    criterion: str | Callable[..., dict[str, Tensor]] = "magnitude",
    granularity: str = "layer",
    params=None,
    metric: str | None = None,
    higher_better: bool = True,
    quiet: bool = True,
    **criterion_kwargs,
) -> SensitivityReport:
    """Scores the model once with `criterion` (a weight criterion's name or a callable `(model, data,
    **criterion_kwargs) -> scores`) on `data`; then for each unit (`granularity` "layer": each scored
    parameter; "block": each numbered block, see `units_of`) and each sparsity prunes exactly
    round(s × the unit's entries) of that unit alone (lowest scores first, one threshold over the
    unit), calls `evaluate(model)` (a number, or {metric: value}: `metric=` picks one, default the
    first) and restores the unit's weights bit for bit. `params`: the scored parameters (as the
    criteria take them; default every Linear/Conv weight). Returns a SensitivityReport.

    Args:
        model: the model (restored after each unit).
        data: the criterion's calibration batches.
        evaluate: `evaluate(model)`.
        sparsities: the sparsities each unit is pruned to.
        criterion: a weight criterion's name or a scoring callable.
        granularity: "layer" or "block".
        params: the scored parameters.
        metric: the metric of a dict evaluation.
        higher_better: whether a higher metric is better.
        quiet: no progress bar.
        **criterion_kwargs: the criterion's arguments.

    Returns:
        The SensitivityReport.
    """
    sparsities = [float(s) for s in sparsities]
    if not sparsities or any(not 0.0 < s <= 1.0 for s in sparsities):
        raise ValueError(f"sparsities must be a non-empty list of values in (0, 1], got {sparsities}")
    sparsities = sorted(set(sparsities))
    if isinstance(criterion, str):
        if criterion not in criteria.CRITERIA or criteria.CRITERIA[criterion].kind != "weight":
            weight = [n for n, c in criteria.CRITERIA.items() if c.kind == "weight"]
            raise ValueError(f"criterion must be a weight criterion ({', '.join(weight)}), got {criterion!r}")
        scores = criteria.CRITERIA[criterion](model, data, params=params, **criterion_kwargs)
    elif callable(criterion):
        scores = criterion(model, data, **criterion_kwargs)
    else:
        raise TypeError(f"criterion must be a criterion name or a callable, got {criterion!r}")
    named = select_params(model, list(scores))
    units = units_of(list(scores), granularity)
    key, dense = _metric(evaluate(model), metric)
    report = SensitivityReport(
        metric=key,
        dense=dense,
        sparsities=sparsities,
        curves={},
        units=units,
        sizes={u: sum(named[n].numel() for n in names) for u, names in units.items()},
        higher_better=higher_better,
    )
    from tqdm import tqdm

    bar = tqdm(total=len(units) * len(sparsities), desc="sensitivity", disable=quiet or not sys.stderr.isatty())
    try:
        for unit, names in units.items():
            saved = {n: named[n].detach().clone() for n in names}
            values = []
            try:
                for s in sparsities:
                    masks_.global_unstructured({n: scores[n] for n in names}, s, apply_to=named)
                    values.append(_metric(evaluate(model), key)[1])
                    with torch.no_grad():
                        for n in names:
                            named[n].copy_(saved[n])
                    bar.update()
            finally:
                with torch.no_grad():
                    for n in names:
                        named[n].copy_(saved[n])
            report.curves[unit] = values
    finally:
        bar.close()
    return report


def allocate(report: SensitivityReport, budget: float) -> dict[str, float]:
    """Per-unit sparsities whose pruned entries add up to `budget` × all the report's entries, with
    the least total predicted loss: each unit's loss at a sparsity is read off its measured curve
    (linear between the measured points, 0 at 0) and the losses of the units are added. Greedy: from
    all units dense, repeatedly move the unit whose next move (to any of its later measured points)
    costs the least predicted loss per pruned entry; the last move stops part-way (on the line
    between two measured points) where the budget is met exactly. Raises if the budget exceeds what
    the highest measured sparsity can reach.

    Args:
        report: the measured curves.
        budget: the global sparsity to allocate.

    Returns:
        {unit: sparsity}.
    """
    total = sum(report.sizes.values())
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget!r}")
    reachable = max(report.sparsities)
    if budget > reachable + 1e-12:
        raise ValueError(f"budget {budget} is above the highest measured sparsity {reachable}: measure higher ones")
    points = [0.0, *report.sparsities]
    at = dict.fromkeys(report.curves, 0)  # index into points per unit
    losses = {u: report.loss(u) for u in report.curves}
    need = budget * total
    done = 0.0
    alloc = dict.fromkeys(report.curves, 0.0)
    while need - done > 1e-9 * max(total, 1):
        best = None
        for u, i in at.items():
            for j in range(i + 1, len(points)):
                gain = report.sizes[u] * (points[j] - points[i])
                if gain <= 0:
                    continue
                cost = (losses[u][j] - losses[u][i]) / gain
                if best is None or cost < best[0] - 1e-15:
                    best = (cost, u, j, gain)
        if best is None:
            break
        _, u, j, gain = best
        i = at[u]
        if done + gain >= need:
            alloc[u] = points[i] + (need - done) / report.sizes[u]
            done = need
            break
        at[u] = j
        alloc[u] = points[j]
        done += gain
    return alloc


def predicted_loss(report: SensitivityReport, allocation: Mapping[str, float]) -> float:
    """The sum over units of each unit's curve (linear between measured points) at its sparsity.

    Args:
        report: the measured curves.
        allocation: {unit: sparsity}.

    Returns:
        The predicted loss.
    """
    points = [0.0, *report.sparsities]
    total = 0.0
    for u, s in allocation.items():
        curve = report.loss(u)
        total += _interp(points, curve, s)
    return total


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    for k in range(1, len(xs)):
        if x <= xs[k] + 1e-12:
            t = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
            return ys[k - 1] + t * (ys[k] - ys[k - 1])
    return ys[-1]


def allocation_masks(
    report: SensitivityReport, scores: Mapping[str, Tensor], allocation: Mapping[str, float]
) -> dict[str, Tensor]:
    """Keep-masks realizing an allocation: each unit's entries pruned at its sparsity by one
    threshold over the unit's scores (exactly round(s_u × entries of u)).

    Args:
        report: the measured curves (its units).
        scores: {parameter name: scores}.
        allocation: {unit: sparsity}.

    Returns:
        {parameter name: bool keep-mask}.
    """
    out = {}
    for unit, names in report.units.items():
        out.update(masks_.global_unstructured({n: scores[n] for n in names}, min(1.0, allocation.get(unit, 0.0))))
    return out
