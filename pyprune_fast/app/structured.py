"""`pyprune-fast prune --structure width|depth`: smaller dense models (llm.prune_structured) of causal LMs,
encoders (the default MiniLM, hf:PATH) and vision transformers (timm:, torchvision:, hf:PATH), each
score at each ratio from a copy of the dense model; reported with the parameters before and after, the
measured speed of the dense and the pruned model in the same run (causal LMs: prefill and decode
tokens/s, batch 1; others: sequences or images/s), perplexity (causal LMs, before and after --distill)
or the model's own evaluation, and the kept widths of every block (report.widths_plot)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import llm
from ..errors import UsageError
from ..modeling import split_batch
from .bundle import Bundle, LLMBundle
from .llm_runner import check_tokens
from .results import Result, Run

DEFAULT_SCORE = "flap"  # the best of the SmolLM2 benchmark (benchmarks/README.md)
EXPERTS, EXPERT_SCORE = "experts", "reap"  # --structure experts: llm.prune_experts, REAP by default
STRUCTURES = (*llm.structured.STRUCTURES, EXPERTS)
DEPTH_SCORE = "influence"  # depth's default: ShortGPT's block influence (llm.structured.DEPTH_SCORES)
PREFILL_TOKENS, DECODE_TOKENS, PROMPT_TOKENS = 128, 32, 16  # short: the command stays quick
RANDOM_BATCH = 8  # images per random calibration batch of a vision model without --data
# how a causal LM's saved directory loads (report.json's "load"): a standard config, or per-layer widths
# or expert counts (global allocation; OPT / GPT-NeoX heads) that only llm.load_pretrained rebuilds
STOCK_LOAD = "transformers.AutoModelForCausalLM.from_pretrained(DIR)"
PRUNED_LOAD = "pyprune_fast.llm.load_pretrained(DIR)"


@dataclass(frozen=True)
class Plan:
    """What a structured run does, checked by PruneOptions before anything loads.

    structure: "width", "depth" or "experts"; ratios: fractions of the blocks' parameters removed (experts:
    of each MoE layer's routed experts), each in (0, 1); scores: llm.structured.SCORES (width), DEPTH_SCORES
    (depth) or EXPERT_SCORES (experts); allocation: "uniform" or "global"; reconstruct: the least-squares
    refit; samples, seq_len, eval_tokens: causal LMs' calibration and perplexity; batches: calibration
    batches of the other models; distill, distill_lr, batch_size: the --distill steps (causal LMs), their
    learning rate and sequences a step; device: where blocks are pruned."""

    structure: str
    ratios: list[float]
    scores: list[str]
    allocation: str = "uniform"
    reconstruct: bool = True
    multiple: int = 1
    samples: int = 16
    seq_len: int = 256
    eval_tokens: int = 8192
    batches: int = 4
    distill: int = 0
    distill_lr: float = 1e-4
    batch_size: int = 16
    device: str | None = None

    @property
    def criteria(self) -> list[str]:
        """The results' names: the scores."""
        return self.scores


def tag(structure: str, criterion: str, ratio: float) -> str:
    """The directory name of a result: <structure>-<score>-<ratio> (width-flap-0.25, depth-influence-0.25)."""
    return f"{structure}-{criterion}-{ratio:g}"


def _call(model: nn.Module, inputs):
    return model(inputs)


def _random_batches(bundle: Bundle, count: int) -> list:
    """Calibration for a vision model without data: `count` batches of standard-normal images of its
    input shape (the report says so); UsageError when the model declares no input shape."""
    shape = bundle.input_shape
    config = getattr(bundle.model, "config", None)
    if shape is None and config is not None and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        shape = (getattr(config, "num_channels", 3), size, size)
    if shape is None:
        raise UsageError(f"`model` {bundle.name!r} brings no calibration data and declares no input shape: give `data`")
    g = torch.Generator().manual_seed(0)
    device = next(bundle.model.parameters()).device
    bundle.info["calibration"] = f"{count} batches of {RANDOM_BATCH} random images {tuple(shape)} (no --data)"
    return [torch.randn((RANDOM_BATCH, *shape), generator=g).to(device) for _ in range(count)]


