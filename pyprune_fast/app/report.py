"""What `pyprune-fast prune` writes about a Run: report.json, report.md, the summary table on stdout
and the plots (retention vs sparsity per criterion, per-layer sparsity; for causal LMs perplexity per
method and target, and the relative output error of each pruned decoder block)."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone

from .results import TWO_FOUR, Run

RETENTION_PLOT = "retention.png"
LAYERS_PLOT = "layer-sparsity.png"
PERPLEXITY_PLOT = "perplexity.png"
BLOCK_ERROR_PLOT = "block-error.png"
WIDTHS_PLOT = "widths.png"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)


def _label(run: Run, sparsity: float) -> str:
    return TWO_FOUR if run.granularity == TWO_FOUR else f"{sparsity:g}"


def retention(run: Run, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric over the dense model's value (NaN where the dense value is 0)."""
    return {k: (v / run.dense[k] if run.dense.get(k) else math.nan) for k, v in metrics.items()}


def _scored(run: Run) -> int:
    return sum(math.prod(s) for s in run.scored.values())


def _finite(value):
    """The value with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _finetuned(run: Run, r) -> dict:
    losses = r.finetune_losses or [None]
    return {
        "metrics": r.finetuned,
        "retention": retention(run, r.finetuned),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def to_json(run: Run, command: list[str], files: list[str]) -> dict:
    """The report as a JSON-able dict (non-finite numbers as null)."""
    from .._version import __version__

    return _finite(
        {
            "pyprune_fast_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "model": {
                "name": run.model,
                "parameters": run.parameters,
                "scored_parameters": _scored(run),
                "scored_tensors": {n: list(s) for n, s in run.scored.items()},
                **run.info,
            },
            "granularity": run.granularity,
            "schedule": run.schedule,
            **({"finetune": run.finetune} if run.finetune else {}),
            "calibration_batches": run.batches,
            "device": run.device,
            "skipped": run.skipped,
            "primary_metric": run.primary,
            "dense": run.dense,
            "criteria": {n: {"score_seconds": round(s, 3)} for n, s in run.score_seconds.items()},
            "results": [
                {
                    "criterion": r.criterion,
                    "sparsity": _label(run, r.sparsity),
                    "achieved_sparsity": r.achieved,
                    "metrics": r.metrics,
                    "retention": retention(run, r.metrics),
                    "files": r.files,
                    "layer_sparsity": r.layers,
                    **({"parameters": r.parameters} if r.parameters is not None else {}),
                    **({"rounds": r.rounds} if r.rounds is not None else {}),
                    **({"peak_bytes": r.peak_bytes} if r.peak_bytes is not None else {}),
                    **({"block_error": r.block_error} if r.block_error is not None else {}),
                    **({"finetuned": _finetuned(run, r)} if r.finetuned is not None else {}),
                    **({"structured": r.structure} if r.structure is not None else {}),
                }
                for r in run.results
            ],
            "ranking": [{"criterion": n, f"mean_{run.primary}": v} for n, v in run.ranking()],
            **(
                {"ranking_finetuned": [{"criterion": n, f"mean_{run.primary}": v} for n, v in run.ranking(True)]}
                if run.finetuned
                else {}
            ),
            **({"peak_measure": run.peak_measure} if run.llm and not run.structured else {}),
            **({"structured": run.structured} if run.structured else {}),
            "seconds": {k: round(v, 3) for k, v in run.seconds.items()},
            "files": files,
        }
    )


def _target(target) -> str:
    return target if isinstance(target, str) else f"{100 * target:g} %"


def _removes_experts(run: Run) -> bool:
    """Whether a structured run removed routed experts (--structure experts): its ratios count each MoE
    layer's experts, not the blocks' parameters."""
    return run.structured.get("structure") == "experts"


def _removed(run: Run) -> tuple[str, str]:
    """What a structured run's ratio counts: (column name, its meaning) — the blocks' parameters, or with
    --structure experts each MoE layer's routed experts."""
    if _removes_experts(run):
        return "experts removed", "the fraction of each MoE layer's routed experts removed"
    return "blocks' removed", "the fraction of the decoder (or encoder) blocks' parameters removed"


