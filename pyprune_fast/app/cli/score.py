"""`pyprune-fast score`: each criterion's scores of the model written as scores-<criterion>.safetensors.
Under torchrun the calibration batches are shared out over the ranks and rank 0 writes the scores of
all of them."""

from __future__ import annotations

import time

from ... import io
from ...outdir import OutDir
from .context import bar, check_share, end_process_group, load, process_group
from .options import ScoreOptions


def run(options: ScoreOptions) -> int:
    """Runs the command; returns the exit status."""
    from ...distributed import Communicator

    group, options.device = process_group(options.device)
    try:
        return _score(options, None if group is None else Communicator(group), group)
    finally:
        end_process_group(group)


def _score(options: ScoreOptions, comm, group) -> int:
    from safetensors.torch import save_file

    from ...distributed import session
    from ..runner import check_criteria, score_criterion

    lead = comm is None or comm.rank == 0
    out = OutDir(options.out) if lead else None
    try:
        bundle = load(options)
        check_criteria(bundle, options.criteria)
        check_share(bundle, options.batches, group)
        rows = []
        with io.Staged() as staged, session(comm):
            for name in bar(options.criteria, "scoring", options.quiet or not lead):
                start = time.perf_counter()
                scores = score_criterion(bundle, name, options.batches, comm)
                seconds = time.perf_counter() - start
                if not lead:
                    continue
                path = out.file(f"scores-{name}.safetensors")
                with out.writes():
                    save_file(
                        {k: v.detach().contiguous().cpu() for k, v in scores.items()},
                        staged.path(path),
                        metadata={"criterion": name, "model": bundle.name, "calibration_batches": str(options.batches)},
                    )
                n = sum(s.numel() for s in scores.values())
                mean = sum(float(s.double().sum()) for s in scores.values()) / max(n, 1)
                top = max(float(s.max()) for s in scores.values())
                rows.append(f"{name:12s} {seconds:8.2f} {n:12d} {mean:11.4g} {top:11.4g}  {path}")
            if lead:
                with out.writes():
                    staged.commit()
    except BaseException:
        if out is not None:
            out.remove_created()
        raise
    if lead:
        print(f"{'criterion':12s} {'seconds':>8s} {'entries':>12s} {'mean':>11s} {'max':>11s}  file")
        print("\n".join(rows))
    return 0