def _pretrained_name(bundle: Bundle) -> str | None:
    """The name of the Hugging Face model inside the bundle's model ("" when it is the model), None
    when there is none (timm, torchvision)."""
    if bundle.pretrained is None:
        return None
    return next((n for n, m in bundle.model.named_modules() if m is bundle.pretrained), None)


def saved_part(bundle, model: nn.Module) -> nn.Module | None:
    """What of a pruned copy `model` of the bundle's model is saved with from_pretrained: the whole
    causal LM, the Hugging Face encoder inside a wrapper (the default MiniLM's BERT), or None (save_vision)."""
    if isinstance(bundle, LLMBundle):
        return model
    name = _pretrained_name(bundle)
    return None if name is None else model.get_submodule(name)


def _structure_info(result: llm.StructuredResult) -> dict:
    return {
        "structure": result.structure,
        "ratio": result.ratio,
        "score": result.score,
        "allocation": result.allocation,
        "reconstruct": result.reconstruct,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "decoder_params_before": result.decoder_params_before,
        "decoder_params_after": result.decoder_params_after,
        "decoder_removed": result.removed_fraction,
        "intermediate": result.intermediate,
        "heads": result.heads,
        "removed_blocks": result.removed_blocks,
        "standard": result.standard,
        "units": result.units,
    }


def _expert_info(result: llm.ExpertResult) -> dict:
    return {
        "structure": EXPERTS,
        "ratio": result.ratio,
        "score": result.score,
        "allocation": result.allocation,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "experts": [len(k) for k in result.kept.values()],
        "removed_experts": result.removed,
        "standard": result.standard,
        "load": STOCK_LOAD if result.standard else PRUNED_LOAD,
    }


def _dense_widths(bundle, plan: Plan) -> dict:
    """The dense model's widths per block (MLP channels, heads), or its routed experts per MoE layer."""
    if plan.structure == EXPERTS:
        return {"experts": [m.num_experts for _, _, m in llm.structured.experts.moe_layers(bundle.model)]}
    if plan.structure == "width" and llm.structured.has_moe(bundle.model):  # routed experts' widths
        intermediate, heads = llm.structured.moe_widths(bundle.model)
        return {"intermediate": intermediate, "heads": heads}
    s = llm.structure_of(bundle.model)
    n = len(s.blocks)
    return {"intermediate": [s.intermediate(i) for i in range(n)], "heads": [s.block_heads(i) for i in range(n)]}


def _new_run(bundle, plan: Plan, dense: dict, seconds: float) -> Run:
    run = Run(
        model=bundle.name,
        info=dict(bundle.info),
        granularity=plan.structure
        + ("" if plan.structure == "depth" else f", {plan.allocation} allocation")
        + (", least-squares refit" if plan.reconstruct and plan.structure == "width" else ""),
        batches=plan.samples if isinstance(bundle, LLMBundle) else plan.batches,
        device=str(plan.device or next(bundle.model.parameters()).device),
        parameters=sum(p.numel() for p in bundle.model.parameters()),
        scored={},
        skipped={},
        dense=dense,
        seconds={"dense_evaluation": seconds},
        lower_better=("perplexity",) if isinstance(bundle, LLMBundle) else (),
        llm=isinstance(bundle, LLMBundle),
        targets=list(plan.ratios),
        structured={"structure": plan.structure, "dense": _dense_widths(bundle, plan)},
    )
    return run


@dataclass
class _Job:
    """One run's model-specific parts: calibration, evaluation, speed, and distillation (causal LMs)."""

    calibration: object
    forward: Callable | None
    evaluate: Callable[[nn.Module], dict[str, float]]
    speed: Callable[[nn.Module, nn.Module], dict]
    distill_batches: list | None = None


