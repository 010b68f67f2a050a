"""Width pruning inside mixture-of-experts blocks: intermediate channels removed from every routed expert,
every shared expert and the MLP of every dense block (Qwen2/3-MoE's mlp_only_layers, DeepSeek-V3's first
blocks), each scored and refitted on the tokens it really sees, and query heads removed from the attention
as the dense path removes them (width.py) — a smaller model of the same architecture.

    for each block i (its inputs: the pruned model's, captured at block 0 and rerun block by block):
        run it on the calibration batches with every routed expert running its routed tokens through its
            Linear views (llm.moe.Routing): each expert's down_proj sees w_t·h_t over the tokens t routed
            to it (w_t the router weight: exactly what the layer output receives); a shared expert's and
            a dense MLP's down_proj see every token; o_proj sees every token
        score each MLP's channels on its own statistics, and the query heads on o_proj's (scores.py:
            magnitude, l1, l2, wanda, flap)
        drop the heads as width.WidthRun.prune_heads does for a dense model (the same code): the lowest
            query heads of every key/value group, o_proj refitted (or FLAP-compensated), q rows sliced,
            gpt-oss's per-head attention sinks sliced
        drop each MLP's lowest channels (ties: the lower index first): each expert its own channels, every
            routed expert of a block the same count, so that the fused 3-D tensors keep one width
        refit its down_proj by least squares on those statistics (refit.py, reconstruct=True; a routed
            expert's down_proj bias, gpt-oss, stays: it is scaled by w_t, a least-squares intercept is not),
            or slice it (reconstruct=False)
        rerun the pruned block: the next block's inputs

Heads (`units`, as width.py: "both" by default, "mlp", "heads"): Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss
(ATTENTION: Llama-like q/k/v/o). DeepSeek-V3's multi-head latent attention (every head projected from one
shared low-rank latent) and OLMoE's attention (q_norm/k_norm are RMSNorms over all heads together) keep
their heads (NO_HEADS): units=None removes MLP channels only there (StructuredResult.units "mlp", the
summary says the heads were kept); units="both"/"heads" is refused by name, so that nobody asks for heads
and silently gets none.

How `ratio` (the fraction of each decoder block's parameters removed, as in width.py) is met: the heads
lose round(ratio × g) query heads per key/value group (width.head_count: the dense rule), the MLPs carry
the rest of the budget, each losing the same fraction f = (ratio · P_block − heads' parameters) /
P_channels of its channels (P_channels: the parameters of the block's gate/up rows and down columns), f
taken from the first MoE block for every MoE block and from the first dense block for the dense ones;
the kept widths rounded to `multiple` — the routed experts' to a multiple of 16 bytes as well (4
channels in float32, 8 in bfloat16): transformers' grouped_mm experts refuse other strides.
DeepSeek-V3's shared experts are n_shared_experts × moe_intermediate_size wide by construction: they
keep n_shared_experts × the routed experts' kept width.

allocation="uniform": those counts in every block (a standard config). allocation="global" (width.py's
rule on MoE units): a first pass scores every block of the dense model; the uniform totals are then
placed by one threshold each over the blocks' normalized scores (normalize=None: standardized; "lp"),
each block keeping at least `floor` of its units — head slices (one query head from every group: the
mean over the groups of each group's k-th lowest, width.head_slices) over all blocks; routed channel
slices (one channel from every routed expert of a block: the block's routed scores normalized together,
the mean over the experts of each expert's k-th lowest) over the MoE blocks, so that all routed experts
of a block keep one width; dense-block channels over the dense blocks. A shared expert loses its block's
routed fraction (DeepSeek-V3: n_shared_experts × the routed width). The sequential pass then removes
that many from each block, scored on the pruned inputs.

Experts with fewer than `min_expert_tokens` routed calibration tokens (reported as
`StructuredResult.rare_experts`): rare_experts="magnitude" scores them by magnitude and slices their
down_proj without a refit; "route" forces the tokens their router scores highest through them first
(llm.moe.Routing.force), then scores and refits them as the others (one still without a token: as
"magnitude"). Leaving an expert dense ("dense") would break the equal widths: refused.

Memory: the statistics pass keeps, for the refit, XᵀX of every routed expert's down_proj input of the
block at once, E · I² · 4 bytes (Mixtral-8x7B: 8 × 14336² floats, 6.6 GB; Qwen3-30B-A3B: 128 × 768²,
0.3 GB), on the device the block runs on; reconstruct=False and the global allocation's scoring pass
keep Σx and Σx² only.

The config is updated under the architecture's names (WIDTH_KEYS): Mixtral, OLMoE and gpt-oss
`intermediate_size`; Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 `moe_intermediate_size` for the routed experts
and `intermediate_size` for the dense blocks; Qwen2-MoE `shared_expert_intermediate_size`; heads removed:
`num_attention_heads` and `head_dim`. Equal blocks give a standard config that stock `from_pretrained`
loads. Blocks that differ (global allocation) get the largest of each, and `pyprune_fast_widths` (per
block: the routed experts' width — a dense block's MLP width —, the shared experts' width, the query
heads), from which `llm.load_pretrained` rebuilds the model (reshape_). Refused, with the model
untouched: heads where NO_HEADS, gradient scores (fused experts are not Linears), `forward=`, a ratio
that leaves an MLP no channel or a group no head, an unknown router or architecture."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...criteria.input_stats import InputStats, StatsCollector
from ...errors import UsageError
from ..blocks import BlockInputs, find_blocks, on_device
from ..moe import RARE_EXPERTS, MoE, Routing, find_moe, known, with_experts
from .edit import Edits, new_linear, rows
from .layout import Layout, Structure, geometry, set_head_attrs
from .refit import least_squares
from .scores import SCORES, Observed, check_finite
from .width import UNITS, WidthOptions, WidthRun, head_cost, head_count, head_slices, lowest, normalizer, pick, rounded

# model_type: (routed experts' width, shared experts' width, dense blocks' MLP width) config fields
WIDTH_KEYS: dict[str, tuple[str, str | None, str | None]] = {
    "mixtral": ("intermediate_size", None, None),
    "qwen2_moe": ("moe_intermediate_size", "shared_expert_intermediate_size", "intermediate_size"),
    "qwen3_moe": ("moe_intermediate_size", None, "intermediate_size"),
    "deepseek_v3": ("moe_intermediate_size", None, "intermediate_size"),
    "olmoe": ("intermediate_size", None, None),
    "gpt_oss": ("intermediate_size", None, None),
}
SHARED_FACTOR = {"deepseek_v3": "n_shared_experts"}  # shared width = this × the routed experts' width
RARE_WIDTH = tuple(p for p in RARE_EXPERTS if p != "dense")
_SHARED_NAMES = ("shared_expert", "shared_experts")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_MLP = Layout(
    producers=("gate_proj", "up_proj"),
    consumer="down_proj",
    attention="",
    q="",
    k="",
    v="",
    o="",
    intermediate_key=None,
)
_SELF_ATTN = dict(
    producers=(),
    consumer="",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    intermediate_key=None,
    standard_heads=True,
)
# The attentions whose query heads are removed as width.py removes a Llama's (checked against transformers
# 5.25): Llama-like q/k/v/o Linears, head_dim read from the config. Qwen2-MoE's q/k/v have biases
# (qkv_bias), its o_proj none and no flag to give it one; Qwen3-MoE's q_norm/k_norm act on one head_dim;
# gpt-oss's per-head attention sinks are sliced with the heads.
ATTENTION: dict[str, Layout] = {
    "mixtral": Layout(**_SELF_ATTN),
    "qwen2_moe": Layout(**_SELF_ATTN),
    "qwen3_moe": Layout(**_SELF_ATTN, attention_bias="attention_bias"),
    "gpt_oss": Layout(**_SELF_ATTN, attention_bias="attention_bias"),
}
# Why the others keep their heads (units=None: MLP channels only; units="both"/"heads": refused)
NO_HEADS = {
    "deepseek_v3": "its multi-head latent attention (MLA) projects every head from one shared low-rank latent "
    "(kv_a_proj_with_mqa, kv_b_proj), which this pruner does not slice",
    "olmoe": "its q_norm and k_norm are RMSNorms over all heads together (hidden_size wide), so removing a head "
    "would change the normalization of the others",
}


def has_moe(model: nn.Module) -> bool:
    """Whether a model's decoder blocks hold fused mixture-of-experts layers."""
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return False
    return any(find_moe(block) for block in blocks)


