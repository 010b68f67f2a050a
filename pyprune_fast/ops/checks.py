"""Argument checks shared by the ops, masks and sparse modules. Each raises TypeError or ValueError
naming the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FLOAT_TYPES", "SCORE_TYPES", "check_features_24"]

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORE_TYPES = FLOAT_TYPES + (torch.float64,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_list(name: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    """A list or tuple of tensors as a list (TypeError otherwise; the elements are checked elsewhere)."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    return list(tensors)


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    return t


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def check_dtypes(name: str, tensors: Sequence[Tensor] | Tensor, types: tuple[torch.dtype, ...] = FLOAT_TYPES) -> None:
    """Every element a Tensor of one of `types` (a single Tensor: named without an index)."""
    named = [(name, tensors)] if isinstance(tensors, Tensor) else [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]
    for label, t in named:
        check_tensor(label, t)
        if t.dtype not in types:
            allowed = ", ".join(dtype_name(d) for d in types)
            raise TypeError(f"{label} must be one of {allowed}, got {dtype_name(t.dtype)}")


def check_same_device(named: dict[str, Sequence[Tensor]]) -> None:
    """All tensors of all the named lists on one device."""
    first = None
    for name, tensors in named.items():
        for i, t in enumerate(tensors):
            if first is None:
                first = (f"{name}[{i}]", t.device)
            elif t.device != first[1]:
                raise ValueError(f"{name}[{i}] is on {t.device} but {first[0]} is on {first[1]}")


def check_one_dtype(name: str, tensors: Sequence[Tensor]) -> None:
    for i, t in enumerate(tensors):
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{name}[{i}] is {t.dtype} but {name}[0] is {tensors[0].dtype}; all must have one dtype")


def check_k(k: object, total: int) -> int:
    """A 1-based rank among `total` elements."""
    k = check_int("k", k)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of elements), got {k}")
    return k


def check_n_m(n: object, m: object) -> tuple[int, int]:
    """n and m of an N:M pattern: ints with 0 <= n <= m and m >= 1."""
    n, m = check_int("n", n), check_int("m", m)
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"n:m must satisfy 0 <= n <= m and m >= 1, got {n}:{m}")
    return n, m


def check_compressed(values: Tensor, meta: Tensor) -> tuple[int, int]:
    """(out, in) of a 2:4-compressed weight: values [out, in/2] float, meta int32 [out/16, in/32, 16]."""
    check_tensor("values", values)
    check_tensor("meta", meta)
    check_dtypes("values", values)
    if values.dim() != 2 or values.shape[0] % 16 or (2 * values.shape[1]) % 32:
        raise ValueError(
            f"values must be [out, in/2] with out % 16 == 0 and in % 32 == 0, got shape {tuple(values.shape)}"
        )
    out, cols = values.shape[0], 2 * values.shape[1]
    if meta.dtype != torch.int32:
        raise TypeError(f"meta must be int32, got {meta.dtype}")
    if tuple(meta.shape) != (out // 16, cols // 32, 16):
        raise ValueError(
            f"meta must have shape {(out // 16, cols // 32, 16)} for values of shape {tuple(values.shape)}, "
            f"got {tuple(meta.shape)}"
        )
    if meta.device != values.device:
        raise ValueError(f"meta is on {meta.device} but values is on {values.device}")
    return out, cols


def check_features_24(in_features: int, out_features: int, what: str) -> None:
    """The shape limit of sparse24_linear (its kernel's 64-wide tiles): in and out multiples of 64.

    Args:
        in_features, out_features: the layer's sizes.
        what: how the error names the layer.
    """
    if in_features % 64 or out_features % 64:
        raise ValueError(
            f"{what} needs in and out features that are multiples of 64, got in={in_features}, out={out_features}"
        )


def raise_on_nan(nan: Tensor, names: Sequence[str]) -> None:
    """ValueError naming the first tensor with a non-zero NaN count (nan: int [len(names)]); one
    synchronization for the whole call."""
    if bool(nan.any()):
        first = int(torch.nonzero(nan)[0, 0])
        raise ValueError(f"{names[first]} contains NaN ({int(nan[first])} values); scores must not be NaN")
