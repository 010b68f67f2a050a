"""What `prune` does around its runner, for every model: load the model, run, stage the reports
(report.json, report.md, plots), commit every file and switch the output directory in; print the
summary. Under torchrun only rank 0 writes."""

from __future__ import annotations

import json
import time

from ... import io
from ...outdir import OutDir
from .context import end_process_group, load
from .options import PruneOptions


def write_reports(run, out: OutDir, staged, argv: list[str]) -> tuple[list[str], list[str]]:
    """Stages the plots, report.json and report.md; returns (every file of the run, the plots)."""
    from .. import report

    if run.structured:  # smaller dense models: the metric per result and the kept widths per block
        plots = [report.WIDTHS_PLOT]
        if run.llm:
            plots.insert(0, report.PERPLEXITY_PLOT)
            report.perplexity_plot(run, staged.path(out.file(report.PERPLEXITY_PLOT)))
        elif run.dense:
            plots.insert(0, report.RETENTION_PLOT)
            report.retention_plot(run, staged.path(out.file(report.RETENTION_PLOT)))
        report.widths_plot(run, staged.path(out.file(report.WIDTHS_PLOT)))
    elif run.llm:  # per-layer sparsity (in report.json) is the target in every Linear but with global: no plot
        plots = [report.PERPLEXITY_PLOT] if run.dense else []  # none: the evaluation was skipped
        if run.dense:
            report.perplexity_plot(run, staged.path(out.file(report.PERPLEXITY_PLOT)))
        if any(r.block_error for r in run.results):
            plots.append(report.BLOCK_ERROR_PLOT)
            report.block_error_plot(run, staged.path(out.file(report.BLOCK_ERROR_PLOT)))
    else:
        plots = [report.LAYERS_PLOT]
        if run.dense:
            plots.insert(0, report.RETENTION_PLOT)
            report.retention_plot(run, staged.path(out.file(report.RETENTION_PLOT)))
        report.layers_plot(run, staged.path(out.file(report.LAYERS_PLOT)))
    files = [f for r in run.results for f in r.files.values()] + plots + ["report.json", "report.md"]
    with open(staged.path(out.file("report.json")), "w") as f:
        json.dump(report.to_json(run, ["pyprune-fast", *argv], files), f, indent=2, allow_nan=False)
    with open(staged.path(out.file("report.md")), "w") as f:
        f.write(report.markdown(run, files, plots))
    return files, plots


def lead_reports(options: PruneOptions, out: OutDir | None, execute, group) -> int:
    """`run_and_report` on rank 0 (or in a single process); the other ranks of a torchrun load the
    model and take part in `execute` (the distributed scoring or pruning) without writing anything.
    The process group is destroyed on the way out."""
    try:
        if group is None or group.rank() == 0:
            return run_and_report(options, out, execute)
        execute(None, load(options))
        return 0
    finally:
        end_process_group(group)


def run_and_report(options: PruneOptions, out: OutDir, execute) -> int:
    """Loads the model, runs `execute(staged, bundle) -> Run`, stages the reports, commits every file
    and switches the staged output directory in (OutDir.commit); prints the summary. On any failure
    or interrupt before that rename, the output directory is as it was and the staging and new
    directories go."""
    from .. import report

    start = time.perf_counter()
    try:
        with io.Staged() as staged:
            bundle = load(options)
            loaded = time.perf_counter() - start
            run = execute(staged, bundle)
            run.seconds = {"load": loaded, **run.seconds, "total": time.perf_counter() - start}
            with out.writes():
                files, plots = write_reports(run, out, staged, options.argv)
                staged.commit()
                out.commit()
    except BaseException:
        out.remove_created()
        raise
    print(report.summary_table(run))
    if "peak memory (formula)" in run.info:
        print(f"peak memory per block (formula in pyprune_fast.llm.pipeline): {run.info['peak memory (formula)']}")
    if "left dense" in run.info:
        print(f"left dense: {run.info['left dense']}")
    if "peak host memory (RSS)" in run.info:
        print(f"peak host memory (RSS of the process, streamed from disk): {run.info['peak host memory (RSS)']}")
    print(
        f"\nwrote {len(files)} files to {options.out}/ ({', '.join(['report.md', 'report.json', *plots])}) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0
