"""`pyprune-fast bench`: a quick run of the benchmark suite, ours against the baselines in one table.
A workload that fails (building its inputs or any implementation raising) is reported in the table as
`failed: <one line>` and the others still run; the exit status is then 1, else 0."""

from __future__ import annotations

from .context import bar
from .options import BenchOptions


def run(options: BenchOptions) -> int:
    """Every workload (or `only`'s) in turn: ours, then each baseline; returns the exit status."""
    import torch

    from ...bench.harness import one_line, peak_extra_bytes, time_case
    from ...bench.registry import WORKLOADS

    device = options.device
    names = options.only or list(WORKLOADS)
    width = max(len(n) for n in names) + 1
    peak_column = f" {'peak extra MiB':>15s}" if options.memory else ""
    print(
        f"{'workload':{width}s} {'impl':42s} {'best ms':>10s} {'median ms':>10s} {'ours faster by':>15s}{peak_column}"
    )
    failed = []
    for name in bar(names, "bench", options.quiet):
        try:
            case = WORKLOADS[name](device=device, scale=options.scale)
            timings = time_case(case, device, options.repeats, warmup=1, keep_going=True)
            impls = {"ours": case.ours, **case.baselines}
            peaks = {t.impl: peak_extra_bytes(impls[t.impl]) for t in timings if options.memory and t.error is None}
        except Exception as exc:  # a workload's failure is a row of the table, not the end of the run
            failed.append(name)
            print(f"{name:{width}s} {'':42s} failed: {one_line(exc)}", flush=True)
            continue
        finally:
            case = None  # free the workload's tensors before the next one is built
        ours = timings[0].median
        for t in timings:
            if t.error is not None:
                print(f"{name:{width}s} {t.impl:42s} failed: {t.error}", flush=True)
                continue
            ratio = "" if t.impl == "ours" or timings[0].error else f"{t.median / ours:14.2f}x"
            peak = f" {peaks[t.impl] / 2**20:15.0f}" if options.memory else ""
            print(
                f"{name:{width}s} {t.impl:42s} {t.best * 1e3:10.2f} {t.median * 1e3:10.2f} {ratio:>15s}{peak}",
                flush=True,
            )
        if any(t.error for t in timings):
            failed.append(name)
    print(
        f"\n{device}, {torch.get_num_threads()} threads, scale {options.scale:g}, median of {options.repeats} after 1 "
        "warm-up"
    )
    if failed:
        print(f"{len(failed)} of {len(names)} workloads failed: {', '.join(failed)}")
        return 1
    return 0
