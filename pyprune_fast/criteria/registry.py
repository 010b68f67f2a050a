"""The one criterion registry behind `pyprune_fast.score`, `criteria.CRITERIA` and the CLI.

A criterion is a function registered with `@criterion(needs=..., kind=...)`:

- kind="weight": `fn(job, **options) -> [score per scored parameter]`, each shaped like its parameter;
  the public criterion returns {parameter name: float32 score}.
- kind="channel": `fn(request, **options) -> {layer name: (C,) score}`, one score per output channel
  of each Conv/Linear layer; the public criterion returns {layer name: (C,) float32 score} and also
  takes `normalize=` and `p=` (L_p normalization of each layer's scores, see `engine.lp_normalize`).

Every public criterion has the signature
`NAME(model, data=None, *, loss_fn=None, params=None, layers=None, num_batches=None, forward=None,
group=None, **options)`, runs with the model's state preserved (`modeling.preserved`; a weight criterion
that needs nothing, such as magnitude, reads the weights only and must not run the model), and says
what it needs in `.needs` (a subset of NEEDS) and its kind in `.kind`.

`group=` (a torch.distributed ProcessGroup): data-parallel calibration. Each rank passes its own
share of the batches and the same model; the criterion's sums over batches are summed over the ranks
(`Job.reduce`) before the scores are formed, so every rank gets the scores one process gets from all
batches, up to the order of floating-point additions (see `pyprune_fast.distributed`). A criterion
that needs data but never calls `Job.reduce` is refused with group= (ValueError on every rank); an
error on one rank raises on every rank.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable

from torch import Tensor

from .. import distributed
from ..modeling import preserved
from .engine import ChannelRequest, Job, lp_normalize, make_channel_request, make_job

NEEDS = {
    "data": "calibration data",
    "loss": "a loss (loss_fn, or integer class targets)",
    "input": "an input shape (or float tensor batches to read it from)",
}
KINDS = ("weight", "channel")

CRITERIA: dict[str, Callable[..., dict[str, Tensor]]] = {}

_SHARED = ("loss_fn", "params", "layers", "num_batches", "forward", "group")
_COMMON = [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in _SHARED),
]
_CHANNEL_OPTIONS = [
    inspect.Parameter("normalize", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("p", inspect.Parameter.KEYWORD_ONLY, default=1.0),
]


def criterion(*, needs: Iterable[str] = (), kind: str = "weight") -> Callable[[Callable], Callable]:
    """A decorator that registers `fn` under its name as a public criterion.

    Args:
        needs: what it needs besides the weights, a subset of NEEDS ("data": calibration batches,
            "loss": a loss on them, "input": an input shape or tensor batches).
        kind: "weight" (`fn(job, **options) -> [score per scored parameter]`) or "channel"
            (`fn(request, **options) -> {layer name: (C,) score}`).

    Returns:
        The decorator; it returns the public criterion (module docstring's signature), which is also
        `CRITERIA[fn.__name__]`."""
    needs = frozenset(needs)
    if not needs <= NEEDS.keys():
        raise ValueError(f"needs must be a subset of {sorted(NEEDS)}, got {sorted(needs)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def register(fn: Callable) -> Callable[..., dict[str, Tensor]]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if kind == "channel":
            own = _CHANNEL_OPTIONS + own
        valid = {p.name for p in own}
        run = _run_weight if kind == "weight" else _run_channel

        @functools.wraps(fn)
        def public(
            model,
            data=None,
            *,
            loss_fn=None,
            params=None,
            layers=None,
            num_batches=None,
            forward=None,
            group=None,
            **options,
        ):
            comm = None if group is None else distributed.Communicator(group)
            with distributed.session(comm):  # an error on one rank raises on every rank
                unknown = set(options) - valid
                if unknown:
                    raise TypeError(
                        f"{fn.__name__}() got unexpected options {sorted(unknown)}; valid: {[*_SHARED, *valid]}"
                    )
                shared = {"loss_fn": loss_fn, "params": params, "layers": layers, "num_batches": num_batches}
                return run(fn, model, data, forward=forward, comm=comm, **shared, options=options)

        del public.__wrapped__  # the public signature is the one below, not fn's
        public.__signature__ = inspect.Signature(_COMMON + own, return_annotation="dict[str, Tensor]")
        public.needs = needs
        public.kind = kind
        fn.needs = needs
        CRITERIA[fn.__name__] = public
        return public

    return register


def _check_reduced(fn, job: Job) -> None:
    """With group=, a criterion that reads data must have summed its statistics over the ranks."""
    if job.comm is not None and "data" in fn.needs and not job.reduced:
        raise ValueError(
            f"criterion {fn.__name__!r} does not reduce its batch statistics across ranks (Job.reduce), so it "
            "cannot be used with group=; score on one process, or make it call job.reduce on its sums"
        )


def _run_weight(fn, model, data, *, options, **shared) -> dict[str, Tensor]:
    job: Job = make_job(model, data, **shared)
    if not fn.needs:  # reads the weights only, never runs the model: nothing to preserve
        values = fn(job, **options)
    else:
        with preserved(model, job.tensors):
            values = fn(job, **options)
    _check_reduced(fn, job)
    return job.scores(values)


def _run_channel(fn, model, data, *, options, **shared) -> dict[str, Tensor]:
    normalize, p = options.pop("normalize", None), options.pop("p", 1.0)
    request: ChannelRequest = make_channel_request(model, data, normalize=normalize, p=p, **shared)
    scores = fn(request, **options)
    _check_reduced(fn, request.job)
    if normalize == "lp":
        scores = {n: lp_normalize(s, p) for n, s in scores.items()}
    return {n: s.float() for n, s in scores.items()}


def of_kind(kind: str) -> dict[str, Callable[..., dict[str, Tensor]]]:
    """The registered criteria of one kind.

    Args:
        kind: "weight" or "channel".

    Returns:
        {name: public criterion}, in registration order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {name: c for name, c in CRITERIA.items() if c.kind == kind}
