"""The `pyprune-fast` command line (also `python -m pyprune_fast`): prune, score, sensitivity, bench, info.

One module per command (`prune`, with `prune_llm` for causal LMs; `score`, `sensitivity`, `bench`,
`info`), each a `run(options) -> exit status` over its validated options object (`options`); `parser`
builds the argparse parser, `context` holds what the commands share (loading the model with the
user's files, the torchrun process group, progress bars).

Exit status: 0 done; 2 the user's error (a `pyprune_fast.UsageError`: an option, the model, the data,
the output directory; one line `pyprune-fast: error: ...` naming the flags); 1 some `bench` workloads
failed (each is marked in the table; the others ran), or any other exception, which is a bug of ours
(its traceback is printed); 130 interrupted (Ctrl-C or SIGTERM). Every file is written to a
temporary and renamed into place only when the whole run has succeeded: an error or an interrupt
replaces no file and leaves no temporary behind. `prune` stages its whole --out in a temporary
sibling directory and switches it in with one rename (pyprune_fast.outdir), so a rerun replaces the
previous run's output as a whole (never a mix of old masks and a new report); it refuses an --out
that holds anything else."""

from __future__ import annotations

import signal
import sys
import threading
import traceback

from ...errors import UsageError
from .options import DEFAULT_CRITERIA, DEFAULT_SPARSITIES, flag
from .parser import build_parser

__all__ = ["DEFAULT_CRITERIA", "DEFAULT_SPARSITIES", "UsageError", "build_parser", "main"]


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Runs one command line.

    Args:
        argv: the arguments after the program's name (default: sys.argv[1:]).

    Returns:
        The exit status (see the module docstring); argparse exits with 2 itself on unknown options,
        and with 0 after --help.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _terminated)  # `kill` cleans up like Ctrl-C
    try:
        options = None if args.options is None else args.options.from_args(args, argv)
        return args.run(options)
    except KeyboardInterrupt:
        print("pyprune-fast: interrupted; no file was written or replaced", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"pyprune-fast: error: {exc.spelled(flag)}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(
            "pyprune-fast: internal error (traceback above): a bug of pyprune-fast, please report it", file=sys.stderr
        )
        return 1
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