def _setup_lines(run: Run) -> list[str]:
    if run.structured:
        unit = "of each MoE layer's routed experts" if _removes_experts(run) else "of the blocks' parameters"
        return [
            f"model {run.model}: {_count(run.parameters)} parameters; structured pruning ({run.granularity}) at "
            f"ratios {', '.join(_target(t) for t in run.targets)} {unit}; device {run.device}",
            *(
                [f"distilled {run.finetune['steps']} steps (AdamW, lr {run.finetune['lr']:g}): {run.finetune['data']}"]
                if run.finetune
                else []
            ),
        ]
    lines = [
        f"model {run.model}: {_count(run.parameters)} parameters, {_count(_scored(run))} scored "
        f"in {len(run.scored)} weight tensors",
        f"targets {', '.join(_target(t) for t in run.targets)} (granularity {run.granularity}); device {run.device}"
        if run.llm
        else f"granularity {run.granularity}; {run.batches} calibration batches; device {run.device}",
    ]
    if run.schedule != "one-shot":
        lines.append(f"schedule {run.schedule}")
    if run.finetune:
        lines.append(
            f"fine-tuned {run.finetune['steps']} steps (AdamW, lr {run.finetune['lr']:g}, masks kept) on "
            f"{run.finetune['data']}"
        )
    if run.skipped:
        lines.append(f"2:4 left {len(run.skipped)} weight tensors dense (row length not divisible by 4)")
    return lines


def summary_table(run: Run) -> str:
    """The plain-text table printed on stdout."""
    metrics = list(run.dense)
    lines = _setup_lines(run)
    if metrics:
        lines.append("dense       " + "  ".join(f"{m} {run.dense[m]:.4f}" for m in metrics))
    lines.append("")
    target, achieved, seconds = (
        ("ratio", "removed", "prune s") if run.structured else ("sparsity", "achieved", "score s")
    )
    head = f"{target:>8s}  {'criterion':12s}" + "".join(f" {m:>15s}" for m in metrics)
    after = "distilled" if run.structured else "fine-tuned"
    tuned = [f"{after} {m}"[:15] for m in metrics] if run.finetuned else []
    lines.append(head + "".join(f" {m:>15s}" for m in tuned) + f" {achieved:>9s} {seconds:>8s}")
    for r in sorted(run.results, key=lambda r: (r.sparsity, run.criteria.index(r.criterion))):
        row = f"{_label(run, r.sparsity):>8s}  {r.criterion:12s}" + "".join(f" {r.metrics[m]:15.4f}" for m in metrics)
        if tuned:
            row += "".join(f" {r.finetuned[m]:15.4f}" for m in metrics)
        lines.append(row + f" {r.achieved:9.4f} {run.score_seconds[r.criterion]:8.1f}")
    if run.structured:
        lines += [""] + structured_lines(run)
    for after in (False, True):
        ranking = run.ranking(after)
        if ranking:
            lines.append("")
            order = "  ".join(f"{i}. {n} {v:.4f}" for i, (n, v) in enumerate(ranking, 1))
            when = " after fine-tuning" if after else ""
            lines.append(f"ranking by mean {run.primary}{when} over sparsities: {order}")
    return "\n".join(lines)


def _ranking_table(run, ranking: list[tuple[str, float]], finetuned: bool) -> list[str]:
    """The markdown rows of a ranking: each criterion's mean of every metric over the sparsities (after
    fine-tuning with `finetuned`), and its scoring time for the one-shot ranking."""
    metrics = list(run.dense)
    timed = not finetuned
    lines = [
        "| rank | criterion | " + " | ".join(f"mean {m}" for m in metrics) + (" | scoring time |" if timed else " |"),
        "|---" * (2 + timed + len(metrics)) + "|",
    ]
    for i, (name, _) in enumerate(ranking, 1):
        rows = [r.finetuned if finetuned else r.metrics for r in run.results if r.criterion == name]
        means = " | ".join(f"{sum(m[k] for m in rows) / len(rows):.4f}" for k in metrics)
        lines.append(f"| {i} | {name} | {means} |" + (f" {run.score_seconds[name]:.1f} s |" if timed else ""))
    return lines


