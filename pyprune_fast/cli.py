"""The `pyprune-fast` command line (also `python -m pyprune_fast`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_CRITERIA = ["magnitude", "snip", "refer", "afr"]


def _error(message: str) -> int:
    print(f"pyprune-fast: error: {message}", file=sys.stderr)
    return 2


def cmd_info(args) -> int:
    import pyprune_fast

    print(json.dumps(pyprune_fast.backend_info(), indent=2, default=str))
    return 0


def _score_all(bundle, names, batches, quiet):
    """{criterion: (scores, seconds)} for the bundle's model."""
    from tqdm import tqdm

    import pyprune_fast

    results = {}
    kwargs = bundle.criterion_kwargs(batches)
    for name in tqdm(names, desc="scoring", disable=quiet or not sys.stderr.isatty()):
        start = time.perf_counter()
        if name == "synflow" and bundle.input_shape is not None:
            scores = pyprune_fast.score(bundle.model, name, None, input_shape=bundle.input_shape, **kwargs)
        else:
            scores = pyprune_fast.score(bundle.model, name, bundle.calibration, **kwargs)
        results[name] = (scores, time.perf_counter() - start)
    return results


def cmd_score(args) -> int:
    from safetensors.torch import save_file

    from . import zoo

    bundle = zoo.load(args.model, args.device, calibration_batches=args.batches)
    results = _score_all(bundle, args.criterion, args.batches, args.quiet)
    os.makedirs(args.out, exist_ok=True)
    print(f"{'criterion':12s} {'seconds':>8s} {'entries':>12s} {'mean':>11s} {'max':>11s}  file")
    for name, (scores, seconds) in results.items():
        path = os.path.join(args.out, f"scores-{name}.safetensors")
        save_file(
            {k: v.contiguous().cpu() for k, v in scores.items()},
            path,
            metadata={"criterion": name, "model": bundle.name},
        )
        n = sum(s.numel() for s in scores.values())
        mean = sum(float(s.double().sum()) for s in scores.values()) / n
        top = max(float(s.max()) for s in scores.values())
        print(f"{name:12s} {seconds:8.2f} {n:12d} {mean:11.4g} {top:11.4g}  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .criteria import CRITERIA

    parser = argparse.ArgumentParser(
        prog="pyprune-fast", description="Fast pruning criteria, masks and sparse kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print backend_info(): what compiled kernels are loaded").set_defaults(run=cmd_info)

    score = sub.add_parser("score", help="score a model with criteria and write the scores (safetensors)")
    score.add_argument(
        "--model",
        default=None,
        help="default: the embedded all-MiniLM-L6-v2; or torchvision:NAME, timm:NAME, hf:PATH, package.module:factory",
    )
    score.add_argument(
        "--criterion",
        nargs="+",
        default=DEFAULT_CRITERIA,
        choices=sorted(CRITERIA),
        metavar="C",
        help=f"criteria (default: {' '.join(DEFAULT_CRITERIA)}; any of {', '.join(sorted(CRITERIA))})",
    )
    score.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    score.add_argument("--out", default="pyprune-out", help="output directory (default ./pyprune-out)")
    score.add_argument("--device", default="cpu")
    score.add_argument("--quiet", action="store_true", help="no progress bars")
    score.set_defaults(run=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .zoo import ModelSpecError

    try:
        return args.run(args)
    except (ModelSpecError, ValueError, TypeError) as exc:
        return _error(str(exc))