class _Views(nn.Module):
    """A routed expert's gate_proj, up_proj and down_proj Linear views as one MLP-shaped module."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down


@dataclass
class _Unit:
    """One MLP whose channels are removed, at `path` in its block: a routed expert (`moe`, `expert`; `mlp`
    its Linear views) or a shared expert / dense MLP (`mlp` the module itself)."""

    path: str
    mlp: nn.Module
    moe: MoE | None = None
    expert: int = -1


@dataclass(frozen=True)
class Counts:
    """What one decoder block loses: `heads` query heads from each key/value group, `routed` channels from
    each of its routed experts, `shared` from each shared expert, `dense` from a dense block's MLP."""

    heads: int = 0
    routed: int = 0
    shared: int = 0
    dense: int = 0

    def __bool__(self) -> bool:
        return bool(self.heads or self.routed or self.shared or self.dense)


@dataclass
class MoEWidth:
    """The plan of one MoE width run, checked before anything is touched: the architecture, the units
    removed ("both", "mlp" or "heads"), the attention's Structure where heads can be removed (None
    elsewhere), each block's uniform Counts, the widths before (routed, shared, dense) and the routed
    experts' width multiple (`multiple` and 16 bytes)."""

    arch: str
    prefix: str
    blocks: nn.ModuleList
    config: Any
    units: str = "mlp"
    attention: Structure | None = None
    counts: list[Counts] = field(default_factory=list)
    widths: tuple[int, int, int] = (0, 0, 0)  # routed, shared, dense widths before
    align: int = 1