def _rounds_table(run: Run) -> list[str]:
    """The markdown section of --schedule iterative: each result's rounds, target and achieved sparsity."""
    traced = [r for r in run.results if r.rounds]
    if not traced:
        return []
    lines = ["", "## Rounds", "", f"Schedule {run.schedule}: the sparsity each round asked and reached.", ""]
    lines += ["| sparsity | criterion | round | target | achieved |", "|---" * 5 + "|"]
    for r in traced:
        head = f"| {_label(run, r.sparsity)} | {r.criterion} |"
        lines += [f"{head} {t['round']} | {t['target']:.4f} | {t['achieved']:.4f} |" for t in r.rounds]
    return lines


def markdown(run: Run, files: list[str], plots: list[str]) -> str:
    """report.md: setup, ranking, the results table, the rounds (iterative), the plots, the files."""
    metrics = list(run.dense)
    out = [f"# pyprune-fast prune: {run.model}", ""]
    out += [f"- {line}" for line in _setup_lines(run)]
    out += [f"- {k}: {v}" for k, v in run.info.items()]
    if metrics:
        out.append("- dense model: " + ", ".join(f"{m} {run.dense[m]:.4f}" for m in metrics))
    ranking = run.ranking()
    out += ["", "## Ranking", ""]
    if ranking:
        labels = ", ".join(_label(run, s) for s in run.sparsities)
        out += [
            f"By the mean {run.primary} over sparsities {labels} "
            f"({'lower' if run.primary in run.lower_better else 'higher'} is better; ties broken by the other "
            "metrics).",
            "",
            *_ranking_table(run, ranking, finetuned=False),
        ]
    else:
        out.append("This model has no evaluation: no ranking (sparsities only).")
    tuned_ranking = run.ranking(True)
    if tuned_ranking:
        out += ["", f"After fine-tuning, by the mean {run.primary}:", ""]
        out += _ranking_table(run, tuned_ranking, finetuned=True)
    out += ["", "## Results", ""]
    if run.structured:
        out += _structured_results(run)
    elif run.llm:
        out += _llm_results(run)
    else:
        out += _results(run)
    out += _rounds_table(run)
    out += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    if run.skipped:
        out += ["", "## Weights left dense by 2:4", ""] + [f"- `{n}`: {why}" for n, why in run.skipped.items()]
    out += ["", "## Files", ""] + [f"- `{f}`" for f in files] + [""]
    return "\n".join(out)


def _results(run: Run) -> list[str]:
    """The markdown results table of a model other than a causal LM."""
    metrics, out = list(run.dense), []
    tuned = [f"{m} after fine-tuning" for m in metrics] if run.finetuned else []
    columns = " | ".join(metrics + tuned) + (" | " if metrics else "")
    out.append("| sparsity | criterion | " + columns + "achieved | masks |")
    out.append("|---" * (4 + len(metrics) + len(tuned)) + "|")
    for r in sorted(run.results, key=lambda r: (r.sparsity, run.criteria.index(r.criterion))):
        values = "".join(f"{r.metrics[m]:.4f} ({100 * retention(run, r.metrics)[m]:.1f}%) | " for m in metrics)
        if tuned:
            values += "".join(f"{r.finetuned[m]:.4f} ({100 * retention(run, r.finetuned)[m]:.1f}%) | " for m in metrics)
        out.append(
            f"| {_label(run, r.sparsity)} | {r.criterion} | {values}{r.achieved:.4f} | `{r.files.get('masks', '')}` |"
        )
    if metrics:
        out += ["", "Percentages: the metric's retention, its value over the dense model's."]
    return out


def _split(name: str) -> tuple[str, str]:
    """A causal LM result's (method, target label) from its name: "wanda 2:4" → ("wanda", "2:4")."""
    method, _, pattern = name.partition(" ")
    return method, pattern


def _pattern(run: Run, r) -> str:
    return _split(r.criterion)[1] or _target(r.sparsity)


