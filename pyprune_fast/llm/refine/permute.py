"""Exact channel permutations for N:M sparsity (Pool and Yu 2021, "Channel Permutations for N:M
Sparsity", NeurIPS; Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for
Large Language Models" (RIA), ICLR): which weights share a group of m depends on the order of a Linear's
input channels, and a permutation applied to the model itself costs nothing at inference and leaves its
function unchanged.

The search (`nm_permutation`) maximises the score the N:M mask keeps, Σ over rows and groups of the n
highest scores of the group, by greedy swaps of two channels of different groups: every round, each
group finds its best swap partner (the kept-score gains of all candidate swaps come from the fused op
ops.nm_swap_gains), and the swaps of mutually best group pairs are applied together (a swap changes its
two groups only, so swaps between disjoint pairs of groups add up exactly); until no swap gains."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ... import ops
from ...criteria.input_stats import InputStats, StatsCollector
from ...criteria.magnitude import magnitude_score
from ...criteria.method import LayerMethod
from ...criteria.wanda import wanda_score
from ...ops.checks import check_n_m
from ..blocks import block_linears, on_device
from ..structured.layout import Layout, Structure, structure_of
from .base import Gain, ModelStep, Refinement

# A swap is taken when it gains more than this fraction of the mean column's total |score|: float sums
# of the gains cannot then make the search cycle.
_RELATIVE_TOLERANCE = 1e-5


def _channel_scores(scores: Tensor | Sequence[Tensor], m: int) -> Tensor:
    """The score matrices [R_k, C] of Linears that share their input channels, as one channel-major
    [C, Σ R_k] matrix; ValueError naming the matrix that is not [R, C] with C % m == 0 or holds NaN."""
    mats = [scores] if isinstance(scores, Tensor) else list(scores)
    if not mats:
        raise ValueError("scores must hold at least one [rows, C] score matrix")
    channels = mats[0].shape[-1] if mats[0].dim() == 2 else -1
    for i, s in enumerate(mats):
        if not isinstance(s, Tensor) or not s.is_floating_point():
            raise TypeError(f"scores[{i}] must be a floating-point Tensor, got {type(s).__name__}")
        if s.dim() != 2 or s.shape[1] != channels or channels % m:
            raise ValueError(
                f"scores[{i}] must be [rows, C] with one C for all, a multiple of m={m}, got {tuple(s.shape)}"
            )
        if bool(torch.isnan(s).any()):
            raise ValueError(f"scores[{i}] contains NaN; scores must not be NaN")
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in mats) else torch.float32
    return torch.cat([s.detach().to(dtype).t() for s in mats], dim=1).contiguous()


def nm_permutation(
    scores: Tensor | Sequence[Tensor],
    n: int = 2,
    m: int = 4,
    *,
    max_rounds: int | None = None,
    max_rows: int | None = None,
    gains: Callable[..., Tensor] = ops.nm_swap_gains,
) -> Tensor:
    """A permutation of the input channels that raises the score an N:M mask keeps.

    Args:
        scores: one score matrix [R, C] (higher = kept; any criterion's: magnitude, Wanda, SparseGPT's
            saliency), or several sharing the C input channels (their rows are summed over): Linears
            that read the same input. No NaN; ±inf are ordinary values.
        n, m: the N:M pattern (groups of m consecutive input channels).
        max_rounds: stop after this many rounds of swaps (None: when no swap gains).
        max_rows: search on at most this many rows, evenly spaced among all (None: all). The cost of
            the search is linear in the rows: the hidden dimension of an LLM is read by five Linears of
            every block.
        gains: the kept-score gains of candidate swaps (ops.nm_swap_gains; the reference
            reference.nm_swap_gains gives the same permutation when the sums are exact).

    Returns:
        perm, int64 [C] on the scores' device: scores[:, perm] keeps at least as much as scores
        (the identity when no swap gains), so a Linear's weight[:, perm] is the permuted Linear.
    """
    n, m = check_n_m(n, m)
    channel = _channel_scores(scores, m)
    if max_rows is not None and channel.shape[1] > max_rows:
        rows = torch.linspace(0, channel.shape[1] - 1, max_rows, device=channel.device).round().long()
        channel = channel[:, rows].contiguous()
    count, device = channel.shape[0], channel.device
    groups = count // m
    perm = torch.arange(count, device=device)
    if groups < 2 or n in (0, m):
        return perm
    finite = torch.where(channel.isfinite(), channel, 0).abs().sum(dtype=torch.float64)
    tolerance = float(finite) / count * _RELATIVE_TOLERANCE
    gain = gains(channel, perm, perm.clone(), n, m).double()  # [position, channel]
    group = torch.arange(groups, device=device)
    same_group = (group.repeat_interleave(m)[:, None] == group.repeat_interleave(m)[None, :]).view(groups, m, groups, m)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        by_position = gain[:, perm]
        pair = (by_position + by_position.T).view(groups, m, groups, m)
        pair = torch.where(same_group | pair.isnan(), float("-inf"), pair)
        best, where = pair.permute(0, 2, 1, 3).reshape(groups, groups, m * m).max(dim=2)
        value, partner = best.max(dim=1)
        mutual = (partner[partner] == group) & (group < partner) & (value > tolerance)
        if not bool(mutual.any()):
            break
        a_group, b_group = group[mutual], partner[mutual]
        within = where[a_group, b_group]
        a, b = a_group * m + within // m, b_group * m + within % m
        perm[a], perm[b] = perm[b], perm[a].clone()
        changed = (torch.cat([a_group, b_group])[:, None] * m + torch.arange(m, device=device)).flatten()
        gain[changed] = gains(channel, perm, changed, n, m).double()
        rounds += 1
    return perm


def kept_score(scores: Tensor | Sequence[Tensor], perm: Tensor, n: int = 2, m: int = 4) -> float:
    """The score the N:M mask keeps with the input channels taken in the order `perm` (float64 sum)."""
    channel = _channel_scores(scores, m)[perm].double()
    return float(channel.view(-1, m, channel.shape[1]).topk(n, dim=1).values.sum())


# ---- applying permutations to a model: the function is unchanged ----------------------------------

# Decoders whose residual stream is x + attention(norm(x)) + mlp(norm(x)) with elementwise RMSNorms:
# permuting the hidden dimension everywhere (embedding columns, norm weights, the columns of every
# Linear reading the stream, the rows of every Linear writing it, the LM head's columns) is exact.
HIDDEN_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

ScoresFn = Callable[[str, nn.Linear], Tensor]


def magnitude_scores(name: str, linear: nn.Linear) -> Tensor:
    """|W|: the default scores of the search (no data)."""
    return magnitude_score(linear.weight)


def _permute_(param: Tensor | None, index: Tensor, dim: int) -> None:
    """param ← param.index_select(dim, index), in place (the Parameter, and any tie, kept)."""
    if param is not None:
        with torch.no_grad():
            param.copy_(param.index_select(dim, index.to(param.device)))


def permute_mlp_(block: nn.Module, layout: Layout, perm: Tensor) -> None:
    """Reorders a block's MLP channels: rows (and bias) of the producers (gate_proj, up_proj; OPT: fc1)
    and columns of the consumer (down_proj; OPT: fc2) by `perm`, so that the consumer's input channel j
    is the old channel perm[j]. Exact: the channels are elementwise between producers and consumer."""
    for name in layout.producers:
        linear = block.get_submodule(name)
        _permute_(linear.weight, perm, 0)
        _permute_(linear.bias, perm, 0)
    _permute_(block.get_submodule(layout.consumer).weight, perm, 1)


def value_index(structure: Structure, perms: Tensor) -> tuple[Tensor, Tensor]:
    """(v_proj rows, o_proj columns) in their new order for one permutation of the value channels per
    key/value head (perms [kv, head_dim]): key/value head k's channels reordered by perms[k], in v_proj
    and in the o_proj columns of each of the query heads that read it."""
    d, device = structure.head_dim, perms.device
    rows = (torch.arange(structure.kv, device=device)[:, None] * d + perms).flatten()
    heads = torch.arange(structure.heads, device=device)
    cols = (heads[:, None] * d + perms[heads // structure.group]).flatten()
    return rows, cols


def permute_values_(block: nn.Module, structure: Structure, perms: Tensor) -> None:
    """Reorders the value channels inside each key/value head (perms [kv, head_dim]): v_proj rows (and
    bias) and the matching o_proj columns of every query head of the group. Exact: attention mixes
    tokens, not channels, so head h's output channel c is a combination of value channel c only."""
    rows, cols = value_index(structure, perms)
    v = block.get_submodule(structure.layout.v)
    _permute_(v.weight, rows, 0)
    _permute_(v.bias, rows, 0)
    _permute_(block.get_submodule(structure.layout.o).weight, cols, 1)


