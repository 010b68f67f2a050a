"""Exact selection over many tensors: the k-th smallest value by radix select (no concatenation, no
sort), and the keep-masks built on it (global threshold, per tensor, per row).

`kth_smallest` is the checked user op. The mask functions below it are building blocks: they trust
their arguments (one floating dtype, one device, valid counts), which `pyprune_fast.masks` checks
before calling them; use `masks.global_unstructured`, `masks.layerwise` and `masks.per_row` instead.

CUDA graphs: on CUDA the kernels read a table of pointers copied from pinned host memory on every call,
which a graph replay cannot repeat, so these ops raise during a capture (torch.cuda.graph, torch.compile's
mode="reduce-overhead"); call them outside the captured region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from .checks import (
    SCORE_TYPES,
    as_list,
    check_dtypes,
    check_int,
    check_k,
    check_one_dtype,
    check_same_device,
    check_tensor,
    dtype_name,
    raise_on_nan,
)
from .dispatch import call, native, when_loaded

__all__ = [
    "kth_smallest",
    "radix_histogram",
    "select_counts",
    "threshold_masks",
    "threshold_apply_",
    "layerwise_masks",
    "per_row_masks",
]


def _checked(tensors: Sequence[Tensor]) -> list[Tensor]:
    """`tensors` as a list, checked: at least one, floating scores of one dtype on one device."""
    tensors = as_list("tensors", tensors)
    check_dtypes("tensors", tensors, SCORE_TYPES)
    if not tensors:
        raise ValueError("tensors must hold at least one tensor")
    check_one_dtype("tensors", tensors)
    check_same_device({"tensors": tensors})
    return tensors


def kth_smallest(tensors: Sequence[Tensor], k: int, *, group: object = None) -> Tensor:
    """The exact k-th smallest value (1-based) over all elements of all tensors, as a 0-d tensor of
    their dtype, without concatenating or sorting them.

    With `group=` (a torch.distributed ProcessGroup, or torch.distributed.group.WORLD) the tensors
    are this rank's part of the scores: k ranks all elements of all ranks (k, the same on every rank),
    every rank gets the same value, and only radix histograms are exchanged (never the scores; see
    `pyprune_fast.distributed.kth_smallest`). A rank may hold no tensors; dtypes are promoted across
    ranks. None (the default): no communication.

    Radix select on order-preserving integer keys: a few histogram passes over the tensors (one per
    16-bit digit on CPU, per 11-bit digit on CUDA), memory O(threads × bins). float32/float16/bfloat16/
    float64, any shapes and strides, empty tensors allowed, more than 2³¹ elements per tensor or in
    total. -0.0 and 0.0 are one value, ±inf ordinary values; NaN is refused (ValueError naming the
    tensor).

    Args:
        tensors: the score tensors (this rank's, with group=).
        k: the rank of the value, 1-based, over all elements (of all ranks).
        group: a torch.distributed ProcessGroup, or None.

    Returns:
        The value, a 0-d tensor.
    """
    if group is not None:
        from .. import distributed  # distributed builds on this module

        return distributed.kth_smallest(tensors, k, group=group)
    tensors = _checked(tensors)
    k = check_k(k, sum(t.numel() for t in tensors))
    return select_counts(tensors, k)[0]


def radix_histogram(tensors: Sequence[Tensor], digit: int, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """One pass of a radix select whose passes are combined elsewhere (e.g. summed over processes):
    (hist, nan) with hist int64 [65536] = the number of non-NaN elements of all tensors whose order
    key (`reference.order_keys`: unsigned, order-preserving, -0.0 = 0.0) has the digits above 16-bit
    digit `digit` equal to those of `prefix`, by the value of that digit, and nan int64 [len(tensors)]
    = the NaN count per tensor (digit 0; zeros for later digits).

    Digits are 16 bits on every backend and machine, most significant first: float16/bfloat16 have
    digit 0 only, float32 digits 0-1, float64 0-3. `prefix` is the key found so far as an unsigned
    int (its bits below the digit are ignored). The tensors: one dtype, one device, at least one.

    Args:
        tensors: one dtype, one device, at least one tensor.
        digit: the 16-bit digit counted, 0 the most significant.
        prefix: the key found so far.

    Returns:
        (hist int64 [65536], nan int64 [len(tensors)]).
    """
    tensors = _checked(tensors)
    width = reference.radix_width(tensors[0].dtype)
    digit = check_int("digit", digit)
    if not 0 <= digit < width // reference.RADIX_DIGIT_BITS:
        raise ValueError(
            f"digit must be in [0, {width // reference.RADIX_DIGIT_BITS}) for {tensors[0].dtype}, got {digit}"
        )
    prefix = check_int("prefix", prefix)
    if not 0 <= prefix < 1 << width:
        raise ValueError(f"prefix must be a {width}-bit key in [0, 2^{width}), got {prefix}")
    signed = prefix - (1 << 64) if prefix >= 1 << 63 else prefix  # the int64 bit pattern of the key
    hist, nan = call("radix_histogram", tensors, list(tensors), digit, signed)
    return hist, nan


def select_counts(tensors: Sequence[Tensor], k: int, names: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
    """Building block (arguments not checked). (value, counts): the k-th smallest value over all
    tensors and int64 [elements < value, elements == value], on the tensors' device. NaN is refused
    with a ValueError naming the tensor (`names`, default tensors[i]).

    Args:
        tensors: the score tensors.
        k: the rank of the value, 1-based.
        names: how errors name the tensors.

    Returns:
        (value, counts).
    """
    names = names or [f"tensors[{i}]" for i in range(len(tensors))]
    value, counts, nan = call("kth_smallest_counts", tensors, list(tensors), int(k))
    raise_on_nan(nan, names)
    return value, counts


def check_threshold(tensors: Sequence[Tensor], value: Tensor, counts: Tensor) -> None:
    """value and counts as `select_counts(tensors, k)` returns them: value one element of the tensors'
    dtype, counts int64 [2], each on the tensors' device or the CPU (metadata only, no synchronization)."""
    check_tensor("value", value)
    check_tensor("counts", counts)
    if not tensors:
        return
    dtype, device = tensors[0].dtype, tensors[0].device
    if value.dtype != dtype:
        raise TypeError(f"value must be {dtype_name(dtype)} (the scores' dtype), got {dtype_name(value.dtype)}")
    if value.numel() != 1:
        raise ValueError(f"value must hold one element (the k-th smallest score), got shape {tuple(value.shape)}")
    if counts.dtype != torch.int64:
        raise TypeError(f"counts must be int64, got {dtype_name(counts.dtype)}")
    if tuple(counts.shape) != (2,):
        raise ValueError(f"counts must have shape (2,) (elements below and equal to value), got {tuple(counts.shape)}")
    for name, t in (("value", value), ("counts", counts)):
        if t.device != device and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device} but the scores are on {device}")


