"""Structured pruning of decoder LLMs: models that run faster anywhere, because they are smaller dense
models — MLP channels and attention heads removed block by block (width), or whole blocks (depth), the
shapes and the config changed for real.

    from pyprune_fast import llm
    model, tok = llm.load_smollm2()
    calib = llm.pydoc_tokens(tok, "calibration")
    result = llm.prune_structured(model, calib, structure="width", ratio=0.25, score="flap")
    llm.save_pretrained(model, tok, "out/smollm2-w25")   # uniform widths: stock from_pretrained loads it

Architectures: Llama, Mistral, Qwen2, Qwen3, OPT, GPT-NeoX; encoders and vision transformers with `forward=`
(BERT and the default MiniLM, Hugging Face ViT, timm ViT; torchvision ViT MLP channels only).
layout.py: the coupled groups, the rule for grouped-query attention; any other is refused by name.
Width: width.py (how `ratio` is split between heads and channels, uniform and global allocation),
scores.py (the SCORES registry: magnitude, L1/L2, Wanda, FLAP, Taylor, Fisher, Ide; gradients.py the
block-local gradients of the last three), refit.py (least-squares reconstruction, FLAP's bias
compensation). Mixture-of-experts models (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, gpt-oss): width
inside every routed and shared expert, each on its own routed tokens (moe_width.py); whole experts
removed (experts.py, llm.prune_experts). Depth: depth.py (ShortGPT's block influence, or the loss
increase of dropping each block). Saving and loading: load.py (Hugging Face), vision.py (timm /
torchvision: safetensors with the shapes, `load_vision` rebuilds them on a model from the library's
factory)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...criteria.engine import check_normalize
from ...errors import UsageError
from ...modeling import eval_mode
from ..blocks import capture_inputs, find_blocks, module_device
from ..text import calibration_windows
from .depth import DEPTH_SCORES, block_influence, blocks_to_remove, loss_increase, remove_blocks_
from .edit import Edits
from .layout import LAYOUTS, Layout, Structure, shared_parameters, structure_of
from .load import load_pretrained
from .moe_width import MoEWidthRun, has_moe
from .moe_width import dense_scores as moe_dense_scores
from .moe_width import plan as moe_plan
from .moe_width import sequential as moe_sequential
from .moe_width import widths as moe_widths
from .scores import SCORES
from .vision import load_vision, save_vision
from .width import (
    UNITS,
    Counts,
    WidthOptions,
    WidthRun,
    check_units,
    dense_scores,
    global_counts,
    sequential,
    uniform_counts,
)

STRUCTURES = ("width", "depth")
ALLOCATIONS = ("uniform", "global")

__all__ = [
    "ALLOCATIONS",
    "DEPTH_SCORES",
    "LAYOUTS",
    "SCORES",
    "STRUCTURES",
    "UNITS",
    "Layout",
    "Structure",
    "StructuredResult",
    "load_pretrained",
    "has_moe",
    "load_vision",
    "moe_widths",
    "prune_structured",
    "save_vision",
    "structure_of",
]


@dataclass
class StructuredResult:
    """What a `prune_structured` run did: its options, the parameters before and after (whole model and
    decoder blocks), the kept widths of every remaining block (MLP channels, query heads), the removed
    blocks and every block's score (depth: `influence`, or `loss_increase` with depth_score="loss"),
    whether the result is a standard config that stock `from_pretrained` loads, and times. Mixture-of-
    experts width pruning: `intermediate` holds each block's routed experts' width (dense blocks: their
    MLP's), `rare_experts` the routed experts below min_expert_tokens with their routed tokens. `units`:
    what width pruning removed ("both", "mlp", "heads"; None for depth)."""

    structure: str
    ratio: float
    score: str | None
    allocation: str | None
    reconstruct: bool
    params_before: int
    params_after: int
    decoder_params_before: int
    decoder_params_after: int
    intermediate: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    removed_blocks: list[int] = field(default_factory=list)
    influence: list[float] | None = None
    standard: bool = True
    block_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    depth_score: str | None = None
    loss_increase: list[float] | None = None
    rare_experts: dict[str, int] = field(default_factory=dict)
    units: str | None = None

    @property
    def removed_fraction(self) -> float:
        """The fraction of the decoder blocks' parameters removed (measured)."""
        return 1.0 - self.decoder_params_after / max(self.decoder_params_before, 1)

    def summary(self) -> str:
        what = f"depth {self.depth_score}" if self.structure == "depth" else f"width {self.score} {self.allocation}"
        lines = [
            f"structured pruning ({what}, ratio {self.ratio}): decoder {self.decoder_params_before:,} -> "
            f"{self.decoder_params_after:,} parameters ({100 * self.removed_fraction:.1f} % removed), model "
            f"{self.params_before:,} -> {self.params_after:,}, {self.seconds:.1f} s",
        ]
        if self.removed_blocks:
            lines.append(f"removed blocks {self.removed_blocks}")
        lines.append(f"MLP widths {self.intermediate}")
        if self.rare_experts:
            lines.append(f"{len(self.rare_experts)} routed experts below min_expert_tokens (their routed tokens): "
                         + ", ".join(f"{n} {c}" for n, c in self.rare_experts.items()))  # fmt: skip
        lines.append(f"query heads {self.heads}" + (" (units='mlp': heads kept)" if self.units == "mlp" else ""))
        lines.append(
            "standard config (stock from_pretrained loads it)"
            if self.standard
            else "not a standard config: llm.load_pretrained (Hugging Face), load_vision (timm, torchvision)"
        )
        return "\n".join(lines)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"`{name}` must be a positive int, got {value!r}")