def _size(nbytes: int | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def _llm_results(run: Run) -> list[str]:
    """The markdown results of a causal LM: perplexity (and its ratio to the dense model's), achieved
    sparsity, time to prune, measured peak memory, and the relative output error of the pruned blocks."""
    tuned = run.finetuned
    out = [
        "| method | target | perplexity | × dense | "
        + ("perplexity after fine-tuning | " if tuned else "")
        + "achieved | time to prune | peak memory | block error: mean, worst (block) | masks |",
        "|---" * (9 + tuned) + "|",
    ]
    dense = run.dense.get("perplexity")  # none: the evaluation was skipped
    for r in run.results:
        ppl = r.metrics.get("perplexity")
        errors = [(e, i) for i, e in enumerate(r.block_error or []) if math.isfinite(e)]
        error = "not measured"
        if errors:
            worst, block = max(errors)
            error = f"{sum(e for e, _ in errors) / len(errors):.4f}, {worst:.4f} ({block})"
        after = f"{r.finetuned['perplexity']:.4f} | " if tuned else ""
        out.append(
            f"| {_split(r.criterion)[0]} | {_pattern(run, r)} | "
            + ("skipped | – | " if ppl is None else f"{ppl:.4f} | {ppl / dense:.2f} | ")
            + f"{after}{r.achieved:.4f} | {run.score_seconds[r.criterion]:.1f} s | {_size(r.peak_bytes)} | {error} | "
            f"`{r.files.get('masks', '')}` |"
        )
    out += [
        "",
        f"Peak memory: {run.peak_measure}. Block error: ‖f_pruned(X) − f_dense(X)‖ / ‖f_dense(X)‖ of each pruned "
        "decoder block on its calibration inputs X (the outputs of the blocks pruned before it), blocks counted "
        "from 0; not measured for methods that read no calibration data (magnitude).",
    ]
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def retention_plot(run: Run, path: str) -> None:
    """One panel per metric: its retention (value over the dense model's) vs the achieved sparsity, one
    line per criterion (after --finetune, dashed in the same color: after fine-tuning); the raw value
    where the dense one is 0."""
    metrics = list(run.dense)
    fig = _figure(5.0 * len(metrics), 4.0)
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        dense = run.dense[metric]
        for name in run.criteria:
            rows = sorted((r.achieved, r.metrics[metric]) for r in run.results if r.criterion == name)
            (line,) = ax.plot(
                [x for x, _ in rows], [y / dense if dense else y for _, y in rows], marker="o", label=name
            )
            tuned = sorted(
                (r.achieved, r.finetuned[metric]) for r in run.results if r.criterion == name and r.finetuned
            )
            if tuned:
                ax.plot(
                    [x for x, _ in tuned],
                    [y / dense if dense else y for _, y in tuned],
                    marker="s",
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{name} fine-tuned",
                )
        ax.axhline(1.0 if dense else 0.0, color="gray", linestyle="--", label="dense" if dense else None)
        ax.set_xlabel(f"sparsity of the scored weights ({run.granularity})")
        ax.set_ylabel(f"{metric} retention (dense = {dense:.4g})" if dense else metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run.model}: what each criterion keeps")
    fig.savefig(path, format="png", dpi=110)


def layers_plot(run: Run, path: str) -> None:
    """Per-layer sparsity at the highest sparsity, one line per criterion."""
    top = max(run.sparsities)
    names = list(run.scored)
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    fig = _figure(max(6.0, 0.22 * len(names)), 4.5)
    ax = fig.subplots()
    for r in run.results:
        if r.sparsity == top:
            ax.plot(range(len(names)), [r.layers[n] for n in names], marker=".", label=r.criterion)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n[len(prefix) :].removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("pruned fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{run.model}: per-layer sparsity at {_label(run, top)} ({run.granularity})")
    fig.savefig(path, format="png", dpi=110)


def _plain_log_labels(ax) -> None:
    """Tick labels of a log-scale y axis as plain numbers (20, 50, 100), not powers of ten: minor ticks
    at 2 and 5 of each decade only, or every minor tick when the axis spans less than a factor of 4
    (call after the limits are set)."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_ylim()
    digits = "123456789" if hi < 4 * lo else "25"
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in digits else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def perplexity_plot(run: Run, path: str) -> None:
    """Causal LMs: the perplexity of each method (groups of bars) at each target (one bar each), on a
    log scale, the dense model's as a line; after --finetune, hatched bars beside."""
    methods = list(dict.fromkeys(_split(r.criterion)[0] for r in run.results))
    patterns = list(dict.fromkeys(_pattern(run, r) for r in run.results))
    series = [(p, False) for p in patterns] + ([(p, True) for p in patterns] if run.finetuned else [])
    width = 0.8 / len(series)
    fig = _figure(max(5.0, 1.2 * len(methods) * len(series) ** 0.5 + 2.0), 4.2)
    ax = fig.subplots()
    dense = run.dense["perplexity"]
    shown = [dense]
    for k, (pattern, tuned) in enumerate(series):
        xs, ys = [], []
        for i, method in enumerate(methods):
            for r in run.results:
                if _split(r.criterion)[0] == method and _pattern(run, r) == pattern:
                    xs.append(i + (k - (len(series) - 1) / 2) * width)
                    ys.append((r.finetuned if tuned else r.metrics)["perplexity"])
        label = f"{pattern} fine-tuned" if tuned else pattern
        color = f"C{patterns.index(pattern)}"
        shown += ys
        bars = ax.bar(xs, ys, width, label=label, color=color, hatch="//" if tuned else None, edgecolor="white")
        ax.bar_label(bars, labels=[f"{y:.4g}" for y in ys], fontsize=8, padding=2)
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {dense:.4g}")
    ax.set_yscale("log")
    finite = [v for v in shown if math.isfinite(v) and v > 0] or [1.0]
    ax.set_ylim(min(finite) / 1.25, max(finite) * 1.6)  # room for the labels; never a zero-height range
    _plain_log_labels(ax)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(title="target")
    fig.suptitle(f"{run.model}: perplexity after pruning")
    fig.savefig(path, format="png", dpi=110)


def block_error_plot(run: Run, path: str) -> None:
    """Causal LMs: the relative output error of each pruned decoder block (PruneResult.block_error), one
    line per method and target (color by method, dashed for N:M patterns), on a log scale."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    methods = list(dict.fromkeys(_split(r.criterion)[0] for r in run.results))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for r in run.results:
        if r.block_error:
            method = _split(r.criterion)[0]
            pattern = _pattern(run, r)
            ax.plot(
                range(len(r.block_error)),
                r.block_error,
                marker=".",
                color=colors[method],
                linestyle="--" if ":" in pattern else "-",
                label=f"{method} {pattern}",
            )
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("‖f_pruned(X) − f_dense(X)‖ / ‖f_dense(X)‖")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.suptitle(f"{run.model}: relative output error of each pruned block\n(on its calibration inputs)")
    fig.savefig(path, format="png", dpi=110)


# --- structured pruning (--structure): smaller dense models ------------------------------------------


def _speed(row: dict) -> tuple[str, ...]:
    """The speed cells of a result: causal LMs' prefill and decode tokens/s, others' items/s, each
    "dense → pruned (×speed-up)"."""
    if "prefill_tps" in row:
        return (
            f"{row['dense_prefill_tps']:.0f} → {row['prefill_tps']:.0f} ({row['prefill_speedup']:.2f}×)",
            f"{row['dense_decode_tps']:.1f} → {row['decode_tps']:.1f} ({row['decode_speedup']:.2f}×)",
        )
    return (f"{row['dense_items_per_s']:.1f} → {row['items_per_s']:.1f} ({row['speedup']:.2f}×)",)


def _kept(r) -> str:
    """A result's kept widths in a few words: the blocks removed (depth), or the MLP widths and query
    heads (one value when uniform, else the range)."""
    s = r.structure
    if s["structure"] == "depth":
        return f"blocks {s['removed_blocks']} removed"

    def span(values: list[int]) -> str:
        return str(values[0]) if len(set(values)) == 1 else f"{min(values)}–{max(values)}"

    if s["structure"] == "experts":
        return f"experts {span(s['experts'])} per MoE layer"
    return f"MLP {span(s['intermediate'])}, heads {span(s['heads'])}"


def structured_lines(run: Run) -> list[str]:
    """The plain-text lines of a structured run: each result's parameters, kept widths and speed."""
    lines = []
    for r in run.results:
        s = r.structure
        names = ("prefill tok/s", "decode tok/s") if run.llm else ("items/s",)
        speed = "  ".join(f"{name} {cell}" for name, cell in zip(names, _speed(s["speed"])))
        lines.append(
            f"{r.criterion} {_target(r.sparsity)}: parameters {_count(s['params_before'])} → "
            f"{_count(s['params_after'])} ({100 * r.achieved:.1f} % {_removed(run)[0]}; {_kept(r)}); {speed}"
        )
    return lines


def _structured_results(run: Run) -> list[str]:
    """The markdown results of a structured run: parameters, the metrics (perplexity and its ratio to
    the dense model's; else retention), after --distill, kept widths, speed, the saved model."""
    metrics, tuned = list(run.dense), run.finetuned
    speed = ["prefill tok/s dense → pruned", "decode tok/s dense → pruned"] if run.llm else ["items/s dense → pruned"]
    columns = ["criterion", "ratio", "parameters", _removed(run)[0], *metrics]
    columns += [f"{m} after distill" for m in metrics] if tuned else []
    columns += ["kept", *speed, "standard config", "model"]
    out = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]

    def value(m: str, values: dict) -> str:
        if run.llm:
            return f"{values[m]:.4f} ({values[m] / run.dense[m]:.2f}× dense)"
        return f"{values[m]:.4f} ({100 * retention(run, values)[m]:.1f}%)"

    for r in run.results:
        s = r.structure
        cells = [r.criterion, _target(r.sparsity), f"{_count(s['params_before'])} → {_count(s['params_after'])}"]
        cells += [f"{100 * r.achieved:.1f} %", *(value(m, r.metrics) for m in metrics)]
        cells += [value(m, r.finetuned) for m in metrics] if tuned else []
        cells += [_kept(r), *_speed(s["speed"]), "yes" if s["standard"] else "no", f"`{r.files.get('model', '')}`"]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        f"Parameters: of the whole model, before → after; {': '.join(_removed(run))}. Standard config: stock "
        "`from_pretrained` loads the saved directory; else "
        "`llm.load_pretrained` (Hugging Face) or `llm.structured.load_vision` (timm, torchvision). Speed: "
        f"{run.info.get('speed', '')}.",
    ]
    if not run.llm and metrics:
        out.append("Percentages: the metric's retention, its value over the dense model's.")
    return out