def _shared(m: MoE) -> list[tuple[str, nn.Module]]:
    names = [n for n in _SHARED_NAMES if isinstance(getattr(m.module, n, None), nn.Module)]
    return [(f"{m.path}.{n}", getattr(m.module, n)) for n in names]


def _dense_mlp(block: nn.Module) -> nn.Module | None:
    mlp = getattr(block, "mlp", None)
    ok = mlp is not None and all(isinstance(getattr(mlp, p, None), nn.Linear) for p in _PROJECTIONS)
    return mlp if ok else None


def _routed_width(m: MoE) -> int:
    return m.views(0)[2].shape[1]


def _channel_params(block: nn.Module) -> int:
    """Parameters of a block's gate/up rows and down columns (with the gate/up biases): what channels carry."""
    total = 0
    for m in find_moe(block):
        ex = m.experts
        total += ex.gate_up_proj.numel() + ex.down_proj.numel()
        total += ex.gate_up_proj_bias.numel() if getattr(ex, "has_bias", False) else 0
        for _, mlp in _shared(m):
            total += sum(p.numel() for n, p in mlp.named_parameters() if not n.startswith("down_proj.bias"))
    mlp = None if find_moe(block) else _dense_mlp(block)
    if mlp is not None:
        total += sum(p.numel() for n, p in mlp.named_parameters() if not n.startswith("down_proj.bias"))
    return total


def _removed(width: int, fraction: float, multiple: int, what: str, ratio: float) -> int:
    channels = rounded(width, round(fraction * width), multiple)
    if fraction >= 1 or channels >= width:
        raise UsageError(f"`ratio`={ratio} leaves no channel in the {what} ({width} channels)")
    return channels


def _units_of(arch: str, units: str | None) -> str:
    """The units removed: `units`, or None for "both" ("mlp" where the attention keeps its heads: NO_HEADS)."""
    if units is not None and units not in UNITS:
        raise UsageError(f"`units` must be one of {UNITS} or None, got {units!r}")
    if arch in ATTENTION:
        return units or "both"
    if units in ("both", "heads"):
        raise UsageError(f"`units`={units!r}: architecture {arch} keeps its attention heads: {NO_HEADS[arch]}; "
                         "use units='mlp' (or None: MLP channels only)")  # fmt: skip
    return "mlp"


def _attention(arch: str, config: Any, prefix: str, blocks: nn.ModuleList) -> Structure:
    """The attention's Structure (layout.Structure with the ATTENTION layout); UsageError naming `model`
    when a block lacks the Linears or the query heads do not split into the key/value groups."""
    layout = ATTENTION[arch]
    hidden, heads, kv, head_dim = geometry(arch, config, blocks)
    if heads % kv:
        raise UsageError(f"`model`: architecture {arch}: {heads} query heads do not split into {kv} key/value groups")
    for i, block in enumerate(blocks):
        for name in (layout.q, layout.k, layout.v, layout.o):
            try:
                linear = block.get_submodule(name)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise UsageError(f"`model`: architecture {arch}: block {i} has no nn.Linear {name!r}")
            if name == layout.q and linear.out_features % (head_dim * kv):
                raise UsageError(f"`model`: architecture {arch}: the query heads of block {i} do not split into "
                                 f"{kv} key/value groups of {head_dim}-wide heads")  # fmt: skip
    return Structure(arch, prefix, blocks, layout, hidden, heads, kv, head_dim, config)