def _hidden_parameters(model: nn.Module, structure: Structure) -> list[tuple[str, Tensor, int]]:
    """(name, parameter, dim) of every parameter along which the hidden dimension runs, each shared
    parameter once (tied embeddings); ValueError, nothing touched, for a parameter of the hidden size
    that the permutation does not know (a module outside the residual stream's known form)."""
    layout, hidden = structure.layout, structure.hidden
    readers = (*layout.producers, layout.q, layout.k, layout.v)
    writers = (layout.consumer, layout.o)
    dims: dict[str, int | None] = {}  # None: a parameter off the stream (a reader's bias)
    for i in range(len(structure.blocks)):
        base = f"{structure.prefix}.{i}."
        dims.update({base + name + ".weight": 1 for name in readers})
        dims.update({base + name + ".bias": None for name in readers})
        dims.update({base + name + suffix: 0 for name in writers for suffix in (".weight", ".bias")})
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for name, m in model.named_modules():
            if m is module:
                dims[name + ".weight"] = 1
    for name, m in model.named_modules():
        if type(m).__name__.endswith("RMSNorm") and m.weight.shape == (hidden,):
            dims[name + ".weight"] = 0
    found, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in dims and id(p) not in seen:
            seen.add(id(p))
            if dims[name] is not None:
                found.append((name, p, dims[name]))
    for name, p in model.named_parameters():
        if id(p) not in seen and hidden in p.shape:
            raise ValueError(
                f"architecture {structure.arch}: parameter {name} has a dimension of the hidden size {hidden} "
                "outside the known residual stream; the hidden-dimension permutation refuses it"
            )
    return found


