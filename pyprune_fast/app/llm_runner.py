"""The main job on causal LLMs (`pyprune-fast prune --model smollm2` or `hf:PATH` of a causal LM): each
method at each target pruned block by block (pyprune_fast.llm.prune) from the same dense weights, in
one shot or over rounds of growing sparsity (schedule="iterative"), optionally fine-tuned with the
masks kept, judged by perplexity on held-out text, reported like the other models (report.json,
report.md, plots).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from .. import llm
from ..errors import UsageError
from ..llm.distill import logits
from ..schedule import finetune as finetune_
from ..schedule import round_sparsity
from .bundle import LLMBundle
from .refinement import FINETUNE_LR, Refinement
from .results import TWO_FOUR, Result, Run

DEFAULT_METHODS = ["magnitude", "wanda", "sparsegpt"]
DEFAULT_TARGETS: list[float | str] = [0.5, TWO_FOUR]


def use_text(bundle: LLMBundle, part: str, tokens: Tensor, source: str) -> None:
    """Replaces one of the bundle's token streams.

    Args:
        bundle: the causal LM's bundle.
        part: "calibration" or "evaluation".
        tokens: the new 1-D token stream.
        source: where the tokens came from, as reports and errors say it (e.g. "--data 'notes.txt'").
    """
    setattr(bundle, part, tokens)
    bundle.sources[part] = source
    bundle.info["data"] = (
        f"calibration: {bundle.sources['calibration']} ({bundle.calibration.numel()} tokens); "
        f"evaluation: {bundle.sources['evaluation']} ({bundle.evaluation.numel()} tokens)"
    )


def check_tokens(bundle: LLMBundle, samples: int, seq_len: int) -> None:
    """Checks that the bundle's text is long enough.

    Args:
        bundle: the causal LM's bundle.
        samples: calibration sequences.
        seq_len: tokens per sequence.

    Raises:
        UsageError: one line (where the text came from, the tokens found, the tokens needed) unless the
            calibration stream holds samples × seq_len tokens and the evaluation stream at least 2.
    """
    found, needed = bundle.calibration.numel(), samples * seq_len
    if found < needed:
        raise UsageError(
            f"calibration has {found} tokens ({bundle.sources['calibration']}), but `samples` × `seq_len` = "
            f"{samples} × {seq_len} = {needed} are needed: give more text or lower `samples` / `seq_len`"
        )
    if bundle.evaluation.numel() < 2:
        raise UsageError(
            f"evaluation has {bundle.evaluation.numel()} tokens ({bundle.sources['evaluation']}); perplexity "
            "needs at least 2"
        )


def label(method: str, target: float | str) -> str:
    """The result's name: the method, with the pattern for N:M targets ("wanda 2:4")."""
    return method if isinstance(target, float) else f"{method} {target}"


def tag(method: str, target: float | str) -> str:
    """The file-name tag of a result: <method>-<sparsity> or <method>-2of4."""
    return f"{method}-{target:g}" if isinstance(target, float) else f"{method}-{target.replace(':', 'of')}"


def check_methods(methods: list[str], targets: list[float | str], sizes: dict[str, int]) -> None:
    """Checks what an LLM run is asked before anything loads.

    Args:
        methods: LLM method names (llm.METHODS).
        targets: sparsities (fractions) and N:M patterns ("2:4").
        sizes: {parameter name: value} of counts that must be >= 1 (samples, seq_len, eval_tokens).

    Raises:
        UsageError: an unknown method, a target llm.parse_sparsity refuses, a size below 1.
    """
    unknown = [m for m in methods if m not in llm.METHODS]
    if unknown:
        raise UsageError(f"unknown LLM methods {unknown}; valid: {', '.join(llm.METHODS)}")
    for target in targets:
        try:
            llm.parse_sparsity(target)
        except ValueError as exc:
            raise UsageError(f"`sparsity`: {exc}") from exc
    for name, value in sizes.items():
        if value < 1:
            raise UsageError(f"`{name}` must be >= 1, got {value}")


