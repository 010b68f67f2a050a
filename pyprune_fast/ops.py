"""The Python face of every op: argument checks, dispatch to the compiled kernels
(`torch.ops.pyprune_fast.*`) or to `reference`, and the fake (meta) implementations that make the ops
work under `torch.compile` and `torch.library.opcheck`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _extension, reference

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _native(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and _extension.native_available(tensors[0].device.type)


def _as_list(name: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _check_float_list(name: str, tensors: Sequence[Tensor], types: tuple[torch.dtype, ...] = FLOAT_TYPES) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
        if t.dtype not in types:
            allowed = ", ".join(str(d).replace("torch.", "") for d in types)
            raise TypeError(f"{name}[{i}] must be one of {allowed}, got {str(t.dtype).replace('torch.', '')}")


def _check_same_device(named: dict[str, Sequence[Tensor]]) -> None:
    first = None
    for name, tensors in named.items():
        for i, t in enumerate(tensors):
            if first is None:
                first = (f"{name}[{i}]", t.device)
            elif t.device != first[1]:
                raise ValueError(f"{name}[{i}] is on {t.device} but {first[0]} is on {first[1]}")


def _check_saliency_args(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    _check_float_list("grads", grads)
    _check_float_list("weights", weights)
    if len(grads) != len(weights):
        raise ValueError(f"grads and weights must have the same length, got {len(grads)} and {len(weights)}")
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g.shape != w.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has shape {tuple(w.shape)}")
        if g.dtype != w.dtype:
            raise TypeError(f"grads[{i}] is {g.dtype} but weights[{i}] is {w.dtype}")
    _check_same_device({"grads": grads, "weights": weights})


def saliency(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> tuple[list[Tensor], Stats]:
    """Fused `|g ⊙ w|` over lists of tensors, with the statistics of all results in the same pass.

    Returns float32 scores shaped like the weights and `Stats` (count, sum, sumsq, min, max,
    nonfinite, nan) over all of them. Inputs: float32/float16/bfloat16, any strides; one kernel call
    for the whole list.
    """
    grads, weights = _as_list("grads", grads), _as_list("weights", weights)
    _check_saliency_args(grads, weights)
    if _native(weights):
        scores, stats = torch.ops.pyprune_fast.saliency(grads, weights)
    else:
        scores, stats = reference.saliency(grads, weights)
    return list(scores), Stats.from_tensor(stats)


def saliency_accumulate_(
    acc: Sequence[Tensor], grads: Sequence[Tensor], weights: Sequence[Tensor], *, scale: float = 1.0, power: int = 1
) -> Stats:
    """In place `acc_i += scale · |g_i ⊙ w_i|^power` (power 1 or 2; acc float32, shaped like the
    weights) and the statistics of the updated accumulators, in one pass."""
    acc, grads, weights = _as_list("acc", acc), _as_list("grads", grads), _as_list("weights", weights)
    _check_saliency_args(grads, weights)
    _check_float_list("acc", acc, (torch.float32,))
    if len(acc) != len(weights):
        raise ValueError(f"acc and weights must have the same length, got {len(acc)} and {len(weights)}")
    for i, (a, w) in enumerate(zip(acc, weights)):
        if a.shape != w.shape:
            raise ValueError(f"acc[{i}] has shape {tuple(a.shape)} but weights[{i}] has shape {tuple(w.shape)}")
    _check_same_device({"acc": acc, "weights": weights})
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if _native(weights):
        stats = torch.ops.pyprune_fast.saliency_accumulate_(acc, grads, weights, float(scale), int(power))
    else:
        stats = reference.saliency_accumulate_(acc, grads, weights, float(scale), int(power))
    return Stats.from_tensor(stats)


def _check_matrices(name: str, tensors: Sequence[Tensor]) -> None:
    _check_float_list(name, tensors, FLOAT_TYPES + (torch.float64,))
    for i, t in enumerate(tensors):
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}] must be a 2-d [N, D] matrix, got shape {tuple(t.shape)}")


def svd_mean(features: Tensor) -> Tensor:
    """Mean singular value of each matrix: F [B, N, D] -> [B] (or [N, D] -> 0-d), differentiable.
    Half inputs are computed in float32."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be [N, D] or [B, N, D], got shape {tuple(features.shape)}")
    _check_float_list("features", [features], FLOAT_TYPES + (torch.float64,))
    return reference.svd_mean(features)


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """svd_mean of each [N, D_l] matrix of a list (the layers of one batch), as a 1-d tensor."""
    features = _as_list("features", features)
    if not features:
        raise ValueError("features must hold at least one [N, D] matrix")
    _check_matrices("features", features)
    return reference.svd_mean_list(features)


SELECT_TYPES = FLOAT_TYPES + (torch.float64,)


def _check_select_args(name: str, tensors: Sequence[Tensor]) -> None:
    _check_float_list(name, tensors, SELECT_TYPES)
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor")
    for i, t in enumerate(tensors):
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{name}[{i}] is {t.dtype} but {name}[0] is {tensors[0].dtype}; all must have one dtype")
    _check_same_device({name: tensors})


def _raise_on_nan(nan: Tensor, names: Sequence[str]) -> None:
    """One synchronization for the whole call: ValueError naming the first tensor holding NaN."""
    if bool(nan.any()):
        first = int(torch.nonzero(nan)[0, 0])
        raise ValueError(f"{names[first]} contains NaN ({int(nan[first])} values); scores must not be NaN")


