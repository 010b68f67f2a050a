"""Per-channel feature-map statistics of one layer, accumulated over batches with whole-tensor ops.

A layer's output is viewed as (N, C, S): N samples, C output channels, S positions per channel (H·W
for a Conv2d, the tokens for a Linear applied to N × T × C, 1 for a Linear applied to N × C). Every
update reduces the whole batch for all channels at once (sums over the sample and position dims, no
loop over channels); sums are kept in float64 so that many batches add up without drift."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CHANNEL_MODULES = (nn.Linear, *CONV)


def channel_view(output: Tensor, module: nn.Module) -> Tensor:
    """The (N, C, S) view of a layer's output: conv outputs are N × C × spatial, Linear outputs are
    N × ... × C (batch first, the middle dims are positions). Unbatched outputs get N = 1."""
    if isinstance(module, nn.Linear):
        if output.dim() == 1:
            output = output.unsqueeze(0)
        return output.reshape(output.shape[0], -1, output.shape[-1]).transpose(1, 2)
    if output.dim() == len(module.kernel_size) + 1:
        output = output.unsqueeze(0)
    return output.reshape(output.shape[0], output.shape[1], -1)


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
    (after `add_output`, given ḡ) feeds proj_sq."""

    def __init__(self, module: nn.Module, needs: set[str]) -> None:
        self.module = module
        self.needs = needs
        self.samples = 0
        self.positions = 0
        self.rank_count = 0
        self.sums: dict[str, Tensor] = {}

    def _add(self, key: str, value: Tensor) -> None:
        value = value.double()
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()

    def add_output(self, output: Tensor) -> None:
        """Forward-only sums: zeros = Σ_{n,s} [x ≤ 0] (what a ReLU zeroes), ranks, x_sum = Σ_n x_n."""
        x = channel_view(output.detach(), self.module)
        self.samples += x.shape[0]
        self.positions += x.shape[0] * x.shape[2]
        if "zeros" in self.needs:
            self._add("zeros", (x <= 0).sum((0, 2)))
        if "ranks" in self.needs:
            ranks, count = map_ranks(output, self.module)
            self._add("ranks", ranks)
            self.rank_count += count
        if "x_sum" in self.needs:
            self._add("x_sum", x.float().sum(0))

    def add_gradient(self, output: Tensor, grad: Tensor) -> None:
        """Sums with ∇_n = ∂L/∂x_n: g_sum = Σ_n ∇_n, dot = Σ_n x_nᵀ∇_n, dot_sq = Σ_n (x_nᵀ∇_n)²."""
        x = channel_view(output.detach(), self.module).float()
        g = channel_view(grad.detach(), self.module).float()
        if "g_sum" in self.needs:
            self._add("g_sum", g.sum(0))
        if "dot" in self.needs or "dot_sq" in self.needs:
            dots = torch.einsum("ncs,ncs->nc", x, g)
            if "dot" in self.needs:
                self._add("dot", dots.sum(0))
            if "dot_sq" in self.needs:
                self._add("dot_sq", dots.square().sum(0))

    def add_projection(self, output: Tensor, g_mean: Tensor) -> None:
        """proj_sq = Σ_n (x_nᵀ ḡ)² for a fixed per-channel direction ḡ (C × S)."""
        x = channel_view(output.detach(), self.module).float()
        self._add("proj_sq", torch.einsum("ncs,cs->nc", x, g_mean.float()).square().sum(0))

    def mean(self, key: str) -> Tensor:
        """E_n of a per-sample sum (divides by the samples seen)."""
        return self.sums[key] / self.samples
