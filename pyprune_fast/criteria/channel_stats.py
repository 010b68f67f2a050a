"""Per-channel feature-map statistics of one layer, accumulated over batches with whole-tensor ops.

A layer's output is viewed as N samples × C output channels × S positions per channel (H·W for a
Conv2d, the tokens for a Linear applied to N × T × C, 1 for a Linear applied to N × C), in the
layout the layer produced it: (N, C, S) for convolutions, (N, S, C) for Linear layers, so that no
reduction runs over a transposed view. Every update reduces the whole batch for all channels at once
(sums over the sample and position dims, no loop over channels) in float32 (float64 outputs stay
float64), and from the second batch on the sums are kept in float64 so that many batches add up
without drift."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .engine import Job


def sample_view(output: Tensor, module: nn.Module) -> Tensor:
    """The 3-D view of a layer's output: (N, C, S) for conv outputs N × C × spatial, (N, S, C) for
    Linear outputs N × ... × C (batch first, the middle dims are positions). Unbatched outputs get N = 1."""
    if isinstance(module, nn.Linear):
        if output.dim() == 1:
            output = output.unsqueeze(0)
        return output.reshape(output.shape[0], -1, output.shape[-1])
    if output.dim() == len(module.kernel_size) + 1:
        output = output.unsqueeze(0)
    return output.reshape(output.shape[0], output.shape[1], -1)


def channel_view(output: Tensor, module: nn.Module) -> Tensor:
    """The (N, C, S) view of a layer's output, channels second whatever the layer."""
    x = sample_view(output, module)
    return x.transpose(1, 2) if isinstance(module, nn.Linear) else x


def _accumulable(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def map_ranks(output: Tensor, module: nn.Module) -> tuple[Tensor, int]:
    """(Σ ranks per channel, number of ranks summed) for one batch, all channels in one batched
    torch.linalg.matrix_rank call (float32, its default tolerance).

    Conv2d/Conv3d: the rank of each sample's H × W map (D·H × W for 3-D maps), N ranks per channel.
    Linear and Conv1d, whose per-sample map is a vector (rank 0 or 1): the rank of the channel's
    N × positions matrix over the batch (samples × tokens), one rank per channel per batch."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        n, c = output.shape[:2]
        maps = output.detach().float().reshape(n, c, -1, output.shape[-1])
        return torch.linalg.matrix_rank(maps).sum(0, dtype=torch.float64), n
    view = channel_view(output.detach().float(), module)
    return torch.linalg.matrix_rank(view.transpose(0, 1)).double(), 1


class ChannelStats:
    """Sums over the samples seen so far, per channel of one layer. Only the sums a criterion asks
    for are kept. `add_output` counts the samples of every batch and feeds zeros/ranks/x_sum;
    `add_gradient` (after `add_output` on the same output) feeds g_sum/dot/dot_sq; `add_projection`
    (after `add_output`, given ḡ) feeds proj_sq. Per-position sums (x_sum, g_sum) are kept in the
    layer's layout, (C, S) or (S, C): `position_dim` is their position dim."""

    def __init__(self, module: nn.Module, needs: set[str]) -> None:
        self.module = module
        self.needs = needs
        self.position_dim = 0 if isinstance(module, nn.Linear) else 1
        self.samples = 0
        self.positions = 0
        self.rank_count = 0
        self.sums: dict[str, Tensor] = {}

    def _add(self, key: str, value: Tensor) -> None:
        """value: a fresh sum over one batch. The first is kept as it is (float32, or an integer count:
        no copy, half the memory of float64 during that batch's passes); from the second on the sum
        is float64 and each batch's is added in place (type promotion, no float64 temporary)."""
        total = self.sums.get(key)
        if total is None:
            self.sums[key] = value
            return
        if total.dtype != torch.float64:
            total = self.sums[key] = total.double()
        total += value

    def total(self, key: str) -> Tensor:
        """Σ over the samples seen, float64."""
        return self.sums[key].double()

    def add_output(self, output: Tensor) -> None:
        """Forward-only sums: zeros = Σ_{n,s} [x ≤ 0] (what a ReLU zeroes), ranks, x_sum = Σ_n x_n."""
        x = sample_view(output.detach(), self.module)
        pos = self.position_dim + 1
        self.samples += x.shape[0]
        self.positions += x.shape[0] * x.shape[pos]
        if "zeros" in self.needs:
            count = torch.int32 if x.shape[0] * x.shape[pos] < 2**31 else torch.int64
            self._add("zeros", (x <= 0).sum((0, pos), dtype=count))
        if "ranks" in self.needs:
            ranks, n = map_ranks(output, self.module)
            self._add("ranks", ranks)
            self.rank_count += n
        if "x_sum" in self.needs:
            self._add("x_sum", _accumulable(x).sum(0))

    def add_gradient(self, output: Tensor, grad: Tensor) -> None:
        """Sums with ∇_n = ∂L/∂x_n: g_sum = Σ_n ∇_n, dot = Σ_n x_nᵀ∇_n, dot_sq = Σ_n (x_nᵀ∇_n)²."""
        g = _accumulable(sample_view(grad.detach(), self.module))
        if "g_sum" in self.needs:
            self._add("g_sum", g.sum(0))
        if "dot" in self.needs or "dot_sq" in self.needs:
            x = _accumulable(sample_view(output.detach(), self.module))
            dots = (x * g).sum(self.position_dim + 1)
            if "dot" in self.needs:
                self._add("dot", dots.sum(0))
            if "dot_sq" in self.needs:
                self._add("dot_sq", dots.square().sum(0))

    def add_projection(self, output: Tensor, g_mean: Tensor) -> None:
        """proj_sq = Σ_n (x_nᵀ ḡ)² for a fixed per-channel direction ḡ (in the layout of g_sum)."""
        x = _accumulable(sample_view(output.detach(), self.module))
        self._add("proj_sq", (x * g_mean.to(x.dtype)).sum(self.position_dim + 1).square().sum(0))

    def mean(self, key: str) -> Tensor:
        """E_n of a per-sample sum (divides by the samples seen)."""
        return self.total(key) / self.samples


def reduce_stats(job: Job, stats: dict[str, ChannelStats], seen: set[str]) -> dict[str, ChannelStats]:
    """The statistics of the layers seen, summed over the ranks of the job's group (every sum and
    count; data-parallel calibration), without a group those of this process. A layer must be called
    on every rank or on none (ValueError on every rank otherwise)."""
    names = list(stats)
    flags = torch.tensor([float(n in seen) for n in names], dtype=torch.float64)
    job.reduce([flags])
    size = 1 if job.comm is None else job.comm.size
    partial = [n for n, f in zip(names, flags.tolist()) if 0 < f < size]
    if partial:
        raise ValueError(f"these layers were called on some ranks only: {partial}")
    kept = {n: stats[n] for n, f in zip(names, flags.tolist()) if f}
    if job.comm is None:
        return kept
    for s in kept.values():  # reduced in float64
        s.sums = {key: s.total(key) for key in sorted(s.sums)}
    sums = [s.sums[key] for s in kept.values() for key in s.sums]
    counts = torch.tensor([[s.samples, s.positions, s.rank_count] for s in kept.values()], dtype=torch.float64)
    job.reduce([*sums, counts])
    for s, (samples, positions, rank_count) in zip(kept.values(), counts.tolist()):
        s.samples, s.positions, s.rank_count = int(samples), int(positions), int(rank_count)
    return kept
