"""The signature every criterion shares, and the registry behind `pyprune_fast.score`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import Tensor

from .engine import Job, make_job, preserved

CRITERIA: dict[str, Callable[..., dict[str, Tensor]]] = {}

_COMMON = [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    *(
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in ("loss_fn", "params", "layers", "num_batches", "forward")
    ),
]


def criterion(fn: Callable[..., list[Tensor]]) -> Callable[..., dict[str, Tensor]]:
    """Turns `fn(job, **options) -> list of per-parameter scores` into the public criterion
    `NAME(model, data=None, *, loss_fn=None, params=None, layers=None, num_batches=None, forward=None,
    **options) -> {name: float32 score}`, run with the model's state preserved, and registers it."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(fn)
    def wrapper(model, data=None, *, loss_fn=None, params=None, layers=None, num_batches=None, forward=None, **options):
        unknown = set(options) - {p.name for p in own}
        if unknown:
            valid = ["loss_fn", "params", "layers", "num_batches", "forward"] + [p.name for p in own]
            raise TypeError(f"{fn.__name__}() got unexpected options {sorted(unknown)}; valid: {valid}")
        job: Job = make_job(
            model, data, loss_fn=loss_fn, params=params, layers=layers, num_batches=num_batches, forward=forward
        )
        with preserved(model, job.tensors):
            values = fn(job, **options)
        return job.scores(values)

    del wrapper.__wrapped__  # the public signature is the one below, not fn's
    wrapper.__signature__ = inspect.Signature(_COMMON + own, return_annotation="dict[str, Tensor]")
    CRITERIA[fn.__name__] = wrapper
    return wrapper