def plan(model: nn.Module, blocks: nn.ModuleList, options: dict[str, Any]) -> MoEWidth:
    """The MoE width plan (module docstring) for prune_structured's `options`; UsageError naming the
    option or the architecture, before anything is touched."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in WIDTH_KEYS:
        raise UsageError(f"`model`: mixture-of-experts architecture {arch or type(model).__name__} is not known to "
                         f"the structured pruner (known: {', '.join(WIDTH_KEYS)})")  # fmt: skip
    units = _units_of(arch, options["units"])
    score = SCORES[options["score"]]
    if score.gradients:
        raise UsageError(f"`score`={options['score']!r} takes block-local gradients of Linear weights; the fused "
                         "experts are not Linears: use magnitude, l1, l2, wanda or flap")  # fmt: skip
    if options["forward"] is not None:
        raise UsageError("`forward`: mixture-of-experts width pruning takes a causal LM's token ids")
    if options["rare_experts"] not in RARE_WIDTH:
        raise UsageError(f"`rare_experts` must be one of {RARE_WIDTH} for width pruning (an expert left dense would "
                         f"differ in width from the others), got {options['rare_experts']!r}")  # fmt: skip
    minimum = options["min_expert_tokens"]
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise UsageError(f"`min_expert_tokens` must be an int >= 0, got {minimum!r}")
    ratio, multiple = float(options["ratio"]), options["multiple"]
    prefix = find_blocks(model)[0]
    run = MoEWidth(arch, prefix, blocks, config, units)
    if units != "mlp":
        run.attention = _attention(arch, config, prefix, blocks)
    moe_blocks = [i for i, b in enumerate(blocks) if find_moe(b)]
    dense_blocks = [i for i, b in enumerate(blocks) if not find_moe(b)]
    for i in moe_blocks:
        for m in find_moe(blocks[i]):
            known(m)
    for i in dense_blocks:
        if _dense_mlp(blocks[i]) is None:
            raise UsageError(f"`model`: block {i} has neither experts nor an MLP with gate_proj, up_proj, down_proj")
    s = run.attention
    heads = [head_count(s, i, ratio, units, _params(b)) if s else 0 for i, b in enumerate(blocks)]

    def fraction(i: int) -> float:  # of block i's channels: the budget the heads leave
        budget = 0.0 if units == "heads" else ratio * _params(blocks[i]) - (heads[i] * head_cost(s, i) if s else 0)
        return max(0.0, budget) / _channel_params(blocks[i])

    routed = shared = dense = 0
    if moe_blocks:
        first = moe_blocks[0]
        f = fraction(first)
        m = find_moe(blocks[first])[0]
        width = _routed_width(m)
        run.align = math.lcm(multiple, max(1, 16 // m.experts.down_proj.element_size()))
        routed = _removed(width, f, run.align, f"routed experts of block {first}", ratio)
        sh = _shared(m)
        shared_width = sh[0][1].down_proj.in_features if sh else 0
        if sh and arch in SHARED_FACTOR:
            shared = shared_width - int(getattr(config, SHARED_FACTOR[arch])) * (width - routed)
        elif sh:
            shared = _removed(shared_width, f, multiple, f"shared expert of block {first}", ratio)
        run.widths = (width, shared_width, 0)
    if dense_blocks:
        first = dense_blocks[0]
        width = _dense_mlp(blocks[first]).down_proj.in_features
        dense = _removed(width, fraction(first), multiple, f"MLP of block {first}", ratio)
        run.widths = (run.widths[0], run.widths[1], width)
    for i, block in enumerate(blocks):
        mlp = Counts(routed=routed, shared=shared) if find_moe(block) else Counts(dense=dense)
        run.counts.append(Counts(heads[i], mlp.routed, mlp.shared, mlp.dense))
    return run


def _params(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def _units(block: nn.Module, views: dict[str, nn.Linear]) -> list[tuple[str, _Unit]]:
    """(kind, unit) of every MLP of a block: "routed" experts (their Linear views), "shared", "dense"."""
    out = []
    for m in find_moe(block):
        for e in range(m.num_experts):
            mlp = _Views(*(views[f"{m.expert(e)}.{p}"] for p in _PROJECTIONS))
            out.append(("routed", _Unit(m.expert(e), mlp, m, e)))
        out += [("shared", _Unit(path, module)) for path, module in _shared(m)]
    if not out:
        out.append(("dense", _Unit("mlp", _dense_mlp(block))))
    return out


def _score(name: str, unit: _Unit, stats: InputStats | None) -> Tensor:
    """The unit's channel scores by `name` (scores.py) on its own statistics (magnitude without any)."""
    structure = Structure("mlp", "", nn.ModuleList([unit.mlp]), _MLP, unit.mlp.down_proj.out_features, 1, 1, 1)
    score = SCORES[name] if stats is not None else SCORES["magnitude"]
    return score.units(structure, 0, "mlp", Observed({"mlp": stats} if stats is not None else {}))