def permute_hidden_(model: nn.Module, structure: Structure, perm: Tensor) -> None:
    """Reorders the hidden dimension of the whole model by `perm` (new channel j = old channel perm[j]):
    embedding and LM head columns (once when tied), every RMSNorm's weight, the columns of every Linear
    reading the residual stream (q, k, v, gate, up), the rows and biases of every Linear writing it (o,
    down). RMSNorm(x[perm]) = RMSNorm(x)[perm] with its weight permuted, so the logits are unchanged."""
    if structure.arch not in HIDDEN_ARCHS:
        raise ValueError(
            f"architecture {structure.arch}: the hidden-dimension permutation does not follow its residual "
            f"stream (known: {', '.join(HIDDEN_ARCHS)})"
        )
    for _, param, dim in _hidden_parameters(model, structure):
        _permute_(param, perm, dim)


PARTS = ("hidden", "mlp", "values")
# Rows a search of permute_for_nm_ reads by default (evenly spaced): every row of a block's down_proj or
# o_proj, a sample of the hidden dimension's (five Linears of every block: 121 k rows in SmolLM2-135M).
MAX_ROWS = 8192


@dataclass
class Permutations:
    """The permutations found for a model: `hidden` (int64 [hidden]), `mlp` (block index → int64
    [intermediate]), `values` (block index → int64 [key/value heads, head_dim]), and for each part the
    score the N:M masks keep before and after, summed over the Linears it reorders (`kept`)."""

    hidden: Tensor | None = None
    mlp: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    kept: dict[str, tuple[float, float]] = field(default_factory=dict)


