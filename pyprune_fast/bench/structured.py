"""Structured pruning of the embedded SmolLM2-135M (llm.prune_structured): perplexity at one ratio for
every score, allocation and reconstruction setting (width) and for depth, and the speed of the dense and
the pruned models (prefill tokens/s: batch 1, 512 tokens; decode tokens/s: batch 1, 128 new tokens by
greedy `generate` with the KV cache), each pruned model's speed in the same process as the dense one.

The goal: perplexity ≤ 3× dense at 25 % of the decoder removed (no distillation), speed-ups
≥ 0.9× the ratio of the weights a forward pass reads (dense ÷ pruned: decoder blocks + the LM head,
the embedding a lookup). The speed of a shape does not depend on the weights' values: the speed runs
prune by magnitude on 2 calibration sequences (same shapes as any score)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import llm
from ..llm.structured.layout import structure_of
from ..llm.structured.scores import SCORES
from .harness import Case


def weights_read(model: nn.Module) -> int:
    """Parameters one forward reads as matrices: the decoder blocks, the final norm and the LM head (the
    input embedding is a lookup, even when tied to the head)."""
    s = structure_of(model)
    head = model.get_output_embeddings().weight.numel()
    norm = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and not n.startswith(s.prefix + "."))
    return sum(p.numel() for p in s.blocks.parameters()) + head + norm


@torch.no_grad()
def prefill_tps(model: nn.Module, tokens: int = 512, repeats: int = 3) -> float:
    """Tokens/s of one forward over `tokens` tokens (batch 1, no cache), the best of `repeats`."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    model(ids[:, :16], use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(model)
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        _sync(model)
        best = min(best, time.perf_counter() - t0)
    return tokens / best