def _experts_tensors(m: MoE, kept: list[Tensor], downs: list[Tensor]) -> dict[str, Tensor]:
    """The fused tensors of an MoE layer whose expert e keeps channels kept[e] with down weight downs[e]
    [H, I'] (out x in): gate_up and down in the experts' own layout (llm.moe), gate_up biases sliced."""
    ex = m.experts
    concatenated, transposed = getattr(ex, "is_concatenated", True), getattr(ex, "is_transposed", False)

    def pair(gate: Tensor, up: Tensor) -> Tensor:
        return torch.cat([gate, up]) if concatenated else torch.stack([gate, up], 1).flatten(0, 1)

    gate_up, down, bias = [], [], []
    for e, keep in enumerate(kept):
        g, u, _ = m.views(e)
        k = keep.to(g.device)
        w = pair(g[k], u[k])
        gate_up.append(w.T if transposed else w)
        down.append(downs[e].T if transposed else downs[e])
        b = m.biases(e)
        if b is not None:
            bias.append(pair(b[0].detach()[k], b[1].detach()[k]))
    out = {"gate_up_proj": torch.stack(gate_up), "down_proj": torch.stack(down)}
    if bias:
        out["gate_up_proj_bias"] = torch.stack(bias)
    return out


@dataclass
class _Seen:
    """One block's statistics pass: its MLP units, the consumers' input statistics ("attention": o_proj's),
    its rare experts, every unit's channel scores (by path) and the head scores (None: heads stay)."""

    units: list[tuple[str, _Unit]]
    stats: dict[str, InputStats]
    rare: dict[str, int]
    channels: dict[str, Tensor]
    heads: Tensor | None