def _check(model: nn.Module, parts: Sequence[str], m: int) -> Structure:
    """The model's Structure, after refusing (ValueError, nothing touched) unknown parts, architectures
    whose residual stream or attention is not known, and widths that are not multiples of m."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts must be among {', '.join(PARTS)}, got {unknown}")
    structure = structure_of(model)
    if "hidden" in parts:
        if structure.arch not in HIDDEN_ARCHS:
            raise ValueError(
                f"architecture {structure.arch}: the hidden-dimension permutation does not follow its residual "
                f"stream (known: {', '.join(HIDDEN_ARCHS)})"
            )
        _hidden_parameters(model, structure)
    if "values" in parts and structure.layout.packed_qkv:
        raise ValueError(f"architecture {structure.arch}: value channels of a packed qkv Linear are not permuted")
    widths = {
        "hidden": ("hidden size", structure.hidden),
        "values": ("head_dim", structure.head_dim),
        "mlp": ("intermediate size", min(structure.intermediate(i) for i in range(len(structure.blocks)))),
    }
    for part in parts:
        what, width = widths[part]
        if width % m or any(part == "mlp" and structure.intermediate(i) % m for i in range(len(structure.blocks))):
            raise ValueError(f"permutation {part}: the {what} {width} is not a multiple of m={m}")
    return structure


def _search(found: Permutations, part: str, mats: list[Tensor], n: int, m: int, limits: dict[str, Any]) -> Tensor:
    """nm_permutation of the matrices (limits: its max_rounds, max_rows), its kept score before and
    after (on all rows) added to found.kept[part]."""
    perm = nm_permutation(mats, n, m, **limits)
    before, after = found.kept.get(part, (0.0, 0.0))
    identity = torch.arange(perm.numel(), device=perm.device)
    found.kept[part] = (before + kept_score(mats, identity, n, m), after + kept_score(mats, perm, n, m))
    return perm


def apply_permutations_(model: nn.Module, found: Permutations) -> None:
    """Applies found permutations to the model in place (its function unchanged)."""
    structure = structure_of(model)
    if found.hidden is not None:
        permute_hidden_(model, structure, found.hidden)
    for i, perm in found.mlp.items():
        permute_mlp_(structure.blocks[i], structure.layout, perm)
    for i, perms in found.values.items():
        permute_values_(structure.blocks[i], structure, perms)


def permute_for_nm_(
    model: nn.Module,
    scores_fn: ScoresFn = magnitude_scores,
    n: int = 2,
    m: int = 4,
    *,
    parts: Sequence[str] = PARTS,
    max_rounds: int | None = None,
    max_rows: int | None = MAX_ROWS,
) -> Permutations:
    """Reorders a decoder LLM's channels, in place and without changing its function, so that N:M masks
    chosen afterwards on its Linears (in their stored order) keep more of the scores:

        hidden   one permutation of the hidden dimension for the whole model (Llama, Mistral, Qwen2,
                 Qwen3), searched on the scores of every Linear reading the residual stream
        mlp      each block's MLP channels, searched on the scores of down_proj (OPT: fc2)
        values   the value channels inside each key/value head, searched on the o_proj columns of the
                 query heads that read it. (Reordering whole query heads within a key/value group is also
                 exact but never changes an N:M group when head_dim is a multiple of m: not searched.)

    Args:
        model: a Hugging Face decoder LLM of a known layout (llm.structured.layout); nothing is touched
            when it is refused (ValueError naming the architecture or the width).
        scores_fn: (qualified Linear name, Linear) → [out, in] scores, higher = kept (magnitude, Wanda's
            |W|·‖X‖, SparseGPT's saliency), read on the model before any permutation.
        n, m: the N:M pattern.
        parts: which permutations to search and apply.
        max_rounds: a bound on the swap rounds of each search (None: until no swap gains).
        max_rows: each search reads at most this many rows of its scores, evenly spaced (None: all;
            by default the hidden dimension's search is sampled, the others read every row).

    Returns:
        The Permutations applied, with the kept scores before and after.
    """
    n, m = check_n_m(n, m)
    structure = _check(model, parts, m)
    layout, found = structure.layout, Permutations()
    limits = {"max_rounds": max_rounds, "max_rows": max_rows}

    def scores(i: int, name: str) -> Tensor:
        return scores_fn(f"{structure.prefix}.{i}.{name}", structure.linear(i, name))

    blocks = range(len(structure.blocks))
    if "hidden" in parts:
        readers = (*layout.producers, layout.q, layout.k, layout.v)
        found.hidden = _search(found, "hidden", [scores(i, r) for i in blocks for r in readers], n, m, limits)
    d, g = structure.head_dim, structure.group
    for i in blocks:
        if "mlp" in parts:
            found.mlp[i] = _search(found, "mlp", [scores(i, layout.consumer)], n, m, limits)
        if "values" in parts:
            o = scores(i, layout.o)
            heads = [[o[:, h * d : (h + 1) * d] for h in range(k * g, (k + 1) * g)] for k in range(structure.kv)]
            found.values[i] = torch.stack([_search(found, "values", h, n, m, limits) for h in heads])
    apply_permutations_(model, found)
    return found


def inverse(found: Permutations) -> Permutations:
    """The permutations that undo `found` (applied after it, the model is as it was)."""
    return Permutations(
        None if found.hidden is None else found.hidden.argsort(),
        {i: p.argsort() for i, p in found.mlp.items()},
        {i: p.argsort(dim=1) for i, p in found.values.items()},
    )


def _dense_statistics(step: ModelStep, observes: frozenset[str]) -> dict[str, InputStats]:
    """The input statistics of every block Linear (by qualified name) on the dense model: the calibration
    inputs through all blocks once, each block on the compute device in turn."""
    inputs = step.capture()
    device = inputs.hidden[0].device
    stats: dict[str, InputStats] = {}
    for i, block in enumerate(step.blocks):
        collector = StatsCollector(block, block_linears(block), observes | {"norms"})
        with on_device(block, device), collector:
            for j in range(len(inputs)):
                inputs.hidden[j] = inputs.run(block, j)
        stats.update({f"{step.prefix}.{i}.{name}": s for name, s in collector.stats.items()})
    return stats


def method_scores(step: ModelStep) -> ScoresFn:
    """The run's method's scores of each Linear on the dense model: a LayerMethod's own score_layer on
    its statistics (magnitude: none), else |W_ij|·‖X_j‖₂ (Wanda; the diagonal form of SparseGPT's saliency)."""
    method = step.method
    layer = isinstance(method, LayerMethod)
    stats = _dense_statistics(step, method.observes if layer else frozenset()) if method.needs_data else {}

    def scores(name: str, linear: nn.Linear) -> Tensor:
        if layer:
            return method.score_layer(linear.weight, stats.get(name))
        return wanda_score(linear.weight, stats[name].norms().to(linear.weight.device).unsqueeze(0))

    return scores


class Permute(Refinement):
    """Exact channel permutations before N:M masking (stage "model": once, before block 0): the hidden
    dimension of the whole model (Llama, Mistral, Qwen2, Qwen3), each block's MLP channels and the value
    channels of each key/value head (every architecture of llm.structured.layout with separate q, k, v),
    searched on the run's method's scores of the dense model (one pass of the calibration inputs through
    the blocks, when the method reads data) and applied to the model, whose function is unchanged. An
    architecture without a known layout is refused by name. Gain: the N:M-kept score before and after."""

    name = "permute"
    stage = "model"
    needs_data = False  # the statistics pass runs when the method reads data

    def check(self, plan: Any) -> None:
        if not plan.pattern.is_nm:
            raise ValueError(f"refinement permute: needs an N:M sparsity such as 2:4, got {plan.pattern}")
        if plan.options.offload is not None:
            raise ValueError("refinement permute reorders the whole model before block 0: not with offload=")

    def refine_(self, step: ModelStep) -> Gain:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError("refinement permute: not with several processes (each would search its own permutation)")
        structure = structure_of(step.model)
        parts = ("hidden",) if structure.arch in HIDDEN_ARCHS else ()
        parts += ("mlp",)
        if not structure.layout.packed_qkv and structure.layout.heads_removable:
            parts += ("values",)
        n, m = step.pattern.n, step.pattern.m
        _check(step.model, parts, m)  # refusals before the statistics pass
        found = permute_for_nm_(step.model, method_scores(step), n, m, parts=parts)
        step.undo.append(partial(apply_permutations_, step.model, inverse(found)))
        before, after = (sum(k[i] for k in found.kept.values()) for i in (0, 1))
        return Gain("N:M-kept score", before, after, higher_is_better=True)
