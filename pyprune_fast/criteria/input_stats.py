"""Per-Linear input statistics of a decoder block, accumulated by forward pre-hooks over calibration
batches: the token count n, Wanda's Σ_t x_tj² per input feature j, (for SparseGPT) XᵀX and (for
structured pruning: FLAP's fluctuation, bias compensation, least-squares refits) Σ_t x_tj.

Linear layers that receive the very same input tensor in a forward (q/k/v projections, gate/up of a
gated MLP) share one statistics object: XᵀX is accumulated and stored once for all of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class InputStats:
    """Statistics of the inputs x_t ∈ R^d of one Linear (or of several sharing their input), float32."""

    tokens: int
    sumsq: Tensor
    xtx: Tensor | None
    sums: Tensor | None = None

    @classmethod
    def empty(cls, features: int, device: torch.device, hessian: bool, sums: bool = False) -> InputStats:
        xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None
        total = torch.zeros(features, dtype=torch.float32, device=device) if sums else None
        return cls(0, torch.zeros(features, dtype=torch.float32, device=device), xtx, total)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sumsq.add_(x.pow(2).sum(0))
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        if self.sums is not None:
            self.sums.add_(x.sum(0))

    def norms(self) -> Tensor:
        """‖X_j‖₂ over every calibration token: Wanda's input scale."""
        return self.sumsq.sqrt()

    def mean(self) -> Tensor:
        """E_t[x_tj] over every calibration token (needs the "sums" observable)."""
        if self.sums is None:
            raise ValueError("these statistics were collected without Σx (the 'sums' observable)")
        return self.sums / max(self.tokens, 1)

    def variance(self) -> Tensor:
        """The variance of each input feature over the calibration tokens, E[x²] − E[x]² (≥ 0)."""
        n = max(self.tokens, 1)
        return (self.sumsq / n - self.mean().pow(2)).clamp_min(0)

    def hessian(self) -> Tensor:
        """H = 2 XᵀX / n, the Hessian of the layer-wise reconstruction error ‖WX − ŴX‖² (n tokens)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without XᵀX (hessian=False)")
        return self.xtx * (2.0 / max(self.tokens, 1))

    def nbytes(self) -> int:
        extra = (0 if self.xtx is None else self.xtx.numel()) + (0 if self.sums is None else self.sums.numel())
        return 4 * (self.sumsq.numel() + extra)


class StatsCollector:
    """Context manager: hooks on `linears` (name -> nn.Linear of `block`) that accumulate their input
    statistics while the block runs; `stats[name]` holds each Linear's (possibly shared) InputStats.
    `observes`: the statistics a method reads, "norms" (always collected), "xtx" (XᵀX) and "sums" (Σx)."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear], observes: Iterable[str]) -> None:
        observes = frozenset(observes)
        self.block, self.linears, self.hessian = block, linears, "xtx" in observes
        self.sums = "sums" in observes
        self.stats: dict[str, InputStats] = {}
        self._aliases: set[str] = set()
        self._seen: dict[int, tuple[Tensor, str]] = {}
        self._handles: list = []

    def _on_input(self, name: str, x: Tensor) -> None:
        if name in self._aliases:
            return
        previous = self._seen.get(id(x))
        if previous is not None and name not in self.stats:
            self.stats[name] = self.stats[previous[1]]
            self._aliases.add(name)
            return
        if name not in self.stats:
            self.stats[name] = InputStats.empty(x.shape[-1], x.device, self.hessian, self.sums)
        self.stats[name].add(x)
        self._seen[id(x)] = (x, name)

    def __enter__(self) -> dict[str, InputStats]:
        for name, linear in self.linears.items():

            def hook(_module, args, kwargs, name=name):
                x = args[0] if args else kwargs["input"]
                self._on_input(name, x)

            self._handles.append(linear.register_forward_pre_hook(hook, with_kwargs=True))
        self._handles.append(self.block.register_forward_hook(lambda *_: self._seen.clear()))
        return self.stats

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def reduce(self, comm) -> None:
        """Sums every statistic over the ranks of a `distributed.Communicator` (data-parallel
        calibration: each rank ran its own share of the batches)."""
        shared = self.shared()
        tokens = torch.tensor([s.tokens for s in shared], dtype=torch.int64)
        sums = [s.sumsq for s in shared] + [s.xtx for s in shared if s.xtx is not None]
        sums += [s.sums for s in shared if s.sums is not None]
        comm.all_reduce_sum_([tokens, *sums])
        for s, n in zip(shared, tokens.tolist()):
            s.tokens = n

    def shared(self) -> list[InputStats]:
        """The distinct statistics objects (one per distinct input)."""
        unique: dict[int, InputStats] = {}
        for s in self.stats.values():
            unique.setdefault(id(s), s)
        return list(unique.values())
