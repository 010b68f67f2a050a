"""Width pruning inside mixture-of-experts blocks: intermediate channels removed from every routed expert,
every shared expert and the MLP of every dense block (Qwen2/3-MoE's mlp_only_layers, DeepSeek-V3's first
blocks), each scored and refitted on the tokens it really sees — a smaller model of the same architecture
that stock `from_pretrained` loads. Attention heads are not removed here (units="mlp").

    for each block i (its inputs: the pruned model's, captured at block 0 and rerun block by block):
        run it on the calibration batches with every routed expert running its routed tokens through its
            Linear views (llm.moe.Routing): each expert's down_proj sees w_t·h_t over the tokens t routed
            to it (w_t the router weight: exactly what the layer output receives); a shared expert's and
            a dense MLP's down_proj see every token
        score each MLP's channels on its own statistics (scores.py: magnitude, l1, l2, wanda, flap)
        drop its lowest channels (ties: the lower index first): each expert its own channels, every
            routed expert of every layer the same count, so that the fused 3-D tensors keep one width
        refit its down_proj by least squares on those statistics (refit.py, reconstruct=True; a routed
            expert's down_proj bias, gpt-oss, stays: it is scaled by w_t, a least-squares intercept is not),
            or slice it (reconstruct=False)
        rerun the pruned block: the next block's inputs

How `ratio` (the fraction of each decoder block's parameters removed, as in width.py) is met: the MLPs
carry the whole budget, each losing the same fraction f = ratio · P_block / P_channels of its channels
(P_channels: the parameters of the block's gate/up rows and down columns), f taken from the first MoE
block for every MoE block and from the first dense block for the dense ones; the kept widths rounded to
`multiple` — the routed experts' to a multiple of 16 bytes as well (4 channels in float32, 8 in
bfloat16): transformers' grouped_mm experts refuse other strides. DeepSeek-V3's shared experts are
n_shared_experts × moe_intermediate_size wide by construction: they keep n_shared_experts × the routed
experts' kept width.

Experts with fewer than `min_expert_tokens` routed calibration tokens (reported as
`StructuredResult.rare_experts`): rare_experts="magnitude" scores them by magnitude and slices their
down_proj without a refit; "route" forces the tokens their router scores highest through them first
(llm.moe.Routing.force), then scores and refits them as the others (one still without a token: as
"magnitude"). Leaving an expert dense ("dense") would break the equal widths: refused.

Memory: the statistics pass keeps, for the refit, XᵀX of every routed expert's down_proj input of the
block at once, E · I² · 4 bytes (Mixtral-8x7B: 8 × 14336² floats, 6.6 GB; Qwen3-30B-A3B: 128 × 768²,
0.3 GB), on the device the block runs on; reconstruct=False keeps Σx and Σx² only.

The config is updated under the architecture's names (WIDTH_KEYS): Mixtral, OLMoE and gpt-oss
`intermediate_size`; Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 `moe_intermediate_size` for the routed experts
and `intermediate_size` for the dense blocks; Qwen2-MoE `shared_expert_intermediate_size`. Refused, with
the model untouched: global allocation (the layers would differ in width, which no config of these
architectures expresses), heads, gradient scores (fused experts are not Linears), `forward=`, a ratio
that leaves an MLP no channel, an unknown router or architecture."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...criteria.input_stats import InputStats, StatsCollector
from ...errors import UsageError
from ..blocks import BlockInputs, find_blocks, on_device
from ..moe import RARE_EXPERTS, MoE, Routing, find_moe, known, with_experts
from .edit import Edits, new_linear, rows
from .layout import Layout, Structure
from .refit import least_squares
from .scores import SCORES, Observed, check_finite
from .width import lowest, rounded

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


@dataclass
class MoEWidth:
    """The plan of one MoE width run, checked before anything is touched: the architecture, the channels
    each kind of MLP loses (routed experts, shared experts, dense MLPs) and their widths before."""

    arch: str
    blocks: nn.ModuleList
    config: Any
    routed: int = 0
    shared: int = 0
    dense: int = 0
    widths: tuple[int, int, int] = (0, 0, 0)  # routed, shared, dense widths before


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


def plan(model: nn.Module, blocks: nn.ModuleList, options: dict[str, Any]) -> MoEWidth:
    """The MoE width plan (module docstring) for prune_structured's `options`; UsageError naming the
    option or the architecture, before anything is touched."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in WIDTH_KEYS:
        raise UsageError(f"`model`: mixture-of-experts architecture {arch or type(model).__name__} is not known to "
                         f"the structured pruner (known: {', '.join(WIDTH_KEYS)})")  # fmt: skip
    if options["units"] not in (None, "mlp"):
        raise UsageError(f"`units`={options['units']!r}: mixture-of-experts models lose MLP channels only: units='mlp'")
    if options["allocation"] != "uniform":
        raise UsageError("`allocation`='global' would give the MoE layers different expert widths, which the "
                         "config cannot express (the fused expert tensors of a layer share one width): use "
                         "'uniform'")  # fmt: skip
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
    run = MoEWidth(arch, blocks, config)
    moe_blocks = [i for i, b in enumerate(blocks) if find_moe(b)]
    dense_blocks = [i for i, b in enumerate(blocks) if not find_moe(b)]
    for i in moe_blocks:
        for m in find_moe(blocks[i]):
            known(m)
    for i in dense_blocks:
        if _dense_mlp(blocks[i]) is None:
            raise UsageError(f"`model`: block {i} has neither experts nor an MLP with gate_proj, up_proj, down_proj")
    if moe_blocks:
        block = blocks[moe_blocks[0]]
        fraction = ratio * sum(p.numel() for p in block.parameters()) / _channel_params(block)
        m = find_moe(block)[0]
        width = _routed_width(m)
        align = math.lcm(multiple, max(1, 16 // m.experts.down_proj.element_size()))
        run.routed = _removed(width, fraction, align, f"routed experts of block {moe_blocks[0]}", ratio)
        shared = _shared(m)
        shared_width = shared[0][1].down_proj.in_features if shared else 0
        if shared and arch in SHARED_FACTOR:
            run.shared = shared_width - int(getattr(config, SHARED_FACTOR[arch])) * (width - run.routed)
        elif shared:
            run.shared = _removed(shared_width, fraction, multiple, f"shared expert of block {moe_blocks[0]}", ratio)
        run.widths = (width, shared_width, 0)
    if dense_blocks:
        block = blocks[dense_blocks[0]]
        fraction = ratio * sum(p.numel() for p in block.parameters()) / _channel_params(block)
        width = _dense_mlp(block).down_proj.in_features
        run.dense = _removed(width, fraction, multiple, f"MLP of block {dense_blocks[0]}", ratio)
        run.widths = (run.widths[0], run.widths[1], width)
    return run


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


class MoEWidthRun:
    """One MoE width-pruning run (module docstring); every change goes through `edits`."""

    def __init__(self, run: MoEWidth, options: dict[str, Any], edits: Edits) -> None:
        self.run, self.o, self.edits = run, options, edits
        self.rare: dict[str, int] = {}

    def statistics(self, block: nn.Module, inputs: BlockInputs) -> tuple[list[tuple[str, _Unit]], dict, dict]:
        """The block's MLP units, their down_proj input statistics and its rare experts."""
        views = with_experts(block, {})
        units = _units(block, views)
        consumers = {u.path: u.mlp.down_proj for _, u in units}
        observes = {"sums", "xtx"} if self.o["reconstruct"] else {"sums"}
        routing = Routing(block, views, self.o["rare_experts"], self.o["min_expert_tokens"])
        with StatsCollector(block, consumers, observes) as stats, routing:
            for j in range(len(inputs)):
                inputs.run(block, j)
            routing.force()
        return units, dict(stats), routing.rare

    def prune_block(self, i: int, prefix: str, inputs: BlockInputs) -> None:
        block = self.run.blocks[i]
        units, stats, rare = self.statistics(block, inputs)
        self.rare.update({f"{prefix}.{i}.{n}": c for n, c in rare.items()})
        counts = {"routed": self.run.routed, "shared": self.run.shared, "dense": self.run.dense}
        routed: dict[int, tuple[MoE, list[Tensor], list[Tensor]]] = {}
        for kind, unit in units:
            if not counts[kind]:
                continue
            magnitude = unit.moe is not None and self.o["rare_experts"] == "magnitude" and unit.path in rare
            s = None if magnitude else stats.get(unit.path)
            scores = _score(self.o["score"], unit, s)
            check_finite(scores, f"block {i} {unit.path} channels")
            keep = lowest(scores, counts[kind])
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

    def finish_config(self) -> None:
        """The config's widths (WIDTH_KEYS) set to the kept ones."""
        routed_key, shared_key, dense_key = WIDTH_KEYS[self.run.arch]
        (routed, shared, dense), config = self.run.widths, self.run.config
        if routed:
            self.edits.set(config, routed_key, routed - self.run.routed)
        if shared and shared_key is not None:
            self.edits.set(config, shared_key, shared - self.run.shared)
        if dense and dense_key is not None:
            self.edits.set(config, dense_key, dense - self.run.dense)


def widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """Each decoder block's MLP width — its routed experts' (MoE blocks) or its MLP's (dense blocks) —
    and its query heads (the config's: heads are not removed here)."""
    _, blocks = find_blocks(model)
    out = []
    for block in blocks:
        layers = find_moe(block)
        out.append(_routed_width(layers[0]) if layers else _dense_mlp(block).down_proj.in_features)
    return out, [int(model.config.num_attention_heads)] * len(blocks)


def sequential(
    run: MoEWidthRun,
    prefix: str,
    inputs: BlockInputs,
    device: torch.device,
    seconds: list[float],
    progress: Callable[[int], None],
) -> None:
    """The block-sequential MoE width pruning (module docstring), then the config."""
    blocks = run.run.blocks
    for i in range(len(blocks)):
        t0 = time.perf_counter()
        with on_device(blocks[i], device):
            run.prune_block(i, prefix, inputs)
            if i + 1 < len(blocks):
                inputs.advance(blocks[i])
        seconds.append(time.perf_counter() - t0)
        progress(i)
    run.finish_config()
