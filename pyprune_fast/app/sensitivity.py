"""The job behind `pyprune-fast sensitivity`: each block (or layer) of a model pruned alone at each
sparsity and evaluated (schedule.sensitivity), the per-unit sparsities a global budget predicts, and
the files: sensitivity.json, sensitivity.md, sensitivity.png."""

from __future__ import annotations

import json
import math

from .. import schedule
from ..errors import UsageError
from .bundle import Bundle
from .runner import check_criteria, score_criterion

PLOT = "sensitivity.png"


def run(
    bundle: Bundle,
    criterion: str,
    sparsities: list[float],
    granularity: str,
    budget: float,
    batches: int,
    quiet: bool = True,
) -> tuple[schedule.SensitivityReport, dict[str, float]]:
    """The report and the allocation at `budget` for the bundle's model and its evaluation (the first
    metric), the scores from `criterion` on `batches` calibration batches."""
    if bundle.evaluate is None:
        raise UsageError(f"sensitivity evaluates the model after each pruning; model {bundle.name!r} has no evaluation")
    check_criteria(bundle, [criterion], "weight")
    report = schedule.sensitivity(
        bundle.model,
        None,
        bundle.evaluate,
        sparsities=sparsities,
        criterion=lambda model, data: score_criterion(bundle, criterion, batches),
        granularity=granularity,
        quiet=quiet,
    )
    return report, schedule.allocate(report, budget)


def write(report: schedule.SensitivityReport, allocation: dict[str, float], budget: float, meta: dict, paths) -> str:
    """Writes the JSON, the Markdown and the plot to `paths(name)`; returns the Markdown."""
    predicted = schedule.predicted_loss(report, allocation)
    doc = {
        **meta,
        "metric": report.metric,
        "dense": report.dense,
        "sparsities": report.sparsities,
        "curves": report.curves,
        "units": report.units,
        "sizes": report.sizes,
        "budget": budget,
        "allocation": allocation,
        "predicted_loss": predicted,
    }
    with open(paths("sensitivity.json"), "w") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
    lines = [
        f"# pyprune-fast sensitivity: {meta['model']}",
        "",
        f"{report.metric} with one unit pruned ({meta['granularity']}, criterion {meta['criterion']}), the rest "
        f"dense; dense {report.metric} {report.dense:.4f}.",
        "",
        report.table(),
        "",
        f"## Allocation at a global budget of {budget:g}",
        "",
        f"Greedy over the measured curves (least predicted loss per pruned entry); predicted {report.metric} loss "
        f"(the sum of the units' losses): {predicted:.4f}.",
        "",
        "| unit | entries | sparsity |",
        "|---|---|---|",
        *(f"| {u} | {report.sizes[u]} | {s:.4f} |" for u, s in allocation.items()),
        "",
        f"![sensitivity]({PLOT})",
        "",
    ]
    text = "\n".join(lines)
    with open(paths("sensitivity.md"), "w") as f:
        f.write(text)
    report.plot(paths(PLOT), f"{meta['model']}: {report.metric} with one {meta['granularity']} pruned")
    if not all(math.isfinite(v) for values in report.curves.values() for v in values):
        raise ValueError("the evaluation returned a non-finite value")
    return text