class MoEWidthRun:
    """One MoE width-pruning run (module docstring); every change goes through `edits`, heads through the
    dense path's WidthRun on the attention Structure."""

    def __init__(self, run: MoEWidth, options: dict[str, Any], edits: Edits, device: torch.device) -> None:
        self.run, self.o, self.edits = run, options, edits
        self.rare: dict[str, int] = {}
        self.heads = None
        if run.attention is not None:
            width = WidthOptions(options["score"], options["reconstruct"], options["bias"], options["percdamp"])
            self.heads = WidthRun(run.attention, width, edits, device)

    def observe(self, i: int, inputs: BlockInputs, heads: bool, refit: bool = True) -> _Seen:
        """Block i's statistics pass over every batch (each routed expert on its routed tokens; o_proj's
        input when `heads`), and the scores of its channels and heads; XᵀX only when `refit` and the
        run reconstructs (the global allocation's scoring pass needs Σx and Σx² alone)."""
        block = self.run.blocks[i]
        views = with_experts(block, {})
        units = _units(block, views)
        consumers = {u.path: u.mlp.down_proj for _, u in units}
        if heads:
            consumers["attention"] = self.run.attention.linear(i, self.run.attention.layout.o)
        observes = {"sums", "xtx"} if self.o["reconstruct"] and refit else {"sums"}
        routing = Routing(block, views, self.o["rare_experts"], self.o["min_expert_tokens"])
        with StatsCollector(block, consumers, observes) as stats, routing:
            for j in range(len(inputs)):
                inputs.run(block, j)
            routing.force()
        stats, rare = dict(stats), routing.rare
        channels = {}
        for _, unit in units:
            magnitude = unit.moe is not None and self.o["rare_experts"] == "magnitude" and unit.path in rare
            channels[unit.path] = _score(self.o["score"], unit, None if magnitude else stats.get(unit.path))
            check_finite(channels[unit.path], f"block {i} {unit.path} channels")
        head_scores = None
        if heads:
            if "attention" not in stats:
                raise ValueError(f"block {i}: its o_proj was not called in the forward")
            observed = Observed({"attention": stats["attention"]})
            head_scores = SCORES[self.o["score"]].units(self.run.attention, i, "attention", observed)
            check_finite(head_scores, f"block {i} attention heads")
        return _Seen(units, stats, rare, channels, head_scores)

    def prune_block(self, i: int, inputs: BlockInputs, counts: Counts) -> None:
        """Block i loses `counts`: its heads (WidthRun.prune_heads), each MLP unit its lowest channels,
        scored and refitted on the block's statistics on the pruned model's inputs."""
        block, prefix = self.run.blocks[i], self.run.prefix
        seen = self.observe(i, inputs, counts.heads > 0)
        self.rare.update({f"{prefix}.{i}.{n}": c for n, c in seen.rare.items()})
        if counts.heads:
            self.heads.prune_heads(i, counts.heads, seen.heads, seen.stats["attention"])
        removed = {"routed": counts.routed, "shared": counts.shared, "dense": counts.dense}
        routed: dict[int, tuple[MoE, list[Tensor], list[Tensor]]] = {}
        for kind, unit in seen.units:
            if not removed[kind]:
                continue
            magnitude = unit.moe is not None and self.o["rare_experts"] == "magnitude" and unit.path in seen.rare
            s = None if magnitude else seen.stats.get(unit.path)
            keep = lowest(seen.channels[unit.path], removed[kind])
            down = unit.mlp.down_proj
            what = f"{prefix}.{i}.{unit.path}.down_proj"
            if self.o["reconstruct"] and s is not None:
                weight, bias = least_squares(down.weight, down.bias, keep, s, intercept=False,
                                             percdamp=self.o["percdamp"], what=what)  # fmt: skip
            else:
                weight, bias = down.weight.detach()[:, keep.to(down.weight.device)], down.bias
            if unit.moe is not None:
                _, kept, downs = routed.setdefault(id(unit.moe), (unit.moe, [], []))
                kept.append(keep)
                downs.append(weight)
                continue
            module = block.get_submodule(unit.path)
            for p in ("gate_proj", "up_proj"):
                self.edits.replace(module, p, rows(getattr(module, p), keep))
            self.edits.replace(module, "down_proj", new_linear(down, weight, bias))
            if isinstance(getattr(module, "intermediate_size", None), int):
                self.edits.set(module, "intermediate_size", len(keep))
        for m, kept, downs in routed.values():
            for name, value in _experts_tensors(m, kept, downs).items():
                old = getattr(m.experts, name)
                self.edits.set(m.experts, name, nn.Parameter(value.to(old.dtype), old.requires_grad))
            for attr in ("intermediate_dim", "intermediate_size"):
                if isinstance(getattr(m.experts, attr, None), int):
                    self.edits.set(m.experts, attr, len(kept[0]))

    def global_counts(self, seen: list[_Seen], floor: float, normalize: str | None, p: float) -> list[Counts]:
        """The global allocation (module docstring) from every block's scores on the dense model: the
        uniform totals of head slices (over all blocks), routed channel slices (over the MoE blocks) and
        dense-block channels placed by one threshold each over the normalized scores, each block keeping
        at least `floor` of its units (and one); shared experts follow their block's routed fraction."""
        run, normalized = self.run, normalizer(normalize, p)
        blocks = range(len(run.blocks))
        counts = [Counts() for _ in blocks]
        if run.attention is not None and any(c.heads for c in run.counts):
            slices = [head_slices(run.attention, b.heads, normalized) for b in seen]
            taken = pick(slices, sum(c.heads for c in run.counts), _floors(slices, floor))
            counts = [Counts(heads=t) for t in taken]
        moe_blocks = [i for i in blocks if find_moe(run.blocks[i])]
        if any(run.counts[i].routed for i in moe_blocks):
            slices = [_routed_slices(seen[i], normalized) for i in moe_blocks]
            taken = pick(slices, sum(run.counts[i].routed for i in moe_blocks), _floors(slices, floor))
            routed_width, shared_width, _ = run.widths
            for i, t in zip(moe_blocks, taken):
                routed = rounded(routed_width, t, run.align)
                shared = 0
                if shared_width and run.arch in SHARED_FACTOR:
                    shared = shared_width - int(getattr(run.config, SHARED_FACTOR[run.arch])) * (routed_width - routed)
                elif shared_width and any(run.counts[j].shared for j in moe_blocks):
                    share = min(shared_width - 1, round(shared_width * routed / routed_width))
                    shared = rounded(shared_width, share, self.o["multiple"])
                counts[i] = Counts(counts[i].heads, routed, shared)
        dense_blocks = [i for i in blocks if not find_moe(run.blocks[i])]
        if any(run.counts[i].dense for i in dense_blocks):
            z = [normalized(seen[i].channels["mlp"]).sort().values for i in dense_blocks]
            taken = pick(z, sum(run.counts[i].dense for i in dense_blocks), _floors(z, floor))
            for i, t in zip(dense_blocks, taken):
                counts[i] = Counts(counts[i].heads, dense=rounded(run.widths[2], t, self.o["multiple"]))
        return counts

    def finish_config(self) -> bool:
        """The config after the run: the widths (WIDTH_KEYS: the largest of each kind) and heads
        (num_attention_heads, head_dim) written, the bias flags a refit needed set; where the blocks
        differ, `pyprune_fast_widths` (per block: the routed experts' or the dense MLP's width, the shared
        experts' width, the query heads) for llm.load_pretrained. Returns whether the config is standard."""
        run, config = self.run, self.run.config
        routed_key, shared_key, dense_key = WIDTH_KEYS[run.arch]
        intermediate, shared_all, heads = block_widths(run.blocks, config)
        moe_blocks = [i for i, b in enumerate(run.blocks) if find_moe(b)]
        routed = [intermediate[i] for i in moe_blocks]
        shared = [shared_all[i] for i in moe_blocks if shared_all[i]]
        dense = [w for i, w in enumerate(intermediate) if i not in moe_blocks]
        for key, values in ((routed_key, routed), (shared_key, shared), (dense_key, dense)):
            if key is not None and values:
                self.edits.set(config, key, max(values))
        if run.attention is not None and any(h != run.attention.heads for h in heads):
            self.edits.set(config, "head_dim", run.attention.head_dim)
            self.edits.set(config, "num_attention_heads", max(heads))
        for flag in self.heads.give_biases() if self.heads is not None else []:
            self.edits.set(config, flag, True)
        standard = all(len(set(values)) <= 1 for values in (routed, shared, dense, heads))
        if not standard:
            widths = {"intermediate_size": intermediate, "shared_intermediate_size": shared_all,
                      "num_attention_heads": heads}  # fmt: skip
            self.edits.set(config, "pyprune_fast_widths", widths)
        elif getattr(config, "pyprune_fast_widths", None) is not None:
            self.edits.set(config, "pyprune_fast_widths", None)
        return standard


