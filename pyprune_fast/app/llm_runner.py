"""The main job on causal LLMs (`pyprune-fast prune --model smollm2` or `hf:PATH` of a causal LM): each
method at each target pruned block by block (pyprune_fast.llm.prune) from the same dense weights,
judged by perplexity on held-out text, reported like the other models (report.json, report.md, plots).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .. import llm
from .runner import TWO_FOUR, Result, Run

DEFAULT_METHODS = ["magnitude", "wanda", "sparsegpt"]
DEFAULT_TARGETS: list[float | str] = [0.5, TWO_FOUR]


@dataclass
class LLMBundle:
    """A causal LM, its tokenizer, and disjoint calibration and evaluation token streams (1-D)."""

    name: str
    model: nn.Module
    tokenizer: Any
    calibration: Tensor
    evaluation: Tensor
    info: dict = field(default_factory=dict)


def text_bundle(name: str, model: nn.Module, tokenizer: Any, info: dict | None = None) -> LLMBundle:
    """The bundle of a causal LM on the packaged real text (Python's pydoc_data reference topics, split
    into disjoint calibration and evaluation parts)."""
    return LLMBundle(
        name=name,
        model=model,
        tokenizer=tokenizer,
        calibration=llm.pydoc_tokens(tokenizer, "calibration"),
        evaluation=llm.pydoc_tokens(tokenizer, "evaluation"),
        info={
            "data": "Python's pydoc_data reference topics (calibration and held-out evaluation parts)",
            **(info or {}),
        },
    )


def label(method: str, target: float | str) -> str:
    """The result's name: the method, with the pattern for N:M targets ("wanda 2:4")."""
    return method if isinstance(target, float) else f"{method} {target}"


def tag(method: str, target: float | str) -> str:
    """The file-name tag of a result: <method>-<sparsity> or <method>-2of4."""
    return f"{method}-{target:g}" if isinstance(target, float) else f"{method}-{target.replace(':', 'of')}"


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
) -> Run:
    """Prunes the bundle's model with every method at every target, each from the dense weights, and
    measures perplexity on the first `eval_tokens` held-out tokens (windows of `eval_seq_len`). Calls
    `on_model(result, masks, model, tag)` while each pruned model is loaded (to save it; tag: see
    `tag`). The model is given back dense. Methods, targets and sizes are checked before anything
    runs; llm.prune checks the rest before it touches the model."""
    unknown = [m for m in methods if m not in llm.METHODS]
    if unknown:
        raise ValueError(f"unknown LLM methods {unknown}; valid: {', '.join(llm.METHODS)}")
    for target in targets:
        llm.parse_sparsity(target)
    for name, value in (("--samples", samples), ("--seq-len", seq_len), ("--eval-tokens", eval_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model = bundle.model
    prefix, blocks = llm.find_blocks(model)
    linears = {
        f"{prefix}.{i}.{n}.weight": lin for i, block in enumerate(blocks) for n, lin in llm.block_linears(block).items()
    }
    evaluation = bundle.evaluation[:eval_tokens]
    quiet_bar = False if quiet else None
    start = time.perf_counter()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense = {"perplexity": llm.perplexity(model, evaluation, seq_len=eval_seq_len, progress=quiet_bar)}
    run = Run(
        model=bundle.name,
        info=dict(bundle.info),
        granularity=", ".join(str(t) for t in targets) + f" ({granularity or 'each method its paper'}'s groups)",
        batches=samples,
        device=str(device or next(model.parameters()).device),
        parameters=sum(p.numel() for p in model.parameters()),
        scored={n: tuple(lin.weight.shape) for n, lin in linears.items()},
        skipped={},
        dense=dense,
        seconds={"dense_evaluation": time.perf_counter() - start},
        lower_better=("perplexity",),
    )
    run.info["calibration"] = f"{samples} sequences × {seq_len} tokens"
    run.info["evaluation"] = f"perplexity on {evaluation.numel()} held-out tokens, windows of {eval_seq_len}"
    try:
        for method in methods:
            for target in targets:
                name = label(method, target)
                pruned = llm.prune(
                    model,
                    bundle.calibration,
                    method=method,
                    sparsity=target,
                    granularity=None if isinstance(target, str) else granularity,
                    num_samples=samples,
                    seq_len=seq_len,
                    device=device,
                    progress=quiet_bar,
                )
                run.score_seconds[name] = pruned.seconds
                run.info.setdefault("peak memory (formula)", str(pruned.memory))
                ppl = llm.perplexity(model, evaluation, seq_len=eval_seq_len, progress=quiet_bar)
                keep = {n: lin.weight.detach() != 0 for n, lin in linears.items()}
                result = Result(
                    criterion=name,
                    sparsity=llm.parse_sparsity(target).fraction,
                    achieved=pruned.overall_sparsity,
                    metrics={"perplexity": ppl},
                    layers={n: 1.0 - keep[n].float().mean().item() for n in linears},
                )
                if on_model is not None:
                    on_model(result, keep, model, tag(method, target))
                run.results.append(result)
                model.load_state_dict(dense_state)
    finally:
        model.load_state_dict(dense_state)
    run.seconds["prune"] = time.perf_counter() - start
    return run