@torch.no_grad()
def decode_tps(model: nn.Module, new_tokens: int = 128, prompt: int = 16, repeats: int = 2) -> float:
    """New tokens/s of greedy `generate` with the KV cache (batch 1, a `prompt`-token prompt, exactly
    `new_tokens` generated), the prompt's prefill subtracted; the best of `repeats`."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(next(model.parameters()).device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(model)
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        _sync(model)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, **options)
        _sync(model)
        best = min(best, time.perf_counter() - t0 - first)
        assert out.shape[1] == prompt + new_tokens
    return new_tokens / best


def _batch_size(inputs: Any) -> int:
    """The number of sequences or images in a batch: the first dimension of its (first) tensor."""
    if isinstance(inputs, dict):
        inputs = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
    return int(inputs.shape[0])


@torch.no_grad()
def paired_throughput(
    dense: nn.Module, pruned: nn.Module, forward: Callable[[nn.Module, Any], Any], inputs: Any, rounds: int = 3
) -> dict:
    """Sequences or images per second of `forward(model, inputs)` on one batch (an encoder or a vision
    transformer) for the dense and the pruned model, timed alternately (dense, pruned, dense, ...: a
    shared machine's load hits both alike) after a warm-up call each, the best of `rounds` each, and
    the pruned model's speed-up."""
    best = {"dense": float("inf"), "pruned": float("inf")}
    models = {"dense": dense, "pruned": pruned}
    for model in models.values():
        forward(model, inputs)
    for _ in range(rounds):
        for name, model in models.items():
            _sync(model)
            t0 = time.perf_counter()
            forward(model, inputs)
            _sync(model)
            best[name] = min(best[name], time.perf_counter() - t0)
    items = _batch_size(inputs)
    row = {"dense_items_per_s": items / best["dense"], "items_per_s": items / best["pruned"]}
    row["speedup"] = row["items_per_s"] / row["dense_items_per_s"]
    return row


def _sync(model: nn.Module) -> None:
    """Waits for the model's device (CUDA kernels run asynchronously) before a clock is read."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_speed(
    dense: nn.Module, pruned: nn.Module, prefill_tokens: int = 512, decode_tokens: int = 128, prompt: int = 16
) -> dict:
    """Prefill and decode tokens/s of the dense and the pruned model measured alternately (dense, pruned,
    dense, pruned: a shared machine's load hits both alike), and the pruned model's speed-ups."""
    row = {
        "dense_prefill_tps": prefill_tps(dense, prefill_tokens),
        "prefill_tps": prefill_tps(pruned, prefill_tokens),
        "dense_decode_tps": decode_tps(dense, decode_tokens, prompt, repeats=1),
        "decode_tps": decode_tps(pruned, decode_tokens, prompt, repeats=1),
    }
    row["prefill_speedup"] = row["prefill_tps"] / row["dense_prefill_tps"]
    row["decode_speedup"] = row["decode_tps"] / row["dense_decode_tps"]
    return row


def _setup(threads: int, num_samples: int, seq_len: int, eval_tokens: int, eval_seq_len: int) -> dict[str, Any]:
    """What a SmolLM2 benchmark's JSON records of its setup: model, machine, threads, data."""
    return {
        "model": "SmolLM2-135M (embedded, float32)",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "threads": threads,
        "torch": torch.__version__,
        "calibration": f"{num_samples}x{seq_len} pydoc calibration tokens",
        "evaluation": f"{eval_tokens} pydoc evaluation tokens, windows of {eval_seq_len}",
    }


def quality_settings(scores: tuple[str, ...] = SCORES, allocations: tuple[str, ...] = ("uniform", "global")) -> list:
    """Every width setting (score × allocation × reconstruction) and depth, the most telling first: FLAP
    uniform with reconstruction, depth, Torch-Pruning's magnitude baseline, then the rest."""
    width = [
        dict(structure="width", score=s, allocation=a, reconstruct=r)
        for a in allocations
        for r in (True, False)
        for s in scores
    ]
    first = [
        dict(structure="width", score="flap", allocation="uniform", reconstruct=True),
        dict(structure="depth"),
        dict(structure="width", score="magnitude", allocation="uniform", reconstruct=False),
        dict(structure="width", score="flap", allocation="uniform", reconstruct=False),
    ]
    return first + [w for w in width if w not in first]


def structured_smollm2(
    *,
    ratio: float = 0.25,
    speed_ratios: tuple[float, ...] = (0.10, 0.25, 0.40),
    settings: list[dict] | None = None,
    num_samples: int = 16,
    seq_len: int = 256,
    eval_tokens: int = 8192,
    eval_seq_len: int = 256,
    prefill_tokens: int = 512,
    decode_tokens: int = 128,
    threads: int = 1,
    speed: bool = True,
    on_row: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """The numbers of the module docstring as one JSON-ready dict: `dense` (perplexity, speed, weights
    read), `quality` (one row per setting at `ratio`, `settings` default: quality_settings()), then
    `speed` (one row per structure and speed ratio, dense and pruned measured alternately).
    `on_row(kind, row)` sees every row as it is measured (a partial run keeps what it measured)."""
    torch.set_num_threads(threads)
    emit = on_row or (lambda _kind, _row: None)
    model, tok = llm.load_smollm2()
    calib = llm.pydoc_tokens(tok, "calibration")
    evaluation = llm.pydoc_tokens(tok, "evaluation")[:eval_tokens]
    dense_read = weights_read(model)
    out: dict[str, Any] = {
        **_setup(threads, num_samples, seq_len, len(evaluation), eval_seq_len),
        "dense": {"params": sum(p.numel() for p in model.parameters()), "weights_read": dense_read},
        "speed": [],
        "quality": [],
    }

    def ppl(m: nn.Module) -> float:
        return float(llm.perplexity(m, evaluation, seq_len=eval_seq_len, progress=False))

    settings = quality_settings() if settings is None else settings
    if settings:
        out["dense"]["perplexity"] = dense_ppl = ppl(model)
        emit("dense", dict(out["dense"]))
    for setting in settings:
        pruned, _ = llm.load_smollm2()
        options = dict(num_samples=num_samples, seq_len=seq_len, progress=False)
        result = llm.prune_structured(pruned, calib, ratio=ratio, **setting, **options)
        value = ppl(pruned)
        row = {
            **setting,
            "ratio": ratio,
            "perplexity": value,
            "perplexity_vs_dense": value / dense_ppl,
            "decoder_removed": result.removed_fraction,
            "params": result.params_after,
            "standard_config": result.standard,
            "prune_seconds": result.seconds,
            "intermediate": result.intermediate,
            "heads": result.heads,
            "removed_blocks": result.removed_blocks,
        }
        out["quality"].append(row)
        emit("quality", row)
        del pruned
    for structure in ("width", "depth") if speed else ():
        for r in speed_ratios:
            pruned, _ = llm.load_smollm2()
            options = dict(num_samples=1, seq_len=32, progress=False, score="magnitude", reconstruct=False)
            result = llm.prune_structured(pruned, calib, structure=structure, ratio=r, **options)
            row = {"structure": structure, "ratio": r, "decoder_removed": result.removed_fraction}
            row["weights_read_ratio"] = dense_read / weights_read(pruned)
            row.update(paired_speed(model, pruned, prefill_tokens, decode_tokens))
            out["speed"].append(row)
            emit("speed", row)
            del pruned
    return out


def speed_case(structure: str, ratio: float, phase: str = "prefill", tokens: int | None = None) -> Case:
    """pytest-benchmark's view of the speed rows: one forward of 512 tokens ("prefill") or a greedy
    `generate` of 128 new tokens with the KV cache ("decode"), batch 1, the model pruned by `ratio`
    (magnitude: the shapes are what matter) against the dense SmolLM2."""
    dense, tok = llm.load_smollm2()
    pruned, _ = llm.load_smollm2()
    calib = llm.pydoc_tokens(tok, "calibration")
    options = dict(num_samples=1, seq_len=32, progress=False, score="magnitude", reconstruct=False)
    llm.prune_structured(pruned, calib, structure=structure, ratio=ratio, **options)
    ids = torch.randint(0, dense.config.vocab_size, (1, tokens or 512), generator=torch.Generator().manual_seed(0))
    new = tokens or 128

    def run(model: nn.Module):
        if phase == "prefill":
            return lambda: model(ids, use_cache=False)
        options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return lambda: model.generate(ids[:, :16], **options)

    return Case(
        f"SmolLM2 {phase} {structure} {round(100 * ratio)}%",
        torch.no_grad()(run(pruned)),
        {"dense": torch.no_grad()(run(dense))},
        extra={"weights_read_ratio": weights_read(dense) / weights_read(pruned)},
    )


@torch.no_grad()
def decode_profile(model: nn.Module, new_tokens: int = 32, prompt: int = 16) -> dict[str, float]:
    """Where greedy decoding's time goes (torch.profiler, CPU): the seconds in matrix products
    (aten::mm/addmm/bmm), in attention (scaled_dot_product_attention), and the rest (per-op dispatch,
    Python, cache bookkeeping, norms, RoPE, sampling), for `new_tokens` new tokens."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(ids, **options)
    total = time.perf_counter() - t0
    self_us: dict[str, float] = {}
    for event in prof.key_averages():
        self_us[event.key] = self_us.get(event.key, 0.0) + event.self_cpu_time_total
    matmul = sum(v for k, v in self_us.items() if k in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e6
    attention = sum(v for k, v in self_us.items() if "scaled_dot_product" in k or "flash_attention" in k) / 1e6
    return {"seconds": total, "matmul_s": matmul, "attention_s": attention, "other_s": total - matmul - attention}


def _nonzeros(model: nn.Module) -> int:
    """The non-zero parameters of the decoder blocks."""
    return sum(int(p.count_nonzero()) for p in structure_of(model).blocks.parameters())


def same_params_settings(ratio: float = 0.25, score: str = "flap") -> list[dict]:
    """The rows of the same-parameter-count comparison: structured width by `score` (uniform, with and
    without the least-squares refit, each then distilled), Torch-Pruning's baseline (uniform L2
    magnitude, no compensation at all), depth, and unstructured Wanda and SparseGPT at `ratio` and at
    the N:M pattern that keeps as many weights (3:4 for 25 %), with 2:4 beside them."""
    width = dict(structure="width", score=score, allocation="uniform")
    kept = round(4 * (1 - ratio))
    return [
        dict(kind="structured", **width, reconstruct=True, distill=True),
        dict(kind="structured", **width, reconstruct=False, distill=True),
        dict(kind="structured", **{**width, "score": "magnitude"}, reconstruct=False, bias=False),
        dict(kind="structured", structure="depth", distill=True),
        *(dict(kind="unstructured", method=m, sparsity=ratio) for m in ("wanda", "sparsegpt")),
        *(dict(kind="unstructured", method=m, sparsity=f"{kept}:4") for m in ("wanda", "sparsegpt")),
        *(dict(kind="unstructured", method=m, sparsity="2:4") for m in ("wanda", "sparsegpt")),
    ]


def same_params_smollm2(
    *,
    ratio: float = 0.25,
    settings: list[dict] | None = None,
    num_samples: int = 16,
    seq_len: int = 256,
    eval_tokens: int = 4096,
    distill_steps: int = 20,
    distill_lr: float = 1e-4,
    distill_batch: int = 2,
    threads: int = 1,
    on_row: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Quality at the same parameter count on the embedded SmolLM2-135M: each setting of
    `same_params_settings` (default) pruned from the dense weights, its decoder non-zeros, perplexity on
    held-out text and, for structured rows marked `distill`, the perplexity after `distill_steps` steps
    of llm.distill (dense teacher, the calibration sequences, `distill_batch` a step). JSON-ready;
    `on_row(row)` sees each row as it is measured."""
    torch.set_num_threads(threads)
    emit = on_row or (lambda _row: None)
    dense, tok = llm.load_smollm2()
    calib = llm.pydoc_tokens(tok, "calibration")
    evaluation = llm.pydoc_tokens(tok, "evaluation")[:eval_tokens]

    def ppl(m: nn.Module) -> float:
        return float(llm.perplexity(m, evaluation, seq_len=seq_len, progress=False))

    out: dict[str, Any] = {
        **_setup(threads, num_samples, seq_len, len(evaluation), seq_len),
        "distill": f"{distill_steps} AdamW steps, lr {distill_lr:g}, {distill_batch} calibration sequences a step",
        "dense": {"perplexity": ppl(dense), "decoder_nonzeros": _nonzeros(dense)},
        "rows": [],
    }
    emit({"dense": out["dense"]})
    windows = llm.calibration_windows(calib, num_samples, seq_len)
    options = dict(num_samples=num_samples, seq_len=seq_len, progress=False)
    for setting in same_params_settings(ratio) if settings is None else settings:
        model, _ = llm.load_smollm2()
        t0 = time.perf_counter()
        if setting["kind"] == "structured":
            chosen = {k: v for k, v in setting.items() if k not in ("kind", "distill")}
            llm.prune_structured(model, calib, ratio=ratio, **chosen, **options)
        else:
            llm.prune(model, calib, method=setting["method"], sparsity=setting["sparsity"], **options)
        row = {**setting, "prune_seconds": time.perf_counter() - t0, "decoder_nonzeros": _nonzeros(model)}
        row["params"] = sum(p.numel() for p in model.parameters())
        row["perplexity"] = ppl(model)
        if setting.get("distill") and distill_steps:
            t0 = time.perf_counter()
            losses = llm.distill(model, dense, list(windows.split(distill_batch)), steps=distill_steps, lr=distill_lr)
            row.update(distill_seconds=time.perf_counter() - t0, distill_loss=[losses[0], losses[-1]])
            row["perplexity_distilled"] = ppl(model)
        out["rows"].append(row)
        emit(row)
        del model
    return out


def vit_speed(name: str = "vit_base_patch16_224", ratio: float = 0.25, batch: int = 8, threads: int = 1) -> dict:
    """Images/s of timm's ViT (random initialization: the speed of a shape does not depend on the
    weights) dense and width- and depth-pruned at `ratio` (magnitude, calibrated on 2 batches of random
    images), batch `batch` at 224×224, dense and pruned one after the other."""
    import timm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False).eval()
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calib = [images[:2], images[2:4]]

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    out = {"model": f"timm {name} (random init)", "threads": threads, "batch": batch, "rows": []}
    for structure in ("width", "depth"):
        pruned = timm.create_model(name, pretrained=False).eval()
        pruned.load_state_dict(dense.state_dict())
        options = dict(score="magnitude", reconstruct=False) if structure == "width" else {}
        options.update(structure=structure, ratio=ratio, forward=call, progress=False)
        result = llm.prune_structured(pruned, calib, **options)
        row = {"structure": structure, "ratio": ratio, "params": result.params_after}
        row.update(paired_throughput(dense, pruned, call, images))
        row["params_ratio"] = result.params_before / result.params_after
        out["rows"].append(row)
        del pruned
    return out