def select_counts(tensors: Sequence[Tensor], k: int, names: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
    """(value, counts): the k-th smallest value over all tensors and int64 [elements < value, elements ==
    value], on the tensors' device. NaN is refused with a ValueError naming the tensor."""
    names = names or [f"tensors[{i}]" for i in range(len(tensors))]
    if _native(tensors):
        value, counts, nan = torch.ops.pyprune_fast.kth_smallest_counts(list(tensors), int(k))
    else:
        value, counts, nan = reference.kth_smallest_counts(tensors, int(k))
    _raise_on_nan(nan, names)
    return value, counts


def _check_k(k: int, total: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of elements), got {k}")


def kth_smallest(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The exact k-th smallest value (1-based) over all elements of all tensors, as a 0-d tensor of
    their dtype, without concatenating or sorting them.

    Radix select on order-preserving integer keys: a few histogram passes over the tensors (one per
    16-bit digit on CPU, per 11-bit digit on CUDA), memory O(threads × bins). float32/float16/bfloat16/
    float64, any shapes and strides, empty tensors allowed, more than 2³¹ elements per tensor or in
    total. -0.0 and 0.0 are one value, ±inf ordinary values; NaN is refused (ValueError naming the
    tensor)."""
    tensors = _as_list("tensors", tensors)
    _check_select_args("tensors", tensors)
    _check_k(k, sum(t.numel() for t in tensors))
    return select_counts(tensors, k)[0]


def threshold_masks(tensors: Sequence[Tensor], value: Tensor, counts: Tensor, k: int) -> list[Tensor]:
    """Keep-masks (bool, shaped like the tensors) with the k lowest entries of all tensors pruned; among
    entries equal to the threshold the lower flat index (tensors in order, each row-major) is pruned
    first. value/counts: `select_counts(tensors, k)`. One fused compare pass; a second (tie-counting)
    pass only when the threshold value is partly pruned."""
    if _native(tensors):
        return list(torch.ops.pyprune_fast.threshold_masks(list(tensors), value, counts, int(k)))
    return reference.threshold_masks(tensors, value, counts, int(k))


@torch.no_grad()
def threshold_apply_(
    params: Sequence[Tensor], tensors: Sequence[Tensor], value: Tensor, counts: Tensor, k: int
) -> None:
    """The selection of `threshold_masks` applied in place: params[i] entries whose score tensors[i]
    entry is pruned are set to zero, without materializing the masks."""
    if not _native(tensors):
        for p, m in zip(params, reference.threshold_masks(tensors, value, counts, int(k))):
            p.masked_fill_(~m, 0)
        return
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    torch.ops.pyprune_fast.threshold_apply_(work, list(tensors), value, counts, int(k))
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def layerwise_masks(tensors: Sequence[Tensor], ks: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """Each tensor its own group: the ks[i] lowest entries of tensors[i] pruned (ties by flat index)."""
    if _native(tensors):
        masks, nan = torch.ops.pyprune_fast.layerwise_masks(list(tensors), [int(k) for k in ks])
    else:
        masks, nan = reference.layerwise_masks(tensors, ks)
    _raise_on_nan(nan, names)
    return list(masks)


def per_row_masks(tensors: Sequence[Tensor], counts: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """Each row of each tensor (viewed as (size(0), -1)) its own group: counts[i] lowest entries of
    every row of tensors[i] pruned, ties by lower index."""
    if _native(tensors):
        masks, nan = torch.ops.pyprune_fast.per_row_masks(list(tensors), [int(c) for c in counts])
    else:
        masks, nan = reference.per_row_masks(tensors, counts)
    _raise_on_nan(nan, names)
    return list(masks)


# --- fake (meta) implementations, registered once the library is loaded -------------------------


def _stats_like(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0].new_empty((len(reference.STATS_FIELDS),), dtype=torch.float64)


def _fake_saliency(grads, weights):
    return [torch.empty_like(w, dtype=torch.float32) for w in weights], _stats_like(weights)


def _fake_saliency_accumulate_(acc, grads, weights, scale=1.0, power=1):
    return _stats_like(weights)


def _fake_kth_smallest_counts(xs, k):
    return (
        xs[0].new_empty(()),
        xs[0].new_empty((2,), dtype=torch.int64),
        xs[0].new_empty((len(xs),), dtype=torch.int64),
    )


def _fake_threshold_masks(xs, value, counts, k):
    return [torch.empty_like(x, dtype=torch.bool, memory_format=torch.contiguous_format) for x in xs]


def _fake_threshold_apply_(params, xs, value, counts, k):
    return None


def _fake_group_masks(xs, counts):
    return _fake_threshold_masks(xs, None, None, 0), xs[0].new_empty((len(xs),), dtype=torch.int64)


def _register_python_side() -> None:
    """Called by _extension after the compiled library has defined the ops."""
    torch.library.register_fake("pyprune_fast::saliency", _fake_saliency)
    torch.library.register_fake("pyprune_fast::saliency_accumulate_", _fake_saliency_accumulate_)
    torch.library.register_fake("pyprune_fast::kth_smallest_counts", _fake_kth_smallest_counts)
    torch.library.register_fake("pyprune_fast::threshold_masks", _fake_threshold_masks)
    torch.library.register_fake("pyprune_fast::threshold_apply_", _fake_threshold_apply_)
    torch.library.register_fake("pyprune_fast::layerwise_masks", _fake_group_masks)
    torch.library.register_fake("pyprune_fast::per_row_masks", _fake_group_masks)
