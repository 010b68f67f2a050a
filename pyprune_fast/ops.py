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


def _check_matrices(name: str, tensors: Sequence[Tensor], dims: tuple[int, ...] = (2,)) -> None:
    _check_float_list(name, tensors, FLOAT_TYPES + (torch.float64,))
    for i, t in enumerate(tensors):
        if t.dim() not in dims:
            expected = "a 2-d [N, D] matrix" if dims == (2,) else "[N, D] or [B, N, D]"
            raise ValueError(f"{name}[{i}] must be {expected}, got shape {tuple(t.shape)}")
        if t.shape[-1] == 0 or t.shape[-2] == 0:
            raise ValueError(f"{name}[{i}] must have N > 0 and D > 0 (its singular values), got shape {tuple(t.shape)}")


def _svd_mean_dtype(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors in one compute dtype: float64 if any is float64, else float32 (half inputs included)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dtype) for t in tensors]


def svd_mean(features: Tensor) -> Tensor:
    """Mean singular value of each matrix: F [B, N, D] -> [B] (or [N, D] -> 0-d), differentiable.

    value = Σ_i σ_i / k over the k = min(N, D) singular values, computed from the eigenvalues λ_i = σ_i²
    of the Gram matrix of the smaller side (F Fᵀ or FᵀF); gradient U Vᵀ / k = G^{-1/2} F / k (or
    F G^{-1/2} / k). Eigenvalues at or below k·eps·λ_max (the rounding level of the Gram matrix) count as
    zero, so rank-deficient and zero inputs have finite gradients (the minimum-norm subgradient).
    float32/float64; half inputs are computed in float32. Matrices with NaN or inf entries give NaN.
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    _check_matrices("features", [features], dims=(2, 3))
    (x,) = _svd_mean_dtype([features])
    if _native([x]):
        values, _ = torch.ops.pyprune_fast.svd_mean([x])
        return values.reshape(x.shape[:-2])
    return reference.svd_mean(features)


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """svd_mean of each [N, D_l] matrix of a list (the layers of one batch: one N, any widths D_l), as a
    1-d tensor, in one call: all matrices whose Gram matrices have the same size (N × N for every
    D_l ≥ N) share one batched eigendecomposition. Mixed float32/float64 inputs are computed in float64."""
    features = _as_list("features", features)
    if not features:
        raise ValueError("features must hold at least one [N, D] matrix")
    _check_matrices("features", features)
    for i, t in enumerate(features):
        if t.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"features[{i}] has N = {t.shape[0]} rows but features[0] has {features[0].shape[0]}: "
                "every matrix of svd_mean_list must have the same N"
            )
    _check_same_device({"features": features})
    xs = _svd_mean_dtype(features)
    if _native(xs):
        values, _ = torch.ops.pyprune_fast.svd_mean(xs)
        return values
    return reference.svd_mean_list(features)


# --- fake (meta) implementations, registered once the library is loaded -------------------------


def _stats_like(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0].new_empty((len(reference.STATS_FIELDS),), dtype=torch.float64)


def _fake_saliency(grads, weights):
    return [torch.empty_like(w, dtype=torch.float32) for w in weights], _stats_like(weights)


def _fake_saliency_accumulate_(acc, grads, weights, scale=1.0, power=1):
    return _stats_like(weights)


def _fake_svd_mean(features):
    total = sum(f.shape[0] if f.dim() == 3 else 1 for f in features)
    factors = []
    for f in features:
        n = torch.sym_min(f.shape[-2], f.shape[-1])
        factors.append(f.new_empty((*f.shape[:-2], n, n)))
    return features[0].new_empty((total,)), factors


def _fake_svd_mean_backward(grad, features, factors):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features]


# --- autograd of svd_mean -----------------------------------------------------------------------


def _svd_mean_setup_context(ctx, inputs, output):
    (features,) = inputs
    _, factors = output
    ctx.count = len(features)
    ctx.save_for_backward(*features, *factors)


def _svd_mean_backward(ctx, grad_values, _grad_factors):
    saved = ctx.saved_tensors
    features, factors = list(saved[: ctx.count]), list(saved[ctx.count :])
    return (torch.ops.pyprune_fast.svd_mean_backward(grad_values, features, factors),)


def _register_python_side() -> None:
    """Called by _extension after the compiled library has defined the ops."""
    torch.library.register_fake("pyprune_fast::saliency", _fake_saliency)
    torch.library.register_fake("pyprune_fast::saliency_accumulate_", _fake_saliency_accumulate_)
    torch.library.register_fake("pyprune_fast::svd_mean", _fake_svd_mean)
    torch.library.register_fake("pyprune_fast::svd_mean_backward", _fake_svd_mean_backward)
    torch.library.register_autograd("pyprune_fast::svd_mean", _svd_mean_backward, setup_context=_svd_mean_setup_context)
