"""Expert removal for mixture-of-experts LLMs: whole routed experts scored on calibration data and
removed, the router's rows with them, the config's expert count updated — a smaller model of the same
architecture that stock `from_pretrained` loads.

Scores of routed expert e of one MoE layer, over the calibration tokens x_t that reach the layer (the
dense model's, block by block; higher = kept):

    reap       (1/|T_e|) Σ_{t ∈ T_e} g_te · ‖f_e(x_t)‖₂      REAP, Lasby et al. 2025 ("REAP the Experts:
               T_e the tokens routed to e, g_te their router   Why Pruning Prevails for One-Shot MoE
               weight, f_e the expert's output                 Compression")
    frequency  |T_e|, how often the router chooses e            frequency pruning, as in SEER-MoE
                                                                (Muzio et al. 2024)
    loss       Σ_t ‖y_t − y_t^(−e)‖², the change of the MoE    the layer-output reconstruction loss of
               layer's routed output when e alone is removed   expert pruning, Lu et al. 2024 ("Not All
               (its logit −inf, its tokens re-routed: llm.moe   Experts are Equal")
               .route)

allocation="uniform" removes round(ratio × E) experts of every MoE layer, the lowest scores first (ties:
the lower index first); DeepSeek-V3's group-limited routing (n_group > 1) needs equal groups, so each
group loses round(ratio × E / n_group). allocation="global" removes round(ratio × all routed experts)
lowest scores over all layers (each layer keeping at least top-k): the layers then differ in expert
count, which no standard config expresses (`ExpertResult.standard` False; not for grouped routing): the
config records each MoE layer's count as `pyprune_fast_experts`, and `llm.load_pretrained` rebuilds the
model from the saved directory (load.py).

Removing expert e keeps the remaining experts' weights and the router's rows for them; every remaining
logit is unchanged, so the model computes exactly what the original computes with e's router logit set
to −inf. Refused before the model is touched: an unknown router (by class and place), a model without
MoE layers, and a ratio that leaves a layer fewer experts than num_experts_per_tok."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...errors import UsageError
from ...modeling import eval_mode
from ..blocks import capture_inputs, find_blocks, module_device, on_device
from ..moe import MoE, count_key, find_moe, route
from ..text import calibration_windows
from .edit import Edits

SCORES = ("reap", "frequency", "loss")
ALLOCATIONS = ("uniform", "global")


@dataclass
class ExpertResult:
    """What `prune_experts` did: its options, per MoE layer (by qualified module name) the experts it had
    and the original indices of those kept, every expert's score, parameters before and after, whether the
    config is standard, and the time."""

    ratio: float
    score: str
    allocation: str
    experts_before: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    standard: bool = True
    seconds: float = 0.0

    @property
    def removed(self) -> dict[str, list[int]]:
        """The original indices of the removed experts of each MoE layer."""
        return {n: [e for e in range(c) if e not in set(self.kept[n])] for n, c in self.experts_before.items()}

    def summary(self) -> str:
        before, after = sum(self.experts_before.values()), sum(len(k) for k in self.kept.values())
        lines = [
            f"expert removal ({self.score}, {self.allocation}, ratio {self.ratio}): {before} -> {after} routed experts "
            f"in {len(self.kept)} MoE layers, model {self.params_before:,} -> {self.params_after:,} parameters, "
            f"{self.seconds:.1f} s",
            "experts left per layer " + " ".join(str(len(k)) for k in self.kept.values()),
            "standard config (stock from_pretrained loads it)"
            if self.standard
            else "not a standard config: the layers differ in expert count; load the saved directory with "
            "llm.load_pretrained (stock from_pretrained cannot build it)",
        ]
        return "\n".join(lines)


class _Sums:
    """One MoE layer's running sums over the calibration batches."""

    def __init__(self, experts: int) -> None:
        self.count = torch.zeros(experts, dtype=torch.float64)
        self.reap = torch.zeros(experts, dtype=torch.float64)
        self.loss = torch.zeros(experts, dtype=torch.float64)

    def score(self, kind: str) -> Tensor:
        if kind == "frequency":
            return self.count
        if kind == "reap":
            return self.reap / self.count.clamp_min(1)
        return self.loss


