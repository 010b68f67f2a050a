"""The main job behind `pyprune-fast prune`: score a model once per criterion, build the masks of every
sparsity from those scores, and measure what each pruned model keeps of the dense one."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import criteria, llm, masks
from ..distributed import Communicator, session
from ..errors import UsageError
from ..modeling import channel_layers, first_tensor, restored, select_params, split_batch
from .bundle import Bundle
from .refinement import FINETUNE_LR, Refinement
from .results import TWO_FOUR, Result, Run

GRANULARITIES: dict[str, Callable[[dict[str, Tensor], float], dict[str, Tensor]]] = {
    "global": masks.global_unstructured,
    "layerwise": masks.layerwise,
    "per-row": masks.per_row,
}
# Channel criteria: one score per output channel; the pruned channels' weight rows (and biases) are
# zeroed. "channel": exactly round(sparsity × all channels) over every layer together;
# "channel-layerwise": round(sparsity × C) in each layer.
CHANNEL_SCOPES = {"channel": "global", "channel-layerwise": "layer"}
CHOICES = [*GRANULARITIES, TWO_FOUR, *CHANNEL_SCOPES]


def kind_of(granularity: str) -> str:
    """The criterion kind a granularity takes: "channel" for the channel granularities, else "weight"."""
    return "channel" if granularity in CHANNEL_SCOPES else "weight"


class CriterionDataError(UsageError):
    """A criterion (or fine-tuning) asked of a model that lacks what it needs (data, a loss, an input
    shape)."""


def _available(bundle: Bundle) -> dict[str, bool]:
    first = split_batch(bundle.calibration[0]) if bundle.calibration else (None, None)
    integer_targets = isinstance(first[1], Tensor) and not first[1].is_floating_point()
    return {
        "data": bool(bundle.calibration),
        "loss": bool(bundle.calibration) and (bundle.loss_fn is not None or integer_targets),
        "input": bundle.input_shape is not None or (isinstance(first[0], Tensor) and first[0].is_floating_point()),
    }


def block_methods() -> dict[str, criteria.Method]:
    """The methods of the block pipeline that are not registry criteria (SparseGPT, or a Method of one's
    own that needs its block): `prune` runs them block by block (llm.prune with the bundle's forward)
    instead of scoring the whole model.

    Returns:
        {name: method}, in registration order."""
    return {n: m for n, m in llm.METHODS.items() if n not in criteria.CRITERIA}


def _needs(name: str) -> frozenset[str]:
    if name in criteria.CRITERIA:
        return criteria.CRITERIA[name].needs
    return frozenset({"data"}) if llm.METHODS[name].needs_data else frozenset()


def check_criteria(bundle: Bundle, names: list[str], kind: str | None = None, blockwise: bool = False) -> None:
    """Checks that the bundle can feed every criterion asked (`check_kind` first).

    Args:
        bundle: the model and its data.
        names: criterion names of the registry (and, with `blockwise`, of `block_methods`).
        kind: "weight" or "channel" (None: either).
        blockwise: whether the block methods are accepted (prune runs them; score has no scores of theirs).

    Raises:
        CriterionDataError: naming every criterion the bundle cannot feed and what it lacks (read from
            each criterion's registered `needs`).
    """
    check_kind(names, kind, blockwise)
    candidates = criteria.CRITERIA if kind is None else criteria.of_kind(kind)
    has = _available(bundle)

    def lacking(name: str) -> list[str]:
        return [what for need, what in criteria.NEEDS.items() if need in _needs(name) and not has[need]]

    problems = [f"criterion {n!r} needs {' and '.join(lacking(n))}" for n in names if lacking(n)]
    if problems:
        possible = [n for n in candidates if not lacking(n)]
        raise CriterionDataError(
            f"{'; '.join(problems)}, which model {bundle.name!r} does not provide "
            f"({bundle.info.get('data', 'no data')}); criteria it can run: {', '.join(possible) or 'none'}"
        )


def check_kind(names: list[str], kind: str | None = None, blockwise: bool = False) -> None:
    """Checks that the criteria exist and are of `kind`.

    Args:
        names: criterion names.
        kind: "weight" or "channel" (None: either).
        blockwise: whether the block methods (`block_methods`, weight pruning) are accepted too.

    Raises:
        UsageError: for unknown criteria and, with `kind`, for criteria of the other kind (whose
            granularity the message names).
    """
    blocks = block_methods() if blockwise else {}
    unknown = [n for n in names if n not in criteria.CRITERIA and n not in blocks]
    if unknown:
        valid = sorted(criteria.CRITERIA) + list(blocks)
        raise UsageError(f"unknown criteria {unknown}; valid criteria: {', '.join(valid)}")
    if kind is not None:
        candidates = criteria.of_kind(kind) | (blocks if kind == "weight" else {})
        wrong = [n for n in names if n not in candidates]
        if wrong:
            hint = "a channel granularity (`granularity` channel)" if kind == "weight" else "a weight granularity"
            raise UsageError(
                f"criteria {wrong} score {'channels' if kind == 'weight' else 'weights'}: use {hint}, or "
                f"{kind} criteria: {', '.join(candidates)}"
            )


def check_sparsities(values: list[float]) -> list[float]:
    """The distinct sparsities in increasing order.

    Args:
        values: fractions of the scored weights to prune.

    Returns:
        The distinct values, sorted.

    Raises:
        UsageError: a value outside [0, 1].
    """
    for s in values:
        if not 0.0 <= s <= 1.0:
            raise UsageError(f"`sparsity` must be in [0, 1], got {s!r}")
    return sorted(set(values))


def check_plan(granularity: str, refinement: Refinement, processes: int = 1, remove_channels: bool = False) -> None:
    """Checks a granularity against the run's other choices.

    Args:
        granularity: one of CHOICES.
        refinement: the schedule and fine-tuning.
        processes: the processes the run is shared by (torch.distributed).
        remove_channels: remove the pruned channels physically.

    Raises:
        UsageError: an unknown granularity; `remove_channels` without a channel granularity; the
            iterative schedule with a granularity other than GRANULARITIES' or over several processes.
    """
    if granularity not in CHOICES:
        raise UsageError(f"`granularity` must be one of {CHOICES}, got {granularity!r}")
    if remove_channels and granularity not in CHANNEL_SCOPES:
        raise UsageError(f"`remove_channels` applies to `granularity` {' or '.join(CHANNEL_SCOPES)}")
    if refinement.iterative and granularity not in GRANULARITIES:
        raise UsageError(f"`schedule` iterative prunes weights: use `granularity` {' or '.join(GRANULARITIES)}")
    if refinement.iterative and processes > 1:
        raise UsageError("`schedule` iterative re-scores the pruned model in one process: not over several processes")


def two_four_split(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], dict[str, str]]:
    """(names 2:4 applies to, {skipped name: why}): a weight viewed as (out, -1) is eligible when it
    has at least two dimensions and its row length is divisible by 4."""
    eligible, skipped = [], {}
    for name, shape in shapes.items():
        row = math.prod(shape[1:])
        if len(shape) < 2 or row % 4:
            skipped[name] = f"row length {row} (shape {tuple(shape)}) is not divisible by 4: left dense"
        else:
            eligible.append(name)
    return eligible, skipped


def build_masks(scores: dict[str, Tensor], granularity: str, sparsity: float) -> dict[str, Tensor]:
    """Keep-masks of one granularity; for 2:4, masks of the eligible weights only; for the channel
    granularities, (C,) channel masks keyed by layer."""
    if granularity in CHANNEL_SCOPES:
        return masks.channels(scores, sparsity, scope=CHANNEL_SCOPES[granularity])
    if granularity == TWO_FOUR:
        eligible, _ = two_four_split({n: tuple(s.shape) for n, s in scores.items()})
        return masks.n_m({n: scores[n] for n in eligible}, 2, 4)
    return GRANULARITIES[granularity](scores, sparsity)


@contextlib.contextmanager
def masked(model: nn.Module, keep: dict[str, Tensor]) -> Iterator[nn.Module]:
    """The model with `keep` applied in place; its weights are restored on exit."""
    with restored(model, keep):
        masks.apply_masks(model, keep)
        yield model


def score_criterion(bundle: Bundle, name: str, batches: int, comm: Communicator | None = None) -> dict[str, Tensor]:
    """The criterion's scores of the bundle's model from its first `batches` calibration batches (a
    criterion that needs an input shape gets the bundle's, when it has one, instead of the data). With
    `comm`, each rank scores its share of those batches (`share`) and the criterion sums its
    statistics over the ranks: every rank gets the scores of all the batches."""
    fn = criteria.CRITERIA[name]
    kwargs = bundle.criterion_kwargs(batches)
    if comm is not None:
        kwargs["group"] = comm.group
    if "input" in fn.needs and bundle.input_shape is not None:
        return fn(bundle.model, None, input_shape=bundle.input_shape, **kwargs)
    data = bundle.calibration
    if comm is not None and data:
        data = share(data[:batches], comm.rank, comm.size)
        kwargs.pop("num_batches")
    return fn(bundle.model, data, **kwargs)


def share(batches: list, rank: int, size: int) -> list:
    """Rank `rank`'s contiguous share of `batches` among `size` ranks (sizes differ by at most one);
    ValueError when some rank would get none."""
    n = len(batches)
    if n < size:
        raise ValueError(f"{n} calibration batches cannot be shared by {size} processes: give at least one per process")
    return batches[n * rank // size : n * (rank + 1) // size]


def _example_inputs(bundle: Bundle):
    if bundle.calibration:
        return split_batch(bundle.calibration[0])[0]
    if bundle.input_shape is not None:
        device = next(bundle.model.parameters()).device
        return torch.ones((1, *bundle.input_shape), device=device)
    raise UsageError("`remove_channels` traces the model with one forward: it needs calibration data or an input shape")


def without_channels(bundle: Bundle, keep: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """A copy of the bundle's model with the channels `keep` prunes removed physically by Torch-Pruning
    (integrations.torch_pruning.remove_channels), and the channels removed per layer. The output
    layer's channels are never removed (they are the model's outputs); a removal that would still
    change the output's shape is a UsageError."""
    try:
        from ..integrations.torch_pruning import remove_channels
    except ImportError as exc:
        raise UsageError(f"`remove_channels` needs Torch-Pruning: pip install torch-pruning ({exc})") from exc
    inputs = _example_inputs(bundle)
    model = copy.deepcopy(bundle.model)

    def run(m: nn.Module):
        return bundle.forward(m, inputs) if bundle.forward is not None else m(inputs)

    with torch.no_grad():
        before = first_tensor(run(model)).shape
    output = [n for n, m in model.named_modules() if n in keep][-1:]  # the last scored layer: the head
    keep = {n: m for n, m in keep.items() if n not in output}
    removed = remove_channels(model, keep, inputs, forward_fn=None if bundle.forward is None else bundle.forward)
    with torch.no_grad():
        after = first_tensor(run(model)).shape
    if after != before:
        raise UsageError(
            f"removing these channels changes the model's output from {tuple(before)} to {tuple(after)} (the "
            "layers feed the output through a residual stream); prune them by zeroing (without `remove_channels`)"
        )
    return model, removed


def channel_weight_masks(model: nn.Module, keep: dict[str, Tensor]) -> dict[str, Tensor]:
    """Parameter keep-masks that zero the pruned output channels: for each layer's (C,) channel mask,
    its weight's rows (dim 0) and its bias entries."""
    modules = dict(model.named_modules())
    out = {}
    for layer, channels in keep.items():
        module = modules[layer]
        weight = module.weight
        out[f"{layer}.weight"] = channels.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).to(weight.device)
        if getattr(module, "bias", None) is not None:
            out[f"{layer}.bias"] = channels.to(module.bias.device)
    return out


def _bars(quiet: bool, scoring: int, evaluations: int):
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    return (
        tqdm(total=scoring, desc="scoring   ", unit="criterion", position=0, disable=disable),
        tqdm(total=evaluations, desc="evaluating", unit="model", position=1, disable=disable),
    )


def prune(
    bundle: Bundle,
    names: list[str],
    sparsities: list[float],
    granularity: str = "global",
    batches: int = 4,
    *,
    remove_channels: bool = False,
    on_masks: Callable[[Result, dict[str, Tensor], nn.Module], None] | None = None,
    quiet: bool = True,
    group: object = None,
    finetune: int = 0,
    finetune_lr: float = FINETUNE_LR,
    schedule: str = "one-shot",
    rounds: int = 1,
    refine: list[str] | None = None,
) -> Run | None:
    """Scores the bundle's model with each criterion once; for each sparsity builds the masks from
    those scores, applies them, evaluates, calls `on_masks(result, masks, pruned model)` while
    they are applied (to save them or the pruned weights) and restores the weights. The dense model is evaluated once.
    For 2:4 the sparsity list is [0.5] and ineligible weights are left dense (Run.skipped). The channel
    granularities take channel criteria and zero the pruned channels, or with `remove_channels` remove
    them physically from a copy of the model (Torch-Pruning), which is then evaluated.

    With `group` (a torch.distributed ProcessGroup, e.g. under torchrun) every rank calls this with
    the same arguments and model: the calibration batches are shared out among the ranks (data
    parallel; `share`), each criterion sums its statistics over them, and rank 0 alone evaluates,
    builds the masks and calls `on_masks`; it returns the Run, the other ranks None. An error on any
    rank makes every rank raise (distributed.Communicator); schedule="iterative" is one process's.


    finetune: that many AdamW steps (at `finetune_lr`) on the bundle's training batches (its
    calibration batches if it has none) with its loss, the masks kept (masks.keep), after the pruned
    model is evaluated; it is evaluated again (Result.finetuned), handed to on_masks fine-tuned, and
    the whole model restored. schedule="iterative": each sparsity's masks come from `rounds` rounds of
    scoring the model as pruned so far (schedule.iterative, exponential, no training between rounds)
    instead of one scoring. refine: llm.refine refinements; every criterion is then a block method
    (llm.METHODS) run block by block with them (llm.prune's refine=), each one's gain in Run.info."""
    refinement = Refinement(schedule, rounds, finetune, finetune_lr)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise UsageError(f"`batches` must be a positive int, got {batches!r}")
    check_plan(granularity, refinement, 1 if group is None else 2, remove_channels)
    channel = granularity in CHANNEL_SCOPES
    check_criteria(bundle, names, kind_of(granularity), blockwise=True)
    blockwise = [n for n in names if n in block_methods() or (refine and n in llm.METHODS)]
    if refine and len(blockwise) < len(names):
        other = next(n for n in names if n not in blockwise)
        raise UsageError(f"`refine` refines the block methods ({', '.join(llm.METHODS)}); {other} is not one")
    if blockwise and refinement.iterative:
        raise UsageError(f"{blockwise[0]} prunes block by block: `schedule` iterative re-scores a criterion's scores")
    if blockwise and group is not None:
        raise UsageError(f"{blockwise[0]} prunes block by block in one process here: not over several processes")
    if finetune and not (bundle.training or bundle.calibration):
        raise CriterionDataError(f"`finetune` trains on data, which model {bundle.name!r} does not provide")
    if finetune and not _available(bundle)["loss"]:
        raise CriterionDataError(f"`finetune` needs a loss, which model {bundle.name!r} does not provide")
    sparsities = [0.5] if granularity == TWO_FOUR else check_sparsities(sparsities)
    model = bundle.model
    if channel:
        layers = channel_layers(model, None, bundle.params)
        shapes = {f"{n}.weight": tuple(m.weight.shape) for n, m in layers.items()}
    else:
        shapes = {n: tuple(p.shape) for n, p in select_params(model, bundle.params).items()}
    skipped = {}
    if granularity == TWO_FOUR:
        eligible, skipped = two_four_split(shapes)
        if not eligible:
            raise UsageError("`granularity` 2:4: no scored weight has a row length divisible by 4")
    used = min(batches, len(bundle.calibration)) if bundle.calibration else 0
    comm = None if group is None else Communicator(group)
    lead = comm is None or comm.rank == 0
    if comm is not None and used:
        share(bundle.calibration[:used], comm.rank, comm.size)  # every rank refuses too few batches alike
    start = time.perf_counter()
    scoring_bar, eval_bar = _bars(quiet or not lead, len(names), 1 + len(names) * len(sparsities))
    try:
        with session(comm):
            dense = {}
            if lead and bundle.evaluate is not None:
                dense = {k: float(v) for k, v in bundle.evaluate(model).items()}
            eval_bar.update()
            run = Run(
                model=bundle.name,
                info=dict(bundle.info),
                granularity=granularity,
                batches=used,
                device=str(next(model.parameters()).device),
                parameters=sum(p.numel() for p in model.parameters()),
                scored=shapes,
                skipped=skipped,
                dense=dense,
                seconds={"dense_evaluation": time.perf_counter() - start},
                schedule=refinement.label,
            )
            if comm is not None:
                run.info["processes"] = f"{comm.size} (torch.distributed, calibration batches shared out)"
            if finetune:
                run.finetune = {"steps": finetune, "lr": finetune_lr, "data": _training_note(bundle)}
            how = _Evaluation(shapes, channel, remove_channels, on_masks, {"steps": finetune, "lr": finetune_lr})
            for name in names:
                scoring_bar.set_postfix_str(name)
                if name in blockwise:
                    run.score_seconds[name] = 0.0
                    scoring_bar.update()
                    for sparsity in sparsities:
                        eval_bar.set_postfix_str(f"{name} @ {sparsity:g}")
                        pruned = _prune_blockwise(bundle, name, granularity, sparsity, used, how, run, refine=refine)
                        run.results.append(pruned)
                        eval_bar.update()
                    continue
                t0 = time.perf_counter()
                scores = score_criterion(bundle, name, batches, comm) if schedule == "one-shot" else None
                run.score_seconds[name] = time.perf_counter() - t0
                scoring_bar.update()
                for sparsity in sparsities if lead else []:
                    eval_bar.set_postfix_str(f"{name} @ {sparsity:g}")
                    trace = None
                    if scores is None:
                        t0 = time.perf_counter()
                        keep, trace = _iterative_masks(bundle, name, granularity, sparsity, batches, rounds)
                        run.score_seconds[name] += time.perf_counter() - t0
                    else:
                        keep = build_masks(scores, granularity, sparsity)
                    result = _evaluate(bundle, name, sparsity, keep, how)
                    result.rounds = trace
                    run.results.append(result)
                    eval_bar.update()
                del scores
    finally:
        scoring_bar.close()
        eval_bar.close()
    run.seconds["prune"] = time.perf_counter() - start
    return run if lead else None


def _training_note(bundle: Bundle) -> str:
    batches = bundle.training or bundle.calibration
    source = "training" if bundle.training else "calibration"
    return f"{len(batches)} {source} batches of the model's data, cycled, with its loss"


def _iterative_masks(bundle: Bundle, name: str, granularity: str, sparsity: float, batches: int, rounds: int):
    """The masks of `rounds` exponential rounds of schedule.iterative on the bundle's model (restored
    after), and each round's {round, target, achieved}."""
    from .. import schedule

    with restored(bundle.model):
        report = schedule.iterative(
            bundle.model,
            lambda model, data: score_criterion(bundle, name, batches),
            sparsity=sparsity,
            rounds=rounds,
            granularity=granularity,
            quiet=True,
        )
    trace = [{"round": r.round, "target": r.target, "achieved": r.achieved} for r in report.rounds]
    return report.masks, trace


def _finetune(bundle: Bundle, model: nn.Module, keep: dict[str, Tensor] | None, steps: int, lr: float) -> list[float]:
    from .. import schedule

    return schedule.finetune(
        model,
        bundle.training or bundle.calibration,
        steps,
        masks=keep,
        loss_fn=bundle.loss_fn,
        forward=bundle.forward,
        lr=lr,
    )


@dataclass(frozen=True)
class _Evaluation:
    """How each pruned model of a run is evaluated: the scored weights' shapes (channel runs: by
    "<layer>.weight"), channel masks or not, channels removed physically or zeroed, the callback, and
    the fine-tuning after the first evaluation ({"steps": n, "lr": lr})."""

    shapes: dict[str, tuple[int, ...]]
    channel: bool
    remove: bool
    on_masks: Callable | None
    tune: dict


_BLOCK_GRANULARITY = {"global": "layer", "layerwise": "layer", "per-row": "row"}


def _prune_blockwise(
    bundle: Bundle, name: str, granularity: str, sparsity: float, used: int, how, run: Run, *, refine=None
) -> Result:
    """A block method (SparseGPT, ...) at one sparsity: the model pruned block by block on the first
    `used` calibration batches (llm.prune with the bundle's forward, and its `refine`), its weights
    evaluated as pruned, then restored. A method that prunes in its own solve has no global threshold:
    "global" runs it per layer (said in the run's info). Weights outside the blocks stay dense
    (Result.achieved says so)."""
    method = llm.METHODS[name]
    target: float | str = "2:4" if granularity == TWO_FOUR else sparsity
    chosen = None if granularity == TWO_FOUR else _BLOCK_GRANULARITY[granularity]
    if chosen == "layer" and granularity == "global" and method.prunes_in_place:
        run.info[f"{name} granularity"] = "per layer: it chooses its masks inside its own solve (no global threshold)"
    forward = bundle.forward or _call
    model = bundle.model
    calibration = bundle.calibration[:used] if method.needs_data or refine else None
    with restored(model):
        t0 = time.perf_counter()
        pruned = llm.prune(
            model, calibration, method=name, sparsity=target, granularity=chosen, forward=forward, progress=False,
            refine=refine,
        )  # fmt: skip
        run.score_seconds[name] += time.perf_counter() - t0
        for refinement, gain in pruned.refinement_gains().items():
            run.info[f"{name} {target}: refine {refinement}"] = gain
        keep = {n: p.detach() != 0 for n, p in select_params(model, bundle.params).items()}
        return _evaluate(bundle, name, sparsity, keep, how)


def _call(model: nn.Module, inputs):
    return model(inputs)


def _evaluate(bundle: Bundle, name: str, sparsity: float, keep, how: _Evaluation) -> Result:
    """One pruned model: masks applied (or channels removed), evaluated, handed to on_masks. Channel
    masks are keyed by layer, `how.shapes` by the layers' weights ("<layer>.weight"). With `how.remove`,
    the masks reported and handed on are those of the channels actually removed."""
    shapes, channel, remove, on_masks, tune = how.shapes, how.channel, how.remove, how.on_masks, how.tune
    model = bundle.model
    if remove:
        model, removed = without_channels(bundle, keep)
        keep = {n: torch.ones_like(m) for n, m in keep.items()}
        for n, idxs in removed.items():
            keep[n][idxs] = False
    if channel:
        by_weight = {f"{n}.weight": m for n, m in keep.items()}
        achieved = sum(int((~m).sum()) for m in keep.values()) / sum(shape[0] for shape in shapes.values())
    else:
        by_weight = keep
        achieved = sum(int((~m).sum()) for m in keep.values()) / sum(math.prod(s) for s in shapes.values())
    layers = {n: 1.0 - by_weight[n].float().mean().item() if n in by_weight else 0.0 for n in shapes}
    result = Result(criterion=name, sparsity=sparsity, achieved=achieved, metrics={}, layers=layers)
    if remove:
        result.parameters = sum(p.numel() for p in model.parameters())
    params = None if remove else channel_weight_masks(model, keep) if channel else keep
    steps = (tune or {}).get("steps", 0)
    with (
        contextlib.nullcontext() if remove else masked(model, params),
        restored(model) if steps else contextlib.nullcontext(),
    ):
        metrics = bundle.evaluate(model) if bundle.evaluate is not None else {}
        result.metrics = {k: float(v) for k, v in metrics.items()}
        if steps:
            result.finetune_losses = _finetune(bundle, model, params, steps, tune["lr"])
            metrics = bundle.evaluate(model) if bundle.evaluate is not None else {}
            result.finetuned = {k: float(v) for k, v in metrics.items()}
        if on_masks is not None:
            on_masks(result, keep, model)
    return result