def _floors(slices: list[Tensor], floor: float) -> list[int]:
    return [max(1, math.ceil(floor * len(z))) for z in slices]


def _routed_slices(seen: _Seen, normalized: Callable[[Tensor], Tensor]) -> Tensor:
    """Normalized score of each routed channel slice k of a block (one channel from every routed expert,
    ascending): the block's routed channel scores normalized together, and the mean over the experts of
    each expert's k-th lowest (as width.head_slices does over key/value groups)."""
    scores = torch.stack([seen.channels[u.path].cpu() for kind, u in seen.units if kind == "routed"])
    return normalized(scores.flatten()).reshape(scores.shape).sort(dim=1).values.mean(0)


def block_widths(blocks: nn.ModuleList, config: Any) -> tuple[list[int], list[int], list[int]]:
    """Each decoder block's MLP width — its routed experts' (MoE blocks) or its MLP's (dense blocks) —,
    its shared experts' width (0: none) and its query heads (the config's where the attention is not
    one of ATTENTION)."""
    intermediate, shared, heads = [], [], []
    layout = ATTENTION.get(getattr(config, "model_type", None))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    for block in blocks:
        layers = find_moe(block)
        intermediate.append(_routed_width(layers[0]) if layers else _dense_mlp(block).down_proj.in_features)
        sh = _shared(layers[0]) if layers else []
        shared.append(sh[0][1].down_proj.in_features if sh else 0)
        q = block.get_submodule(layout.q).out_features // head_dim if layout else int(config.num_attention_heads)
        heads.append(q)
    return intermediate, shared, heads


def widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """Each decoder block's MLP width (its routed experts' or its dense MLP's) and its query heads."""
    _, blocks = find_blocks(model)
    intermediate, _, heads = block_widths(blocks, model.config)
    return intermediate, heads


def sequential(
    run: MoEWidthRun,
    inputs: BlockInputs,
    device: torch.device,
    counts: list[Counts],
    seconds: list[float],
    progress: Callable[[int], None],
) -> bool:
    """The block-sequential MoE width pruning (module docstring), then the config; returns whether it is
    standard."""
    blocks = run.run.blocks
    for i in range(len(blocks)):
        t0 = time.perf_counter()
        with on_device(blocks[i], device):
            run.prune_block(i, inputs, counts[i])
            if i + 1 < len(blocks):
                inputs.advance(blocks[i])
        seconds.append(time.perf_counter() - t0)
        progress(i)
    return run.finish_config()