def _observe(m: MoE, hidden: Tensor, sums: _Sums, kind: str) -> None:
    """Adds one batch of the MoE layer's input tokens to its sums."""
    x = hidden.reshape(-1, hidden.shape[-1])
    _, weights, index = m.router(x)
    sums.count += torch.bincount(index.reshape(-1).cpu(), minlength=m.num_experts)[: m.num_experts].double()
    if kind == "reap":
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            alone = torch.full((len(token), 1), e, dtype=index.dtype, device=x.device)
            out = m.experts(x[token], alone, torch.ones(len(token), 1, dtype=weights.dtype, device=x.device))
            sums.reap[e] += float((weights[token, slot].double() * out.double().norm(dim=-1)).sum())
    elif kind == "loss":
        base = m.experts(x, index, weights).double()
        for e in range(m.num_experts):
            removed = torch.zeros(m.num_experts, dtype=torch.bool)
            removed[e] = True
            w, i = route(m, x, removed)
            sums.loss[e] += float((m.experts(x, i, w).double() - base).pow(2).sum())


def _groups(m: MoE) -> int:
    return int(getattr(m.router, "num_group", None) or 1)


def _lowest(scores: Tensor, count: int) -> list[int]:
    """The indices of the `count` lowest scores, ties by the lower index first."""
    return torch.sort(scores, stable=True).indices[:count].tolist()


def _uniform(layers: list[tuple[str, MoE]], scores: list[Tensor], ratio: float) -> list[list[int]]:
    removed = []
    for (_, m), s in zip(layers, scores):
        g = _groups(m)
        size = m.num_experts // g
        per = round(ratio * size) if g > 1 else round(ratio * m.num_experts)
        if g == 1:
            removed.append(_lowest(s, per))
        else:  # DeepSeek-V3's groups stay equal
            removed.append([k * size + e for k in range(g) for e in _lowest(s[k * size : (k + 1) * size], per)])
    return removed


def _global(layers: list[tuple[str, MoE]], scores: list[Tensor], ratio: float) -> list[list[int]]:
    grouped = [name for name, m in layers if _groups(m) > 1]
    if grouped:
        raise UsageError(f"`allocation`='global' changes the expert count of single layers; the group-limited "
                         f"routing of {grouped[0]} needs equal groups: use allocation='uniform'")  # fmt: skip
    flat = torch.cat(scores)
    owner = [j for j, s in enumerate(scores) for _ in range(len(s))]
    start = [sum(len(s) for s in scores[:j]) for j in range(len(scores))]
    total = round(ratio * len(flat))
    left = [m.num_experts for _, m in layers]
    removed: list[list[int]] = [[] for _ in layers]
    for k in torch.sort(flat, stable=True).indices.tolist():
        if total == 0:
            break
        j = owner[k]
        if left[j] > layers[j][1].top_k:
            removed[j].append(k - start[j])
            left[j] -= 1
            total -= 1
    return removed