def widths_plot(run: Run, path: str) -> None:
    """The kept width of every block of the dense model, one line per result: MLP channels (top) and
    attention heads (bottom), the dense widths dashed; a block removed (depth) is drawn at 0 with a
    cross. Equal widths (uniform allocation) overlap: each later line is drawn thinner on top of the
    earlier ones, so that every one stays visible."""
    from matplotlib.ticker import MaxNLocator

    dense = run.structured["dense"]
    experts = _removes_experts(run)  # one panel: the routed experts kept per MoE layer
    rows = (("experts", "routed experts kept"),) if experts else (("intermediate", "MLP channels kept"),
                                                                  ("heads", "attention heads kept"))  # fmt: skip
    n = len(dense[rows[0][0]])
    count = len(run.results)
    fig = _figure(max(7.0, 0.25 * n + 3.0), 3.0 * len(rows))
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, label) in zip(axes, rows):
        ax.plot(range(n), dense[key], color="gray", linestyle="--", drawstyle="steps-mid", label="dense")
        for k, r in enumerate(run.results):
            s = r.structure
            removed = set(s.get("removed_blocks", ()))
            kept = iter(s[key])
            widths = [0 if i in removed else next(kept) for i in range(n)]
            width = 1.5 + 3.0 * (count - 1 - k) / max(count - 1, 1)
            name = f"{r.criterion} {_target(r.sparsity)}"
            ax.plot(range(n), widths, marker=".", drawstyle="steps-mid", color=f"C{k}", linewidth=width, label=name)
            if removed:
                ax.plot(sorted(removed), [0] * len(removed), "x", color=f"C{k}", markersize=9, mew=2)
        ax.set_ylabel(label)
        ax.set_ylim(-0.04 * max(dense[key]), 1.08 * max(dense[key]))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(
        ("mixture-of-experts layer" if experts else "block of the dense model")
        + (" (× = removed)" if run.structured["structure"] == "depth" else "")
    )
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    what = "routed experts kept per MoE layer" if experts else "kept widths per block"
    fig.suptitle(f"{os.path.basename(run.model.rstrip('/'))}: {what}\n({run.granularity})", fontsize=10)
    fig.savefig(path, format="png", dpi=110)
