"""`pyprune-fast sensitivity`: each block (or layer) pruned alone at each sparsity, evaluated and
restored; sensitivity.json, .md and .png, and the per-unit sparsities that meet the budget."""

from __future__ import annotations

import time

from ... import io
from ...outdir import OutDir
from .context import load, need_matplotlib
from .options import SensitivityOptions


def run(options: SensitivityOptions) -> int:
    """Runs the command; returns the exit status."""
    from .. import sensitivity

    need_matplotlib()
    (criterion,) = options.criteria
    out = OutDir(options.out)
    start = time.perf_counter()
    try:
        with io.Staged() as staged:
            bundle = load(options)
            report, allocation = sensitivity.run(
                bundle, criterion, options.sparsity, options.granularity, options.budget, options.batches, options.quiet
            )
            meta = {
                "command": ["pyprune-fast", *options.argv],
                "model": bundle.name,
                "criterion": criterion,
                "granularity": options.granularity,
                "calibration_batches": min(options.batches, len(bundle.calibration or [])),
            }
            with out.writes():
                text = sensitivity.write(
                    report, allocation, options.budget, meta, lambda name: staged.path(out.file(name))
                )
                staged.commit()
    except BaseException:
        out.remove_created()
        raise
    print(text)
    files = f"sensitivity.json, sensitivity.md, {sensitivity.PLOT}"
    print(f"wrote {files} to {options.out}/ in {time.perf_counter() - start:.0f} s")
    return 0