def check_schedule(targets: list[float | str], refinement: Refinement) -> None:
    """Checks the targets against the schedule.

    Args:
        targets: sparsities (fractions) and N:M patterns.
        refinement: the schedule and fine-tuning.

    Raises:
        UsageError: the iterative schedule with an N:M target.
    """
    if refinement.iterative and any(isinstance(t, str) for t in targets):
        raise UsageError(
            "`schedule` iterative grows an unstructured sparsity over rounds; 2:4 is one fixed pattern (2 of every "
            "4 weights kept), reached in one shot: give fractions (`sparsity`) or `schedule` one-shot"
        )


def _check(bundle: LLMBundle, methods, targets, samples, seq_len, eval_tokens) -> None:
    check_methods(methods, targets, {"samples": samples, "seq_len": seq_len, "eval_tokens": eval_tokens})
    check_tokens(bundle, samples, seq_len)


def next_token_loss(logits: Tensor, token_ids: Tensor) -> Tensor:
    """The causal LM's loss: mean cross-entropy of the logits at positions 0..T−2 against the tokens
    1..T−1 (in float32)."""
    return nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), token_ids[:, 1:].reshape(-1).to(logits.device)
    )


def finetune_batches(bundle: LLMBundle, samples: int, seq_len: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The fine-tuning batches: the calibration sequences the pruning used (samples × seq_len tokens),
    `batch_size` sequences a batch, each batch its own next-token targets."""
    windows = llm.calibration_windows(bundle.calibration, samples, seq_len)
    return [(ids, ids) for ids in windows.split(batch_size)]


def _finetune_note(samples: int, seq_len: int, batch_size: int, bundle: LLMBundle) -> str:
    per_step = min(batch_size, samples)
    return (
        f"the {samples} calibration sequences × {seq_len} tokens the pruning used ({bundle.sources['calibration']}), "
        f"{per_step} a step, cycled, next-token cross-entropy"
    )


def _prune_rounds(model, bundle: LLMBundle, method: str, target, rounds: int, options: dict):
    """The method at `target` reached over `rounds` rounds of llm.prune at the exponential schedule's
    sparsities (schedule.round_sparsity), each from the model as pruned so far, the weights already
    zero pruned first (nested=True): (the last round's PruneResult, its seconds summed over the
    rounds, each round's {round, target, achieved})."""
    fraction = llm.parse_sparsity(target).fraction
    trace, seconds, pruned = [], 0.0, None
    for r in range(1, rounds + 1):
        goal = round_sparsity(fraction, rounds, r)
        pruned = llm.prune(model, bundle.calibration, method=method, **{**options, "sparsity": goal}, nested=r > 1)
        seconds += pruned.seconds
        trace.append({"round": r, "target": goal, "achieved": pruned.overall_sparsity})
    pruned.seconds = seconds
    return pruned, trace


def _prune_options(target, granularity, samples, seq_len, device, progress, group) -> dict:
    """The llm.prune options of one target, the same in memory and streamed from disk (N:M patterns
    take no granularity)."""
    return {
        "sparsity": target,
        "granularity": None if isinstance(target, str) else granularity,
        "num_samples": samples,
        "seq_len": seq_len,
        "device": device,
        "progress": progress,
        "group": group,
    }


def _note_left_dense(run: Run, pruned: llm.PruneResult) -> None:
    """Names the block weights the run left dense (not nn.Linear: 3-D experts, routers) in the report."""
    if pruned.left_dense:
        names = list(pruned.left_dense)
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        run.info["left dense"] = (
            f"{len(names)} block weights that are not nn.Linear, {100 * pruned.left_dense_fraction:.1f} % of the "
            f"blocks' weights, not pruned and not counted in 'achieved': {shown}"
        )


def _note_peak(run: Run, pruned: llm.PruneResult) -> None:
    """Keeps the largest per-block peak-memory estimate of the runs so far in the report."""
    if pruned.memory is not None and pruned.memory.total > run.estimate_bytes:
        run.estimate_bytes = pruned.memory.total
        run.info["peak memory (formula)"] = f"{pruned.memory} ({pruned.method} {pruned.sparsity})"


def _note_refinements(run: Run, name: str, pruned: llm.PruneResult) -> None:
    """Each refinement's gain (its metric before → after, mean over the blocks) and time in the report."""
    for refinement, gain in pruned.refinement_gains().items():
        run.info[f"{name}: refine {refinement}"] = gain


def _measured_peak(pruned: llm.PruneResult) -> int:
    """The peak memory measured during a pruning: CUDA's peak allocation on a GPU, else the process's peak
    RSS (Run.peak_measure says which)."""
    return pruned.peak_device_bytes if pruned.peak_device_bytes is not None else pruned.peak_host_bytes


@dataclass(frozen=True)
class _Setting:
    """What every result of one run shares: targets, granularity, calibration and evaluation sizes."""

    targets: list
    granularity: str | None
    samples: int
    seq_len: int
    evaluation: Tensor
    eval_seq_len: int


def _new_run(bundle, setting: _Setting, device: str, shapes, dense, seconds: float, schedule: str = "one-shot") -> Run:
    targets, granularity, samples = setting.targets, setting.granularity, setting.samples
    seq_len, evaluation, eval_seq_len = setting.seq_len, setting.evaluation, setting.eval_seq_len
    run = Run(
        model=bundle.name,
        info=dict(bundle.info),
        granularity=granularity or "each method's own groups",
        batches=samples,
        device=device,
        parameters=sum(p.numel() for p in bundle.model.parameters()),
        scored=shapes,
        skipped={},
        dense=dense,
        seconds={"dense_evaluation": seconds},
        lower_better=("perplexity",),
        schedule=schedule,
        llm=True,
        targets=list(targets),
        peak_measure=(
            "CUDA's peak allocation during the pruning"
            if device.startswith("cuda")
            else "the process's peak resident memory (RSS) so far"
        ),
    )
    run.info["calibration"] = f"{samples} sequences × {seq_len} tokens of {bundle.sources['calibration']}"
    run.info["evaluation"] = (
        f"perplexity on {evaluation.numel()} held-out tokens of {bundle.sources['evaluation']}, windows of "
        f"{eval_seq_len}"
    )
    return run


def prune(
    bundle: LLMBundle,
    methods: list[str],
    targets: list[float | str],
    *,
    granularity: str | None = None,
    samples: int = 16,
    seq_len: int = 256,
    eval_tokens: int = 8192,
    eval_seq_len: int = 256,
    device: str | None = None,
    on_model: Callable[[Result, dict[str, Tensor], nn.Module, str], None] | None = None,
    quiet: bool = True,
    group: object = None,
    evaluate: bool = True,
    finetune: int = 0,
    finetune_lr: float = FINETUNE_LR,
    batch_size: int = 16,
    schedule: str = "one-shot",
    rounds: int = 1,
    refine: list[str] | None = None,
) -> Run | None:
    """Prunes the bundle's model with every method at every target, each from the dense weights, and
    measures perplexity on the first `eval_tokens` held-out tokens (windows of `eval_seq_len`). Calls
    `on_model(result, masks, model, tag)` while each pruned model is loaded (to save it; tag: see
    `tag`). The model is given back dense. Methods, targets and sizes are checked before anything
    runs; llm.prune checks the rest before it touches the model. With `group` (torchrun), every rank
    prunes together (llm.prune's group=); only the rank with `evaluate` measures, fine-tunes, reports
    (returns the Run) and calls on_model, the others return None.

    schedule="iterative": each target (a fraction; not 2:4) is reached over `rounds` rounds of the
    block pipeline at the exponential schedule's sparsities (`_prune_rounds`), each round from the
    model as pruned so far, the weights pruned before pruned first (llm.prune's nested=): the masks
    are nested and the last round prunes exactly the target in every group (Result.rounds).
    finetune: after the pruned model is evaluated, that many AdamW steps (at `finetune_lr`, after the
    last round) of next-token cross-entropy on the calibration sequences the pruning used,
    `batch_size` sequences a step, cycled (schedule.finetune), the masks kept (masks.keep: the pruned
    weights stay exactly zero); evaluated again (Result.finetuned) and handed to on_model fine-tuned.
    refine: llm.prune's refinements (llm.refine) for every method and target; each one's gain goes to
    the report (Run.info)."""
    refinement = Refinement(schedule, rounds, finetune, finetune_lr, batch_size)
    check_schedule(targets, refinement)
    _check(bundle, methods, targets, samples, seq_len, eval_tokens)
    model = bundle.model
    prefix, blocks = llm.find_blocks(model)
    linears = {
        f"{prefix}.{i}.{n}.weight": lin for i, block in enumerate(blocks) for n, lin in llm.block_linears(block).items()
    }
    evaluation = bundle.evaluation[:eval_tokens]
    quiet_bar = False if quiet else None
    start = time.perf_counter()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run = None
    if evaluate:
        dense = {"perplexity": llm.perplexity(model, evaluation, seq_len=eval_seq_len, progress=quiet_bar)}
        shapes = {n: tuple(lin.weight.shape) for n, lin in linears.items()}
        where = str(device or next(model.parameters()).device)
        setting = _Setting(targets, granularity, samples, seq_len, evaluation, eval_seq_len)
        run = _new_run(bundle, setting, where, shapes, dense, time.perf_counter() - start, refinement.label)
        if finetune:
            note = _finetune_note(samples, seq_len, batch_size, bundle)
            run.finetune = {"steps": finetune, "lr": finetune_lr, "data": note}
    batches = finetune_batches(bundle, samples, seq_len, batch_size) if finetune and run is not None else None
    try:
        for method in methods:
            for target in targets:
                name = label(method, target)
                options = _prune_options(target, granularity, samples, seq_len, device, quiet_bar, group)
                options["block_errors"] = True  # the report's per-block damage (in memory: n·T·H more)
                options["refine"] = refine
                trace = None
                if schedule == "iterative":
                    pruned, trace = _prune_rounds(model, bundle, method, target, rounds, options)
                else:
                    pruned = llm.prune(model, bundle.calibration, method=method, **options)
                if run is not None:
                    run.score_seconds[name] = pruned.seconds
                    _note_peak(run, pruned)
                    _note_left_dense(run, pruned)
                    _note_refinements(run, name, pruned)
                    ppl = llm.perplexity(model, evaluation, seq_len=eval_seq_len, progress=quiet_bar)
                    keep = {n: lin.weight.detach() != 0 for n, lin in linears.items()}
                    result = Result(
                        criterion=name,
                        sparsity=llm.parse_sparsity(target).fraction,
                        achieved=pruned.overall_sparsity,
                        metrics={"perplexity": ppl},
                        layers={n: 1.0 - keep[n].float().mean().item() for n in linears},
                        rounds=trace,
                        peak_bytes=_measured_peak(pruned),
                        block_error=list(pruned.block_error),
                    )
                    if finetune:
                        result.finetune_losses = _finetune(model, batches, keep, finetune, finetune_lr)
                        after = llm.perplexity(model, evaluation, seq_len=eval_seq_len, progress=quiet_bar)
                        result.finetuned = {"perplexity": after}
                    if on_model is not None:
                        on_model(result, keep, model, tag(method, target))
                    run.results.append(result)
                model.load_state_dict(dense_state)
    finally:
        model.load_state_dict(dense_state)
    if run is not None:
        run.seconds["prune"] = time.perf_counter() - start
    return run


def _finetune(model: nn.Module, batches, keep: dict[str, Tensor], steps: int, lr: float) -> list[float]:
    """schedule.finetune of every parameter of the model on the batches with the masks `keep` of the
    pruned Linear weights (keyed by parameter name) kept; returns each step's loss."""
    losses = finetune_(model, batches, steps, masks=keep, loss_fn=next_token_loss, forward=logits, lr=lr)
    model.zero_grad(set_to_none=True)
    return losses


def prune_offloaded(
    bundle: LLMBundle,
    methods: list[str],
    targets: list[float | str],
    models_dir: str,
    *,
    granularity: str | None = None,
    samples: int = 16,
    seq_len: int = 256,
    eval_tokens: int = 8192,
    eval_seq_len: int = 256,
    device: str | None = None,
    resume: bool = False,
    quiet: bool = True,
    group: object = None,
    evaluate: bool = True,
    refine: list[str] | None = None,
) -> Run | None:
    """`prune` for a model larger than memory: the bundle holds a skeleton of the checkpoint in
    `bundle.checkpoint` (llm.offload); each method × target streams it from disk block by block into
    the checkpoint directory `models_dir/<tag>` (`resume` continues runs killed mid-way), and the
    perplexities, dense and pruned, are measured with one block in memory at a time. `refine`: as
    for `prune`."""
    _check(bundle, methods, targets, samples, seq_len, max(eval_tokens, 1))  # 0: no evaluation
    evaluation = bundle.evaluation[:eval_tokens]
    quiet_bar = False if quiet else None
    start = time.perf_counter()

    def streamed_perplexity(path: str) -> float | None:
        if not eval_tokens:
            return None
        return llm.perplexity(path, evaluation, seq_len=eval_seq_len, progress=quiet_bar, offload="disk")

    run = None
    if evaluate:
        dense = streamed_perplexity(bundle.checkpoint)
        prefix, blocks = llm.find_blocks(bundle.model)
        shapes = {
            f"{prefix}.{i}.{n}.weight": tuple(lin.weight.shape)
            for i, block in enumerate(blocks)
            for n, lin in llm.block_linears(block).items()
        }
        setting = _Setting(targets, granularity, samples, seq_len, evaluation, eval_seq_len)
        metrics = {} if dense is None else {"perplexity": dense}
        run = _new_run(bundle, setting, str(device or "cpu"), shapes, metrics, time.perf_counter() - start)
        run.info["offload"] = f"streamed from {bundle.checkpoint} one decoder block at a time"
        if dense is None:
            run.info["evaluation"] = "skipped (eval_tokens 0): no perplexity measured"
    for method in methods:
        for target in targets:
            directory = os.path.join(models_dir, tag(method, target))
            options = _prune_options(target, granularity, samples, seq_len, device, quiet_bar, group)
            options["refine"] = refine
            pruned = llm.prune(bundle.checkpoint, bundle.calibration, method=method, offload="disk", out=directory,
                               resume=resume, **options)  # fmt: skip
            if run is None:
                continue
            name = label(method, target)
            run.score_seconds[name] = pruned.seconds
            _note_peak(run, pruned)
            _note_left_dense(run, pruned)
            _note_refinements(run, name, pruned)
            evaluated = time.perf_counter()
            ppl = streamed_perplexity(directory)
            run.seconds["pruned_evaluation"] = (
                run.seconds.get("pruned_evaluation", 0.0) + time.perf_counter() - evaluated
            )
            result = Result(
                criterion=name,
                sparsity=llm.parse_sparsity(target).fraction,
                achieved=pruned.overall_sparsity,
                metrics={} if ppl is None else {"perplexity": ppl},
                layers=dict(pruned.layer_sparsity),
                peak_bytes=_measured_peak(pruned),
                block_error=[math.nan] * pruned.resumed_blocks + pruned.block_error,  # resumed: not measured
            )
            result.files["model"] = directory
            run.results.append(result)
    if run is not None:
        run.seconds["prune"] = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the evaluations included
        run.info["peak host memory (RSS)"] = f"{peak / 2**20:.0f} MiB (the whole run: pruning and evaluations)"
    return run