def threshold_masks(tensors: Sequence[Tensor], value: Tensor, counts: Tensor, k: int) -> list[Tensor]:
    """Building block (the tensors and k are trusted; value and counts checked by `check_threshold`).
    Keep-masks (bool, shaped like the tensors) with the k lowest entries of all tensors pruned; among
    entries equal to the threshold the lower flat index (tensors in order, each row-major) is pruned first.
    value/counts: `select_counts(tensors, k)`. One fused compare pass; a second (tie-counting) pass only
    when the threshold value is partly pruned.

    Args:
        tensors: the score tensors.
        value, counts: select_counts(tensors, k).
        k: the number of entries pruned.

    Returns:
        Bool keep-masks shaped like the tensors.
    """
    check_threshold(tensors, value, counts)
    return list(call("threshold_masks", tensors, list(tensors), value, counts, int(k)))


@torch.no_grad()
def threshold_apply_(
    params: Sequence[Tensor], tensors: Sequence[Tensor], value: Tensor, counts: Tensor, k: int
) -> None:
    """Building block (tensors and k trusted; value, counts and the params' dtypes checked). The selection
    of `threshold_masks` applied in place: params[i] entries whose score tensors[i] entry is pruned are set
    to zero, without materializing the masks. params: float32/float16/bfloat16/float64.

    Args:
        params: the tensors zeroed in place, shaped like the scores.
        tensors: the score tensors.
        value, counts: select_counts(tensors, k).
        k: the number of entries pruned.
    """
    check_threshold(tensors, value, counts)
    check_dtypes("params", params, SCORE_TYPES)
    if not native("threshold_apply_", tensors):
        for p, m in zip(params, reference.threshold_masks(tensors, value, counts, int(k))):
            p.masked_fill_(~m, 0)
        return
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    torch.ops.pyprune_fast.threshold_apply_(work, list(tensors), value, counts, int(k))
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def layerwise_masks(tensors: Sequence[Tensor], ks: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """Building block (arguments not checked). Each tensor its own group: the ks[i] lowest entries of
    tensors[i] pruned (ties by flat index); NaN refused naming the tensor.

    Args:
        tensors: the score tensors.
        ks: the entries pruned in each.
        names: how errors name the tensors.

    Returns:
        Bool keep-masks shaped like the tensors.
    """
    masks, nan = call("layerwise_masks", tensors, list(tensors), [int(k) for k in ks])
    raise_on_nan(nan, names)
    return list(masks)


def per_row_masks(tensors: Sequence[Tensor], counts: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """Building block (arguments not checked). Each row of each tensor (viewed as (size(0), -1)) its
    own group: counts[i] lowest entries of every row of tensors[i] pruned, ties by lower index; NaN
    refused naming the tensor.

    Args:
        tensors: the score tensors.
        counts: the entries pruned in each row of each tensor.
        names: how errors name the tensors.

    Returns:
        Bool keep-masks shaped like the tensors.
    """
    masks, nan = call("per_row_masks", tensors, list(tensors), [int(c) for c in counts])
    raise_on_nan(nan, names)
    return list(masks)


def _fake_kth_smallest_counts(xs, k):
    return (
        xs[0].new_empty(()),
        xs[0].new_empty((2,), dtype=torch.int64),
        xs[0].new_empty((len(xs),), dtype=torch.int64),
    )


def _fake_radix_histogram(xs, digit, prefix):
    return xs[0].new_empty((reference.RADIX_BINS,), dtype=torch.int64), xs[0].new_empty((len(xs),), dtype=torch.int64)


def _fake_threshold_masks(xs, value, counts, k):
    return [torch.empty_like(x, dtype=torch.bool, memory_format=torch.contiguous_format) for x in xs]


def _fake_threshold_apply_(params, xs, value, counts, k):
    return None


def _fake_group_masks(xs, counts):
    return _fake_threshold_masks(xs, None, None, 0), xs[0].new_empty((len(xs),), dtype=torch.int64)


@when_loaded
def _register() -> None:
    torch.library.register_fake("pyprune_fast::kth_smallest_counts", _fake_kth_smallest_counts)
    if hasattr(torch.ops.pyprune_fast, "radix_histogram"):  # a library built before it: the reference serves
        torch.library.register_fake("pyprune_fast::radix_histogram", _fake_radix_histogram)
    torch.library.register_fake("pyprune_fast::threshold_masks", _fake_threshold_masks)
    torch.library.register_fake("pyprune_fast::threshold_apply_", _fake_threshold_apply_)
    torch.library.register_fake("pyprune_fast::layerwise_masks", _fake_group_masks)
    torch.library.register_fake("pyprune_fast::per_row_masks", _fake_group_masks)
