"""The fused saliency op: `|g ⊙ w|` over many tensors in one launch, with the statistics of all the
values written (for standardizing, e.g. AFR) in the same pass.

CUDA graphs: on CUDA the kernels read a table of pointers copied from pinned host memory on every call,
which a graph replay cannot repeat, so these ops raise during a capture (torch.cuda.graph, torch.compile's
mode="reduce-overhead"); call them outside the captured region."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from .checks import as_list, check_dtypes, check_same_device
from .dispatch import call, when_loaded

__all__ = ["Stats", "saliency", "saliency_accumulate_"]


class Stats(NamedTuple):
    """Statistics of the values an op wrote, as 0-d float64 tensors on the op's device (reading them
    does not synchronize until you call `.item()`). sum/sumsq/min/max cover the finite values."""

    count: Tensor
    sum: Tensor
    sumsq: Tensor
    min: Tensor
    max: Tensor
    nonfinite: Tensor
    nan: Tensor

    @classmethod
    def from_tensor(cls, stats: Tensor) -> Stats:
        return cls(*stats.unbind(0))

    def mean(self) -> Tensor:
        """Mean of the finite values."""
        return self.sum / (self.count - self.nonfinite).clamp_min(1)

    def std(self) -> Tensor:
        """Population standard deviation of the finite values."""
        n = (self.count - self.nonfinite).clamp_min(1)
        mean = self.sum / n
        return (self.sumsq / n - mean * mean).clamp_min(0).sqrt()


def _check_pairs(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    check_dtypes("grads", grads)
    check_dtypes("weights", weights)
    if len(grads) != len(weights):
        raise ValueError(f"grads and weights must have the same length, got {len(grads)} and {len(weights)}")
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g.shape != w.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has shape {tuple(w.shape)}")
        if g.dtype != w.dtype:
            raise TypeError(f"grads[{i}] is {g.dtype} but weights[{i}] is {w.dtype}")
    check_same_device({"grads": grads, "weights": weights})


def saliency(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> tuple[list[Tensor], Stats]:
    """Fused `|g ⊙ w|` over lists of tensors, with the statistics of all results in the same pass.

    Returns float32 scores shaped like the weights and `Stats` (count, sum, sumsq, min, max,
    nonfinite, nan) over all of them. Inputs: float32/float16/bfloat16, any strides; one kernel call
    for the whole list.

    Args:
        grads: the gradients, one per weight.
        weights: the weights.

    Returns:
        (float32 scores shaped like the weights, their Stats).
    """
    grads, weights = as_list("grads", grads), as_list("weights", weights)
    _check_pairs(grads, weights)
    scores, stats = call("saliency", weights, grads, weights)
    return list(scores), Stats.from_tensor(stats)


def saliency_accumulate_(
    acc: Sequence[Tensor], grads: Sequence[Tensor], weights: Sequence[Tensor], *, scale: float = 1.0, power: int = 1
) -> Stats:
    """In place `acc_i += scale · |g_i ⊙ w_i|^power` (power 1 or 2; acc float32, shaped like the
    weights) and the statistics of the updated accumulators, in one pass.

    Args:
        acc: float32 accumulators shaped like the weights, updated in place.
        grads: the gradients.
        weights: the weights.
        scale: the factor of each term.
        power: 1 or 2.

    Returns:
        The Stats of the updated accumulators.
    """
    acc, grads, weights = as_list("acc", acc), as_list("grads", grads), as_list("weights", weights)
    _check_pairs(grads, weights)
    check_dtypes("acc", acc, (torch.float32,))
    if len(acc) != len(weights):
        raise ValueError(f"acc and weights must have the same length, got {len(acc)} and {len(weights)}")
    for i, (a, w) in enumerate(zip(acc, weights)):
        if a.shape != w.shape:
            raise ValueError(f"acc[{i}] has shape {tuple(a.shape)} but weights[{i}] has shape {tuple(w.shape)}")
    check_same_device({"acc": acc, "weights": weights})
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    stats = call("saliency_accumulate_", weights, acc, grads, weights, float(scale), int(power))
    return Stats.from_tensor(stats)


def _stats_like(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0].new_empty((len(reference.STATS_FIELDS),), dtype=torch.float64)


def _fake_saliency(grads, weights):
    return [torch.empty_like(w, dtype=torch.float32) for w in weights], _stats_like(weights)


def _fake_saliency_accumulate_(acc, grads, weights, scale=1.0, power=1):
    return _stats_like(weights)


@when_loaded
def _register() -> None:
    torch.library.register_fake("pyprune_fast::saliency", _fake_saliency)
    torch.library.register_fake("pyprune_fast::saliency_accumulate_", _fake_saliency_accumulate_)