def _check_left(layers: list[tuple[str, MoE]], removed: list[list[int]]) -> None:
    """UsageError when a layer would keep fewer experts than its top-k (or than its routing groups need)."""
    for (name, m), gone in zip(layers, removed):
        left, g = m.num_experts - len(gone), _groups(m)
        if left < m.top_k:
            raise UsageError(f"num_experts_per_tok={m.top_k} is larger than the {left} experts `ratio` leaves in "
                             f"{name}: use a smaller ratio")  # fmt: skip
        if g > 1 and (left // g < 2 or int(m.router.topk_group) * (left // g) < m.top_k):
            raise UsageError(f"`ratio` leaves {left // g} experts in each of the {g} routing groups of {name}: "
                             f"too few for its group-limited top-{m.top_k} routing; use a smaller ratio")  # fmt: skip


def _remove(m: MoE, keep: Tensor, edits: Edits) -> None:
    """Keeps only the experts `keep` (ascending original indices) of one MoE layer."""
    resize_experts(m, len(keep), lambda t: t.detach()[keep.to(t.device)].clone(), edits)


def resize_experts(m: MoE, count: int, make: Callable[[Tensor], Tensor], edits: Edits) -> None:
    """Gives one MoE layer `count` experts: every router and experts tensor whose first dimension is the
    expert count replaced by `make(tensor)` (the kept rows; llm.load_pretrained: empty ones to load into),
    and their num_experts attributes set."""
    before = m.num_experts
    for owner in (m.router, m.experts):
        for name, p in list(owner.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == before:
                edits.set(owner, name, nn.Parameter(make(p), p.requires_grad))
        for name, b in list(owner.named_buffers(recurse=False)):
            if b.dim() >= 1 and b.shape[0] == before:
                edits.set(owner, name, make(b))
        if hasattr(owner, "num_experts"):
            edits.set(owner, "num_experts", count)


def moe_layers(model: nn.Module) -> list[tuple[int, str, MoE]]:
    """(block index, qualified module name, MoE) of every mixture-of-experts layer of a model; UsageError
    for a model without any, or a router whose routing rule is not known (llm.moe.known)."""
    prefix, blocks = find_blocks(model)
    layers = [(i, f"{prefix}.{i}.{m.path}", m) for i, block in enumerate(blocks) for m in find_moe(block)]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no mixture-of-experts layers (no fused experts with a router)")
    for _, _, m in layers:
        count_key(getattr(model, "config", None), m)
    return layers


def _check(ratio: object, score: object, allocation: object, sizes: dict[str, object]) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise UsageError(f"`ratio` must be a number in [0, 1), got {ratio!r}")
    if score not in SCORES:
        raise UsageError(f"`score` must be one of {SCORES}, got {score!r}")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"`{name}` must be a positive int, got {value!r}")


@torch.no_grad()
def prune_experts(
    model: nn.Module,
    calibration: Tensor,
    *,
    ratio: float = 0.5,
    score: str = "reap",
    allocation: str = "uniform",
    num_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> ExpertResult:
    """Removes `ratio` of the routed experts of every mixture-of-experts layer of a Hugging Face causal
    LM, in place (module docstring).

    Args:
        model: a causal LM whose MoE layers have a known router (llm.moe.ROUTERS: Mixtral, Qwen2-MoE,
            Qwen3-MoE, DeepSeek-V3, OLMoE, gpt-oss).
        calibration: token ids (1-D stream or [sequences, tokens]), cut by `calibration_windows`.
        ratio: the fraction of each layer's routed experts removed (uniform), or of all of them (global),
            in [0, 1). Shared experts stay.
        score: "reap", "frequency" or "loss".
        allocation: "uniform" (the same count removed from every layer: a standard config) or "global".
        num_samples, seq_len, batch_size: calibration sequences, their length, sequences per forward.
        device: where each block runs (default: CUDA when available, else where the blocks are).
        progress: a progress bar (None: when the output is a terminal).

    Returns:
        ExpertResult. UsageError naming the argument, with the model untouched, for a bad option, a
        model without MoE layers, an unknown router, or a ratio leaving fewer experts than the top-k."""
    _check(ratio, score, allocation, {"num_samples": num_samples, "seq_len": seq_len, "batch_size": batch_size})
    layers = moe_layers(model)
    _, blocks = find_blocks(model)
    config = getattr(model, "config", None)
    keys = {count_key(config, m) for _, _, m in layers}
    windows = calibration_windows(calibration, num_samples, seq_len)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else
                          module_device(blocks[0]))  # fmt: skip
    start = time.perf_counter()
    result = ExpertResult(float(ratio), score, allocation, params_before=sum(p.numel() for p in model.parameters()))
    sums = {name: _Sums(m.num_experts) for _, name, m in layers}
    with eval_mode(model):
        inputs = capture_inputs(model, blocks[0], windows.split(batch_size), device)
        disable = None if progress is None else not progress
        for i, block in enumerate(tqdm(blocks, desc=f"expert scores ({score})", unit="block", disable=disable)):
            handles = [
                m.module.register_forward_pre_hook(lambda _mod, args, m=m, s=sums[name]: _observe(m, args[0], s, score))
                for j, name, m in layers
                if j == i
            ]
            try:
                with on_device(block, device):
                    inputs.advance(block)
            finally:
                for h in handles:
                    h.remove()
    named = [(name, m) for _, name, m in layers]
    scores = [sums[name].score(score) for name, _ in named]
    removed = (_uniform if allocation == "uniform" else _global)(named, scores, float(ratio))
    _check_left(named, removed)
    edits = Edits()
    try:
        for (name, m), gone, s in zip(named, removed, scores):
            keep = [e for e in range(m.num_experts) if e not in set(gone)]
            result.experts_before[name], result.kept[name], result.scores[name] = m.num_experts, keep, s.tolist()
            _remove(m, torch.tensor(keep, dtype=torch.long), edits)
        counts = sorted({len(k) for k in result.kept.values()})
        result.standard = len(counts) == 1
        for key in keys:
            edits.set(config, key, counts[-1])
        if not result.standard:
            edits.set(config, "pyprune_fast_experts", [len(k) for k in result.kept.values()])
    except BaseException:
        edits.undo()
        raise
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["ALLOCATIONS", "SCORES", "ExpertResult", "moe_layers", "prune_experts", "resize_experts"]
