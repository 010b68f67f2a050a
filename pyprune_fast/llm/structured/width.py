"""Width pruning, block by block: MLP channels and query heads removed from each decoder block, each
block calibrated on the outputs of the blocks already pruned (as llm.prune), the consumer of what was
removed refitted (refit.py), the shapes changed for real.

    for each block i (its inputs: the pruned model's, captured at block 0 and rerun block by block):
        run it on the calibration batches with hooks on the consumers (down_proj / fc2 and o_proj /
            out_proj): n, Σx, Σx², XᵀX of their inputs (criteria.input_stats)
        score every MLP channel and query head (scores.py); drop the lowest of each, as many as the
            allocation gives this block (ties: the lower index is dropped first)
        refit each consumer by least squares on those statistics (reconstruct=True), or apply FLAP's
            bias compensation (reconstruct=False, where a bias exists or the config can add one)
        slice the producers' rows (gate/up, fc1; q, and k/v under multi-head attention)
        rerun the pruned block: the next block's inputs

How `ratio` (the fraction of each decoder block's parameters removed) is split: attention loses
round(ratio × g) query heads from each key/value group (g query heads per group; multi-head attention:
round(ratio × heads) heads), at least one kept; the MLP channels carry the rest of the block's budget,
round((ratio·P_block − attention removed) / parameters per channel) channels. Each block then loses
ratio × its parameters to within one channel, whatever the head granularity (SmolLM2, 3 query heads
per group: 10 % removes no head, 25 % and 40 % one per group); with `multiple` > 1 the kept MLP width
is rounded to the nearest multiple (GEMM-friendly shapes), exact to `multiple` channels then.

allocation="uniform": those counts in every block (a standard config). allocation="global": the same
totals of channels and of head slices over the whole model, placed where the scores are lowest: a
first, dense pass scores every block; each block's scores are made comparable across blocks —
standardized ((s − mean) / std, as FLAP's adaptive structure search does; normalize=None), or L_p
normalized (√S / ‖√S‖_p over the block's channels, and over its heads: the channel criteria's
normalize="lp", Ide's thesis eq. 4.13) — and one threshold over all blocks picks the units (a head slice: one
query head from every group of a block, its score the mean over the groups of each group's k-th
lowest), each block keeping at least `floor` of its channels and of its heads per group (and at least
one); the sequential pass then removes that many units from each block by its scores on the pruned
inputs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ...criteria.engine import lp_normalize
from ...criteria.input_stats import InputStats, StatsCollector
from ...errors import UsageError
from ..blocks import BlockInputs, on_device
from .edit import Edits, new_linear, rows, with_bias
from .gradients import unit_gradients
from .layout import Structure, set_head_attrs
from .refit import compensate, least_squares
from .scores import SCORES, Observed, check_finite, magnitude


@dataclass(frozen=True)
class Counts:
    """What one block loses: `heads` query heads from each key/value group (multi-head attention: heads
    in all), `channels` MLP channels."""

    heads: int
    channels: int


def block_params(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def head_cost(structure: Structure, i: int) -> int:
    """Parameters one removed unit of the head count costs: a query head in every group (GQA), or one
    head with its key and value rows (multi-head attention)."""
    layout, d, h = structure.layout, structure.head_dim, structure.hidden
    q = structure.linear(i, layout.q)
    per_head = d * (h + (q.bias is not None)) + d * h
    if structure.group == 1:
        k, v = structure.linear(i, layout.k), structure.linear(i, layout.v)
        return per_head + d * (2 * h + (k.bias is not None) + (v.bias is not None))
    return per_head * structure.kv


def _channel_cost(structure: Structure, i: int) -> int:
    layout = structure.layout
    producers = [structure.linear(i, p) for p in layout.producers]
    return (
        sum(p.in_features + (p.bias is not None) for p in producers) + structure.linear(i, layout.consumer).out_features
    )


def _head_units(structure: Structure, i: int) -> int:
    """How many units the head count has in block i: query heads per group (GQA), or heads (MHA)."""
    heads = structure.block_heads(i)
    return heads if structure.group == 1 else heads // structure.kv


def rounded(width: int, channels: int, multiple: int) -> int:
    """The channels to remove so that the kept width is the multiple of `multiple` nearest to
    width − channels (at least one multiple; none removed when the width is not above one multiple)."""
    if multiple <= 1 or channels == 0:
        return channels
    kept = max(multiple, round((width - channels) / multiple) * multiple)
    return max(0, width - kept)


UNITS = ("both", "mlp", "heads")


def check_units(structure: Structure, units: str | None) -> str:
    """The units width pruning removes: `units`, or None for the architecture's default ("both"; "mlp"
    where heads cannot be removed). UsageError naming `units` for an unknown value, or for head removal
    on an attention that cannot lose heads (torchvision's nn.MultiheadAttention)."""
    if units is None:
        return "both" if structure.layout.heads_removable else "mlp"
    if units not in UNITS:
        raise UsageError(f"`units` must be one of {UNITS} or None, got {units!r}")
    if units != "mlp" and not structure.layout.heads_removable:
        raise UsageError(
            f"`units`={units!r}: architecture {structure.arch}: heads cannot be removed from nn.MultiheadAttention "
            "(it requires embed_dim == num_heads * head_dim); use units='mlp' (MLP channels only)"
        )
    return units


def head_count(structure: Structure, i: int, ratio: float, units: str, params: int) -> int:
    """The head units block i loses for `ratio` of its `params` parameters: round(ratio × g) query heads
    per key/value group (multi-head attention: round(ratio × heads)); units="heads": the whole budget
    in heads; "mlp": none. UsageError naming `ratio` when the block would keep no head."""
    units_i = _head_units(structure, i)
    if units == "mlp":
        return 0
    heads = round(ratio * params / head_cost(structure, i)) if units == "heads" else round(ratio * units_i)
    if heads >= units_i:
        where = "attention head" if structure.group == 1 else "query head in a key/value group"
        raise UsageError(f"`ratio`={ratio} leaves no {where} of block {i} ({units_i} per group)")
    return heads


def uniform_counts(structure: Structure, ratio: float, multiple: int = 1, units: str = "both") -> list[Counts]:
    """Counts per block for `ratio` (module docstring; units="mlp": the whole budget in MLP channels,
    "heads": the whole budget in heads), the kept MLP width rounded to a multiple of `multiple`;
    UsageError naming `ratio` when a block would keep no head or no channel."""
    counts = []
    for i, block in enumerate(structure.blocks):
        heads = head_count(structure, i, ratio, units, block_params(block))
        if units == "heads":
            counts.append(Counts(heads, 0))
            continue
        budget = ratio * block_params(block) - heads * head_cost(structure, i)
        channels = rounded(structure.intermediate(i), max(0, round(budget / _channel_cost(structure, i))), multiple)
        if channels >= structure.intermediate(i):
            raise UsageError(
                f"`ratio`={ratio} leaves no MLP channel in block {i} ({structure.intermediate(i)} channels)"
            )
        counts.append(Counts(heads, channels))
    return counts


def _standardized(s: Tensor) -> Tensor:
    s = s.double()
    std = s.std() if s.numel() > 1 else s.new_zeros(())
    return (s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s)


def normalizer(normalize: str | None, p: float) -> Callable[[Tensor], Tensor]:
    """How the global allocation makes one block's scores comparable across blocks: standardized
    (normalize=None), or L_p normalized with `p` ("lp")."""
    return _standardized if normalize is None else partial(lp_normalize, p=p)


def head_slices(structure: Structure, scores: Tensor, normalized: Callable[[Tensor], Tensor]) -> Tensor:
    """Normalized score of each head slice k (ascending): the mean over the groups of each group's k-th
    lowest normalized head score (multi-head attention: the sorted head scores)."""
    z = normalized(scores)
    if structure.group == 1:
        return z.sort().values
    return z.reshape(structure.kv, -1).sort(dim=1).values.mean(0)


def pick(per_block: list[Tensor], total: int, floors: list[int]) -> list[int]:
    """How many of each block's lowest units one global threshold takes: the `total` lowest scores over
    all blocks (ties: lower block, then lower index first), block b giving at most len − floors[b]."""
    order = sorted(
        ((float(v), b, j) for b, s in enumerate(per_block) for j, v in enumerate(s.tolist())),
        key=lambda t: (t[0], t[1], t[2]),
    )
    taken = [0] * len(per_block)
    left = total
    for _, b, _j in order:
        if left == 0:
            break
        if taken[b] < len(per_block[b]) - floors[b]:
            taken[b] += 1
            left -= 1
    return taken


def global_counts(
    structure: Structure,
    uniform: list[Counts],
    scores: list[tuple[Tensor, Tensor]],
    floor: float,
    multiple: int = 1,
    normalize: str | None = None,
    p: float = 1.0,
) -> list[Counts]:
    """The global allocation (module docstring): the uniform totals placed by one threshold over the
    normalized scores (normalize=None: standardized; "lp": L_p normalized with `p`), each block keeping
    at least `floor` of its units (and one)."""
    normalized = normalizer(normalize, p)
    channel_z = [normalized(c).sort().values for c, _ in scores]
    slice_z = [head_slices(structure, h, normalized) for _, h in scores]
    ch_floor = [max(1, math.ceil(floor * len(z))) for z in channel_z]
    head_floor = [max(1, math.ceil(floor * len(z))) for z in slice_z]
    channels = pick(channel_z, sum(c.channels for c in uniform), ch_floor)
    heads = pick(slice_z, sum(c.heads for c in uniform), head_floor)
    widths = [len(z) for z in channel_z]
    return [Counts(h, rounded(w, c, multiple)) for h, c, w in zip(heads, channels, widths)]


def lowest(scores: Tensor, count: int) -> Tensor:
    """The kept indices (ascending) once the `count` lowest scores are dropped, ties by lower index."""
    order = torch.argsort(scores.cpu(), stable=True)
    return order[count:].sort().values


def _dropped(scores: Tensor, count: int) -> Tensor:
    """The indices of the `count` lowest scores (ties: the lower index), as `lowest` drops them."""
    return torch.argsort(scores.cpu(), stable=True)[:count]


def _head_columns(heads: Tensor, head_dim: int) -> Tensor:
    """The consumer input columns of `heads`: head_dim columns each."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def _dropped_heads(structure: Structure, i: int, kept: Tensor) -> Tensor:
    """The consumer input columns of block i's heads not in `kept`."""
    gone = torch.ones(structure.block_heads(i), dtype=torch.bool)
    gone[kept] = False
    return _head_columns(gone.nonzero().flatten(), structure.head_dim)


def kept_heads(structure: Structure, scores: Tensor, count: int) -> Tensor:
    """Kept query heads (ascending): `count` dropped from every key/value group (GQA), or in all (MHA)."""
    if structure.group == 1:
        return lowest(scores, count)
    per_group = scores.cpu().reshape(structure.kv, -1)
    g = per_group.shape[1]
    return torch.cat([lowest(s, count) + k * g for k, s in enumerate(per_group)])


@dataclass
class WidthOptions:
    score: str
    reconstruct: bool
    bias: bool
    percdamp: float


class WidthRun:
    """One width-pruning run over a model's blocks; every change goes through `edits`."""

    def __init__(self, structure: Structure, options: WidthOptions, edits: Edits, device: torch.device) -> None:
        self.s, self.o, self.edits, self.device = structure, options, edits, device
        self.added = {"mlp": False, "attention": False}

    def consumers(self, i: int) -> dict[str, nn.Linear]:
        layout = self.s.layout
        out = {"mlp": self.s.linear(i, layout.consumer)}
        if layout.heads_removable:
            out["attention"] = self.s.linear(i, layout.o)
        return out

    def observe(self, i: int, inputs: BlockInputs, counts: Counts) -> Observed:
        """The consumers' input statistics, and the block-local gradients (gradients.py) at the
        magnitude candidate of `counts` when the score needs them."""
        observed = Observed(self.statistics(i, inputs))
        needs = SCORES[self.o.score].gradients
        if needs:
            dropped = {"mlp": _dropped(magnitude(self.s, i, "mlp", observed), counts.channels)}
            if "attention" in observed.stats:
                heads = kept_heads(self.s, magnitude(self.s, i, "attention", observed), counts.heads)
                dropped["attention"] = _dropped_heads(self.s, i, heads)
            consumers = self.consumers(i)
            observed.grads = unit_gradients(self.s.blocks[i], inputs, consumers, dropped, needs, self.s.head_dim)
        return observed

    def statistics(self, i: int, inputs: BlockInputs) -> dict[str, InputStats]:
        """n, Σx, Σx² (and XᵀX for reconstruction) of both consumers' inputs over every batch."""
        observes = {"sums", "xtx"} if self.o.reconstruct else {"sums"}
        consumers = self.consumers(i)
        collector = StatsCollector(self.s.blocks[i], consumers, observes)
        with collector as stats:
            for j in range(len(inputs)):
                inputs.run(self.s.blocks[i], j)
        missing = [n for n in consumers if n not in stats]
        if missing:
            raise ValueError(f"block {i}: its {missing} consumer Linear was not called in the forward")
        return stats

    def scores(self, i: int, observed: Observed) -> tuple[Tensor, Tensor]:
        units = SCORES[self.o.score].units
        ch = units(self.s, i, "mlp", observed)
        hd = units(self.s, i, "attention", observed) if "attention" in observed.stats else torch.zeros(0)
        check_finite(ch, f"block {i} MLP channels")
        check_finite(hd, f"block {i} attention heads")
        return ch, hd

    def _bias_flag(self, part: str) -> str | None:
        layout = self.s.layout
        return layout.mlp_bias if part == "mlp" else layout.attention_bias

    def _consumer(self, i: int, part: str, path: str, keep: Tensor, stats: InputStats) -> None:
        """The consumer at `path` keeping input columns `keep`: refitted or compensated (module docstring)."""
        linear = self.s.linear(i, path)
        can_bias = linear.bias is not None or (self.o.bias and self._bias_flag(part) is not None)
        what = f"{self.s.prefix}.{i}.{path}"
        if self.o.reconstruct:
            weight, bias = least_squares(
                linear.weight, linear.bias, keep, stats, intercept=can_bias, percdamp=self.o.percdamp, what=what
            )
        else:
            weight = linear.weight.detach()[:, keep.to(linear.weight.device)]
            bias = compensate(linear.weight, linear.bias, keep, stats) if can_bias else linear.bias
        if bias is not None and linear.bias is None:
            self.added[part] = True
        self.edits.replace(self.s.blocks[i], path, new_linear(linear, weight, bias))

    def prune_block(self, i: int, counts: Counts, observed: Observed) -> None:
        s, layout, stats = self.s, self.s.layout, observed.stats
        ch, hd = self.scores(i, observed)
        if counts.channels:
            keep = lowest(ch, counts.channels)
            self._consumer(i, "mlp", layout.consumer, keep, stats["mlp"])
            for p in layout.producers:
                self.edits.replace(s.blocks[i], p, rows(s.linear(i, p), keep))
        if counts.heads:
            self.prune_heads(i, counts.heads, hd, stats["attention"])

    def prune_heads(self, i: int, count: int, scores: Tensor, stats: InputStats) -> None:
        """Block i loses the `count` lowest-scored query heads of every key/value group (multi-head
        attention: in all): o_proj refitted or compensated on `stats`, q rows (k and v rows under
        multi-head attention) sliced, per-head attention sinks (gpt-oss) sliced, the attention's head
        bookkeeping set."""
        s, layout = self.s, self.s.layout
        heads = kept_heads(s, scores, count)
        cols = _head_columns(heads, s.head_dim)
        attention = s.blocks[i].get_submodule(layout.attention)
        sinks = getattr(attention, "sinks", None)
        if isinstance(sinks, nn.Parameter) and tuple(sinks.shape) == (s.block_heads(i),):
            kept = sinks.detach()[heads.to(sinks.device)].clone()
            self.edits.set(attention, "sinks", nn.Parameter(kept, sinks.requires_grad))
        self._consumer(i, "attention", layout.o, cols, stats)
        sliced = (layout.q,) if s.group > 1 else dict.fromkeys((layout.q, layout.k, layout.v))
        qkv_rows = s.qkv_rows(i, cols)
        for p in sliced:
            self.edits.replace(s.blocks[i], p, rows(s.linear(i, p), qkv_rows))
        set_head_attrs(self.edits.set, attention, len(heads), s)

    def give_biases(self) -> list[str]:
        """Where a consumer was given a bias through a config flag (Llama's mlp_bias, attention_bias):
        every Linear that flag governs, in every block, gets one (zeros). Returns the flags to set."""
        layout, flags = self.s.layout, []
        parts = (("mlp", (*layout.producers, layout.consumer)), ("attention", (layout.q, layout.k, layout.v, layout.o)))
        for part, names in parts:
            if not self.added[part]:
                continue
            for i, block in enumerate(self.s.blocks):
                for n in names:
                    self.edits.replace(block, n, with_bias(self.s.linear(i, n)))
            flags.append(self._bias_flag(part))
        return flags


def dense_scores(
    run: WidthRun, inputs: BlockInputs, counts: list[Counts], progress: Callable[[int], None]
) -> list[tuple[Tensor, Tensor]]:
    """Every block's channel and head scores on the dense model (global allocation's first pass; the
    gradient scores at the candidate of the uniform `counts`); the inputs end as the dense model's last
    block outputs."""
    out = []
    for i, block in enumerate(run.s.blocks):
        with on_device(block, run.device):
            observed = run.observe(i, inputs, counts[i])
            ch, hd = run.scores(i, observed)
            out.append((ch.cpu(), hd.cpu()))
            del observed
            if i + 1 < len(run.s.blocks):
                inputs.advance(block)
        progress(i)
    return out


def sequential(
    run: WidthRun, inputs: BlockInputs, counts: list[Counts], seconds: list[float], progress: Callable[[int], None]
) -> None:
    """The block-sequential width pruning (module docstring)."""
    for i, c in enumerate(counts):
        t0 = time.perf_counter()
        block = run.s.blocks[i]
        with on_device(block, run.device):
            if c.heads or c.channels:
                observed = run.observe(i, inputs, c)
                run.prune_block(i, c, observed)
                del observed
            block = run.s.blocks[i]
            if i + 1 < len(run.s.blocks):
                inputs.advance(block)
        seconds.append(time.perf_counter() - t0)
        progress(i)