def _llm_job(bundle: LLMBundle, plan: Plan, quiet: bool) -> tuple[_Job, dict]:
    from ..bench.structured import paired_speed

    check_tokens(bundle, plan.samples, plan.seq_len)
    evaluation = bundle.evaluation[: plan.eval_tokens]
    bar = False if quiet else None

    def evaluate(model):
        return {"perplexity": llm.perplexity(model, evaluation, seq_len=plan.seq_len, progress=bar)}

    limit = getattr(bundle.model.config, "max_position_embeddings", None) or PREFILL_TOKENS
    prefill, decode = min(PREFILL_TOKENS, limit), min(DECODE_TOKENS, limit - PROMPT_TOKENS)
    batches = None
    if plan.distill:
        windows = llm.calibration_windows(bundle.calibration, plan.samples, plan.seq_len)
        batches = list(windows.split(plan.batch_size))
    job = _Job(bundle.calibration, None, evaluate, lambda d, p: paired_speed(d, p, prefill, decode, PROMPT_TOKENS))
    job.distill_batches = batches
    info = {
        "speed": f"batch 1: prefill {prefill} tokens (one forward, best of 3), decode {decode} new tokens by greedy "
        f"generate with the KV cache after a {PROMPT_TOKENS}-token prompt (its prefill subtracted); dense and "
        f"pruned one after the other; threads: {torch.get_num_threads()}",
    }
    return job, info


def _model_job(bundle: Bundle, plan: Plan) -> tuple[_Job, dict]:
    from ..bench.structured import paired_throughput

    forward = bundle.forward or _call
    if bundle.calibration:
        batches = [split_batch(b)[0] for b in bundle.calibration[: plan.batches]]
    else:
        batches = _random_batches(bundle, plan.batches)

    def evaluate(model):
        return {k: float(v) for k, v in bundle.evaluate(model).items()} if bundle.evaluate is not None else {}

    job = _Job(batches, forward, evaluate, lambda d, p: paired_throughput(d, p, forward, batches[0]))
    threads = torch.get_num_threads()
    info = {"speed": f"one calibration batch, best of 3, dense and pruned one after the other; threads: {threads}"}
    return job, info


def prune(
    bundle,
    plan: Plan,
    *,
    on_model: Callable[[Result, nn.Module, str], None] | None = None,
    quiet: bool = True,
) -> Run:
    """Prunes a copy of the bundle's model for every criterion at every ratio (the bundle's model stays
    dense), evaluates it, measures its speed against the dense model's, distills it (causal LMs with
    plan.distill: llm.distill with the dense model as teacher on the calibration sequences, evaluated
    again), and calls `on_model(result, pruned model, tag)` to save it.

    Raises:
        UsageError: too little text, a model the structured pruner does not know (refused by name,
            nothing pruned), a ratio that leaves a block nothing."""
    try:
        if plan.structure == EXPERTS or (plan.structure == "width" and llm.structured.has_moe(bundle.model)):
            llm.structured.experts.moe_layers(bundle.model)  # (MoE width: the rest is checked by prune_structured)
        else:
            llm.structure_of(bundle.model)
    except ValueError as exc:
        raise UsageError(f"`model` {bundle.name!r}: {exc}") from exc
    is_llm = isinstance(bundle, LLMBundle)
    job, info = _llm_job(bundle, plan, quiet) if is_llm else _model_job(bundle, plan)
    dense_model = bundle.model
    start = time.perf_counter()
    run = _new_run(bundle, plan, job.evaluate(dense_model), time.perf_counter() - start)
    run.info.update(info)
    if is_llm:
        run.info["calibration"] = f"{plan.samples} sequences × {plan.seq_len} tokens of {bundle.sources['calibration']}"
        run.info["evaluation"] = (
            f"perplexity on {min(plan.eval_tokens, bundle.evaluation.numel())} held-out tokens of "
            f"{bundle.sources['evaluation']}, windows of {plan.seq_len}"
        )
    if plan.distill:
        run.finetune = {
            "steps": plan.distill,
            "lr": plan.distill_lr,
            "data": f"logit KL to the dense model on the {plan.samples} calibration sequences, "
            f"{min(plan.batch_size, plan.samples)} a step, cycled",
        }
    for criterion in plan.criteria:
        run.score_seconds[criterion] = 0.0
        for ratio in plan.ratios:
            run.results.append(_one(bundle, plan, job, criterion, ratio, run, on_model, quiet))
    run.seconds["prune"] = time.perf_counter() - start
    return run