def _check(options: dict[str, Any], sizes: dict[str, int]) -> None:
    """UsageError (TypeError for a flag that is not a bool) naming the first option of prune_structured
    that is wrong."""
    structure, ratio, score, allocation = (options[k] for k in ("structure", "ratio", "score", "allocation"))
    floor, reconstruct, bias, percdamp = (options[k] for k in ("floor", "reconstruct", "bias", "percdamp"))
    if structure not in STRUCTURES:
        raise UsageError(f"`structure` must be one of {STRUCTURES}, got {structure!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise UsageError(f"`ratio` must be a number in [0, 1), got {ratio!r}")
    if score not in SCORES:
        raise UsageError(f"`score` must be one of {tuple(SCORES)}, got {score!r}")
    if options["depth_score"] not in DEPTH_SCORES:
        raise UsageError(f"`depth_score` must be one of {DEPTH_SCORES}, got {options['depth_score']!r}")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise UsageError(f"`floor` must be a number in [0, 1), got {floor!r}")
    for name, value in (("reconstruct", reconstruct), ("bias", bias)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise UsageError(f"`percdamp` must be a number >= 0, got {percdamp!r}")
    for name, value in sizes.items():
        _positive_int(name, value)


def _decoder_params(structure: Structure) -> int:
    return sum(p.numel() for p in structure.blocks.parameters())


def _widths(structure: Structure) -> tuple[list[int], list[int]]:
    n = len(structure.blocks)
    return [structure.intermediate(i) for i in range(n)], [structure.block_heads(i) for i in range(n)]


def _finish_config(model: nn.Module, structure: Structure, edits: Edits, flags: list[str]) -> bool:
    """The config after width pruning: bias flags set, widths written (a standard config when uniform;
    else the largest, with `pyprune_fast_widths` the per-layer lists llm.load_pretrained reads).
    Returns whether the config is standard."""
    config, layout = structure.config, structure.layout
    if config is None:  # timm / torchvision: no config; the shapes are saved with the weights (vision.py)
        return False
    for flag in flags:
        edits.set(config, flag, True)
    intermediate, heads = _widths(structure)
    uniform = len(set(intermediate)) == 1 and len(set(heads)) == 1
    heads_changed = any(h != structure.heads for h in heads)
    standard = uniform and (layout.standard_heads or not heads_changed)
    edits.set(config, layout.intermediate_key, max(intermediate))
    if layout.standard_heads:
        edits.set(config, "head_dim", structure.head_dim)
        edits.set(config, "num_attention_heads", max(heads))
    if standard:
        if getattr(config, "pyprune_fast_widths", None) is not None:
            edits.set(config, "pyprune_fast_widths", None)
    else:
        edits.set(config, "pyprune_fast_widths", {"intermediate_size": intermediate, "num_attention_heads": heads})
    return standard


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    calibration: Tensor | list[Any],
    *,
    structure: str = "width",
    units: str | None = None,
    ratio: float = 0.25,
    score: str = "flap",
    allocation: str = "uniform",
    reconstruct: bool = True,
    bias: bool = True,
    floor: float = 0.1,
    normalize: str | None = None,
    p: float = 1.0,
    multiple: int = 1,
    percdamp: float = 0.01,
    num_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    depth_score: str = "influence",
    rare_experts: str = "magnitude",
    min_expert_tokens: int = 16,
) -> StructuredResult:
    """Removes `ratio` of a decoder LLM's block parameters for real: MLP channels and attention heads
    (structure="width"), or whole blocks (structure="depth"), calibrated block by block.

    Args:
        model: a Hugging Face causal LM of a known architecture (layout.LAYOUTS), or with `forward` an
            encoder / vision transformer (BERT, HF ViT, timm ViT, torchvision ViT), changed in place.
        calibration: token ids (1-D stream or [sequences, tokens]), cut by `calibration_windows`; with
            `forward`, a list of batches (num_samples, seq_len and batch_size are then not used).
        structure: "width" or "depth".
        depth_score: depth only: "influence" (ShortGPT's block influence) or "loss" (the calibration
            loss increase of dropping each block alone; causal LMs, not with `forward`), depth.py.
        units: width only: "both" (heads and MLP channels), "mlp" or "heads" (the whole budget in one
            kind); None: "both", or "mlp" for torchvision's nn.MultiheadAttention, DeepSeek-V3's MLA and
            OLMoE's attention, which cannot lose heads (units="both"/"heads" there: ValueError naming
            units, the model untouched); StructuredResult.units says which.
        ratio: the fraction of the decoder blocks' parameters removed, in [0, 1) (width.py: how it is
            split between heads and channels; depth: round(ratio × blocks) blocks).
        score: a name of SCORES (scores.py: "magnitude", "l1", "l2", "wanda", "flap", "taylor", "fisher",
            "ide"), width only.
        allocation: "uniform" (the same widths in every block: a standard config) or "global" (one
            threshold over per-block standardized scores, each block keeping at least `floor`).
        normalize, p: global allocation only: how each block's scores are made comparable across blocks,
            None (standardized, as FLAP) or "lp" (√S / ‖√S‖_p, the channel criteria's L_p normalization,
            p > 0); uniform allocation ranks within a block, where neither changes anything.
        multiple: the kept MLP width rounded to a multiple of this (1: the exact budget; 64 or 128 give
            shapes the matrix-multiply kernels like).
        reconstruct: refit each consumer by least squares (refit.py); else FLAP's bias compensation.
        bias: let the refit/compensation give a consumer a bias through the config flag of the stock
            class (Llama's mlp_bias/attention_bias, Qwen3's attention_bias); existing biases always refit.
        percdamp: the refit's dampening, λ = percdamp · mean diag E[x xᵀ].
        num_samples, seq_len, batch_size: calibration sequences, their length, sequences per forward.
        device: where each block runs (default: CUDA when available, else where the blocks are).
        progress: a progress bar (None: when the output is a terminal).
        forward: for a model that does not take token ids: a callable (model, inputs), as llm.prune's.
        rare_experts, min_expert_tokens: mixture-of-experts width only (moe_width.py): a routed expert
            with fewer than `min_expert_tokens` routed calibration tokens is scored by magnitude and not
            refitted ("magnitude"), or first sent the tokens its router scores highest ("route").

    Mixture-of-experts models (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, gpt-oss; moe_width.py), width
    only: the intermediate channels of every routed expert (each scored and refitted on its own routed
    tokens), shared expert and dense MLP are removed, the same count from every routed expert of a
    block, and query heads as for a dense model (not from DeepSeek-V3's MLA nor OLMoE's attention:
    units=None is MLP-only there, units="both"/"heads" refused); uniform allocation gives a standard
    config, global allocation per-block widths that llm.load_pretrained rebuilds.

    Returns:
        StructuredResult. UsageError naming the argument, with the model untouched, for a bad option, an
        unknown architecture, weights shared inside the blocks, head counts that do not split into the
        key/value groups, or a ratio that leaves a block no head or no channel; a failure during the run
        (non-finite statistics, a singular refit) puts the model back as it was."""
    sizes = {"num_samples": num_samples, "seq_len": seq_len, "batch_size": batch_size, "multiple": multiple}
    options = dict(structure=structure, ratio=ratio, score=score, allocation=allocation, floor=floor)
    flags = {"reconstruct": reconstruct, "bias": bias, "percdamp": percdamp, "depth_score": depth_score}
    _check({**options, **flags}, sizes)
    check_normalize(normalize, p)
    if structure == "depth" and depth_score == "loss" and forward is not None:
        raise UsageError("`depth_score`='loss' needs a causal LM's next-token loss: not with `forward`")
    if structure == "width" and has_moe(model):
        moe = dict(units=units, allocation=allocation, score=score, forward=forward, ratio=ratio, multiple=multiple,
                   rare_experts=rare_experts, min_expert_tokens=min_expert_tokens, reconstruct=reconstruct,
                   bias=bias, percdamp=float(percdamp), floor=floor, normalize=normalize, p=p)  # fmt: skip
        return _moe_width(model, calibration, moe, (num_samples, seq_len, batch_size), device, progress)
    s = structure_of(model)
    units = check_units(s, units) if structure == "width" else None
    counts = uniform_counts(s, float(ratio), multiple, units) if structure == "width" else None
    removing = round(ratio * len(s.blocks)) if structure == "depth" else 0
    if removing >= len(s.blocks):
        raise UsageError(f"`ratio`={ratio} removes every one of the {len(s.blocks)} blocks")
    if forward is None:
        windows = calibration_windows(calibration, num_samples, seq_len)
        batches = [windows[k : k + batch_size] for k in range(0, len(windows), batch_size)]
    elif not callable(forward):
        raise TypeError(f"forward must be callable (model, inputs) -> outputs, got {type(forward).__name__}")
    elif not isinstance(calibration, (list, tuple)) or not calibration:
        raise TypeError("with forward=, calibration must be a non-empty list of batches")
    else:
        batches = list(calibration)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else module_device(s.blocks[0])
    device = torch.device(device)
    params_before, decoder_before = sum(p.numel() for p in model.parameters()), _decoder_params(s)
    result = StructuredResult(
        structure,
        float(ratio),
        score if structure == "width" else None,
        allocation if structure == "width" else None,
        reconstruct and structure == "width",
        params_before,
        params_before,
        decoder_before,
        decoder_before,
    )
    t0 = time.perf_counter()
    edits = Edits()
    try:
        with eval_mode(model):
            inputs = capture_inputs(model, s.blocks[0], batches, device, forward=forward)
            if structure == "depth":
                result.standard, result.depth_score = s.config is not None, depth_score
                if depth_score == "loss":
                    scores = loss_increase(model, s, batches)
                    result.loss_increase = scores.tolist()
                else:
                    scores = block_influence(s, inputs, device)
                    result.influence = scores.tolist()
                result.removed_blocks = blocks_to_remove(scores, removing)
                if removing:
                    remove_blocks_(model, s, result.removed_blocks, edits)
                s = structure_of(model)
            else:
                options = WidthOptions(score, reconstruct, bias, float(percdamp))
                run = WidthRun(s, options, edits, device)
                result.standard = _width(model, run, inputs, counts, result, progress, (floor, multiple, normalize, p))
    except BaseException:
        edits.undo()
        raise
    result.intermediate, result.heads = _widths(s)
    result.units = units
    result.params_after = sum(p.numel() for p in model.parameters())
    result.decoder_params_after = _decoder_params(s)
    result.seconds = time.perf_counter() - t0
    return result


def _moe_width(model, calibration, options: dict[str, Any], sizes: tuple[int, int, int], device, progress):
    """prune_structured's width pruning of a mixture-of-experts model (moe_width.py): the global
    allocation's dense pass if asked, the sequential pass, the config."""
    prefix, blocks = find_blocks(model)
    shared = shared_parameters(model, prefix)
    if shared:
        raise UsageError(f"`model`: the structured pruner refuses weights shared inside the decoder blocks: {shared}")
    plan = moe_plan(model, blocks, options)
    num_samples, seq_len, batch_size = sizes
    windows = calibration_windows(calibration, num_samples, seq_len)
    batches = [windows[k : k + batch_size] for k in range(0, len(windows), batch_size)]
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else
                          module_device(blocks[0]))  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in blocks.parameters())
    result = StructuredResult("width", float(options["ratio"]), options["score"], options["allocation"],
                              options["reconstruct"], params, params, decoder, decoder, units=plan.units)  # fmt: skip
    t0 = time.perf_counter()
    edits = Edits()
    run = MoEWidthRun(plan, options, edits, device)
    counts = plan.counts
    try:
        with eval_mode(model):
            inputs = capture_inputs(model, blocks[0], batches, device)
            if options["allocation"] == "global" and any(counts):
                start = list(inputs.hidden)
                with tqdm(total=len(blocks), desc="dense scores", unit="block", disable=_disabled(progress)) as bar:
                    seen = moe_dense_scores(run, inputs, device, lambda _i: bar.update())
                inputs.hidden = start
                counts = run.global_counts(seen, options["floor"], options["normalize"], options["p"])
            desc = f"width {options['score']} (experts)"
            with tqdm(total=len(blocks), desc=desc, unit="block", disable=_disabled(progress)) as bar:
                result.standard = moe_sequential(run, inputs, device, counts, result.block_seconds,
                                                 lambda _i: bar.update())  # fmt: skip
    except BaseException:
        edits.undo()
        raise
    result.intermediate, result.heads = moe_widths(model)
    result.rare_experts = run.rare
    result.params_after = sum(p.numel() for p in model.parameters())
    result.decoder_params_after = sum(p.numel() for p in blocks.parameters())
    result.seconds = time.perf_counter() - t0
    return result


def _width(model, run: WidthRun, inputs, counts: list[Counts], result: StructuredResult, progress, allocation) -> bool:
    """Width pruning (width.py): the global allocation's dense pass if asked (`allocation`: its floor,
    multiple, normalize and p), the sequential pass, the biases a config flag gave, the config. Returns
    whether the config is standard."""
    s = run.s
    if result.allocation == "global" and any(c.heads or c.channels for c in counts):
        start = list(inputs.hidden)
        with tqdm(total=len(s.blocks), desc="dense scores", unit="block", disable=_disabled(progress)) as bar:
            scores = dense_scores(run, inputs, counts, lambda _i: bar.update())
        inputs.hidden = start
        counts = global_counts(s, counts, scores, *allocation)
    with tqdm(total=len(s.blocks), desc=f"width {result.score}", unit="block", disable=_disabled(progress)) as bar:
        sequential(run, inputs, counts, result.block_seconds, lambda _i: bar.update())
    return _finish_config(model, s, run.edits, run.give_biases())


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