def dense_scores(
    run: MoEWidthRun, inputs: BlockInputs, device: torch.device, progress: Callable[[int], None]
) -> list[_Seen]:
    """Every block's scores on the dense model (global allocation's first pass; the statistics dropped);
    the inputs end as the dense model's last block outputs."""
    blocks, out = run.run.blocks, []
    for i in range(len(blocks)):
        with on_device(blocks[i], device):
            seen = run.observe(i, inputs, run.run.attention is not None, refit=False)
            channels = {n: c.cpu() for n, c in seen.channels.items()}
            heads = seen.heads.cpu() if seen.heads is not None else None
            out.append(_Seen(seen.units, {}, seen.rare, channels, heads))
            del seen
            if i + 1 < len(blocks):
                inputs.advance(blocks[i])
        progress(i)
    return out


def reshape_(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """A mixture-of-experts model built from a config with `pyprune_fast_widths` (finish_config) resized
    block by block (uninitialized tensors: loaded next): routed experts' fused tensors, shared experts,
    dense MLPs, query heads (q/o Linears, gpt-oss's sinks, the attention's head bookkeeping)."""
    _, blocks = find_blocks(model)
    config = model.config
    intermediate = widths["intermediate_size"]
    shared = widths.get("shared_intermediate_size") or [0] * len(blocks)
    heads = widths["num_attention_heads"]
    if not len(intermediate) == len(shared) == len(heads) == len(blocks):
        raise ValueError(f"pyprune_fast_widths lists {len(intermediate)} blocks; the config has {len(blocks)}")
    s = _attention(config.model_type, config, "", blocks) if config.model_type in ATTENTION else None
    edits = Edits()
    for i, block in enumerate(blocks):
        width = int(intermediate[i])
        layers = find_moe(block)
        for m in layers:
            _resize_experts(m, width, edits)
            for _path, mlp in _shared(m):
                _resize_mlp(mlp, int(shared[i]), edits)
        if not layers:
            _resize_mlp(_dense_mlp(block), width, edits)
        if s is not None and int(heads[i]) != s.block_heads(i):
            h, d, layout = int(heads[i]), s.head_dim, s.layout
            q, o = s.linear(i, layout.q), s.linear(i, layout.o)
            edits.replace(block, layout.q, _empty(q, q.in_features, h * d))
            edits.replace(block, layout.o, _empty(o, h * d, o.out_features))
            attention = block.get_submodule(layout.attention)
            sinks = getattr(attention, "sinks", None)
            if isinstance(sinks, nn.Parameter):
                edits.set(attention, "sinks", nn.Parameter(sinks.detach().new_empty(h)))
            set_head_attrs(edits.set, attention, h, s)


def _empty(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, dtype=like.weight.dtype)


def _resize_mlp(mlp: nn.Module, width: int, edits: Edits) -> None:
    for p in ("gate_proj", "up_proj"):
        linear = getattr(mlp, p)
        edits.replace(mlp, p, _empty(linear, linear.in_features, width))
    edits.replace(mlp, "down_proj", _empty(mlp.down_proj, width, mlp.down_proj.out_features))
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        edits.set(mlp, "intermediate_size", width)


def _resize_experts(m: MoE, width: int, edits: Edits) -> None:
    """The fused experts given `width` channels each: gate_up [E, 2I, H] / down [E, H, I] (transposed:
    [E, H, 2I] / [E, I, H]) and the gate_up bias [E, 2I]."""
    ex = m.experts
    transposed = getattr(ex, "is_transposed", False)
    shapes = {"gate_up_proj": (2 if transposed else 1, 2 * width), "down_proj": (1 if transposed else 2, width)}
    if getattr(ex, "has_bias", False):
        shapes["gate_up_proj_bias"] = (1, 2 * width)
    for name, (dim, size) in shapes.items():
        old = getattr(ex, name)
        shape = list(old.shape)
        shape[dim] = size
        edits.set(ex, name, nn.Parameter(old.detach().new_empty(shape), old.requires_grad))
    for attr in ("intermediate_dim", "intermediate_size"):
        if isinstance(getattr(ex, attr, None), int):
            edits.set(ex, attr, width)
