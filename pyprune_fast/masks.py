"""Keep-masks from scores (True = kept) and their application to a model.

Rule shared by every granularity and backend: exactly round(sparsity × N) entries of each group are
pruned, the lowest scores first; among equal scores the lower flat index (tensors in dict order, each
row-major) is pruned first; NaN is refused, ±inf are ordinary values, -0.0 equals 0.0."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import ops, reference


def check_scores(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Validates a score dict and a sparsity; returns the scores as a plain dict."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    scores = _check_score_types(scores)
    for name, s in scores.items():
        if bool(torch.isnan(s).any()):
            raise _nan_error(name)
    return scores


def _check_score_types(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict of name -> Tensor, got {type(scores).__name__}")
    for name, s in scores.items():
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{name!r}] must be a Tensor, got {type(s).__name__}")
        if not s.is_floating_point():
            raise TypeError(f"scores[{name!r}] must be a floating-point tensor, got {s.dtype}")
    return dict(scores)


def _nan_error(name: str) -> ValueError:
    return ValueError(f"scores[{name!r}] contains NaN; scores must not be NaN")


def global_unstructured(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold over all tensors: exactly round(sparsity × total) entries pruned."""
    return reference.global_unstructured(check_scores(scores, sparsity), float(sparsity))


def layerwise(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Each tensor its own group: exactly round(sparsity × numel) entries pruned in each."""
    return reference.layerwise(check_scores(scores, sparsity), float(sparsity))


def per_row(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Each output row its own group (Wanda's rule): every tensor viewed as (out, -1) and exactly
    round(sparsity × row length) entries pruned in each row."""
    return reference.per_row(check_scores(scores, sparsity), float(sparsity))


def n_m(scores: Mapping[str, Tensor], n: int = 2, m: int = 4) -> dict[str, Tensor]:
    """N:M semi-structured keep-masks: each tensor viewed as (out, -1), groups of m consecutive entries
    along a row, the n highest of each group kept (among equal scores the lower index is kept).
    One fused op for all tensors of a device (ops.nm_mask), NaN detected in the same pass."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise TypeError(f"n and m must be ints, got n={n!r}, m={m!r}")
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"n:m must satisfy 0 <= n <= m and m >= 1, got {n}:{m}")
    scores = _check_score_types(scores)
    for name, s in scores.items():
        row = reference.rows_of(s).shape[1]
        if row % m:
            raise ValueError(f"scores[{name!r}]: row length {row} (shape {tuple(s.shape)}) is not divisible by m={m}")
    by_device: dict[torch.device, list[str]] = {}
    for name, s in scores.items():
        by_device.setdefault(s.device, []).append(name)
    out = {}
    for names in by_device.values():  # one fused call per device (scores of a model split over GPUs)
        keep, nan = ops.nm_mask([scores[name] for name in names], n, m)
        if bool(nan.any()):
            raise _nan_error(names[int(nan.nonzero()[0, 0])])
        out.update(zip(names, keep))
    return {name: out[name] for name in scores}


def sparsity_of(masks: Mapping[str, Tensor]) -> float:
    """Fraction of pruned (False) entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return math.nan if total == 0 else 1.0 - kept / total


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Zeros, in place, every parameter entry whose mask is False; returns the model."""
    named = dict(model.named_parameters())
    unknown = [n for n in masks if n not in named]
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown}")
    for name, mask in masks.items():
        param = named[name]
        if mask.shape != param.shape:
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(mask.shape)} but the parameter has {tuple(param.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor (True = keep), got {mask.dtype}")
        param.masked_fill_(~mask.to(param.device), 0)
    return model