def _one(bundle, plan: Plan, job: _Job, criterion: str, ratio: float, run: Run, on_model, quiet: bool) -> Result:
    """One criterion at one ratio, from a copy of the dense model."""
    dense = bundle.model
    model = copy.deepcopy(dense)
    if plan.structure == EXPERTS:
        pruned = llm.prune_experts(model, job.calibration, ratio=ratio, score=criterion, allocation=plan.allocation,
                                   num_samples=plan.samples, seq_len=plan.seq_len, device=plan.device,
                                   progress=False if quiet else None)  # fmt: skip
        run.score_seconds[criterion] += pruned.seconds
        before, after = sum(pruned.experts_before.values()), sum(len(k) for k in pruned.kept.values())
        return _finish(bundle, plan, job, (model, tag(plan.structure, criterion, ratio)), on_model, Result(
            criterion=criterion, sparsity=ratio, achieved=1 - after / before, metrics={}, layers={},
            parameters=pruned.params_after, structure=_expert_info(pruned)))  # fmt: skip
    options = dict(structure=plan.structure, ratio=ratio, allocation=plan.allocation, reconstruct=plan.reconstruct)
    if plan.structure == "width":
        options.update(score=criterion, multiple=plan.multiple)
    else:
        options["depth_score"] = criterion
    if job.forward is None:
        options.update(num_samples=plan.samples, seq_len=plan.seq_len)
    else:
        options["forward"] = job.forward
    try:
        pruned = llm.prune_structured(
            model, job.calibration, device=plan.device, progress=False if quiet else None, **options
        )
    except ValueError as exc:  # refused before the copy was touched: the ratio, the architecture
        raise UsageError(f"`ratio` {ratio:g}, `structure` {plan.structure}: {exc}") from exc
    run.score_seconds[criterion] += pruned.seconds
    info = _structure_info(pruned)
    if isinstance(bundle, LLMBundle):
        info["load"] = STOCK_LOAD if pruned.standard else PRUNED_LOAD
    if isinstance(bundle, LLMBundle) and not llm.structured.has_moe(dense):  # (MoE: top-k experts read a token)
        from ..bench.structured import weights_read

        info["weights_read_ratio"] = weights_read(dense) / weights_read(model)
    result = Result(
        criterion=criterion,
        sparsity=ratio,
        achieved=pruned.removed_fraction,
        metrics={},
        layers={},
        parameters=pruned.params_after,
        structure=info,
    )
    return _finish(bundle, plan, job, (model, tag(plan.structure, criterion, ratio)), on_model, result)


def _finish(bundle, plan: Plan, job: _Job, pruned: tuple[nn.Module, str], on_model, result: Result) -> Result:
    """A pruned copy (model, its tag) measured against the dense model (speed, metrics), distilled if
    asked, and handed to on_model."""
    model, name = pruned
    dense = bundle.model
    result.structure["speed"] = job.speed(dense, model)
    result.metrics = job.evaluate(model)
    if plan.distill:
        result.finetune_losses = llm.distill(model, dense, job.distill_batches, steps=plan.distill, lr=plan.distill_lr)
        result.finetuned = job.evaluate(model)
    if on_model is not None:
        on_model(result, model, name)
    return result
