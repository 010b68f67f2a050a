"""The batched SVD-mean score: the mean singular value of many feature matrices (ReFer's objective),
differentiable, through the Gram matrix of each matrix's smaller side and one batched eigh."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from .checks import FLOAT_TYPES, as_list, check_dtypes, check_same_device
from .dispatch import native, when_loaded

__all__ = ["svd_mean", "svd_mean_list"]


def _check_matrices(name: str, tensors: Sequence[Tensor], dims: tuple[int, ...] = (2,)) -> None:
    check_dtypes(name, tensors, FLOAT_TYPES + (torch.float64,))
    for i, t in enumerate(tensors):
        if t.dim() not in dims:
            expected = "a 2-d [N, D] matrix" if dims == (2,) else "[N, D] or [B, N, D]"
            raise ValueError(f"{name}[{i}] must be {expected}, got shape {tuple(t.shape)}")
        if t.shape[-1] == 0 or t.shape[-2] == 0:
            raise ValueError(f"{name}[{i}] must have N > 0 and D > 0 (its singular values), got shape {tuple(t.shape)}")


def _compute_dtype(tensors: Sequence[Tensor]) -> list[Tensor]:
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
    Each matrix is scaled by a power of two before its Gram matrix is formed (see `_ScaledSvdMean`),
    so every finite input works, from subnormal to the largest finite values.

    Args:
        features: F [B, N, D] or [N, D].

    Returns:
        The mean singular values, [B] or 0-d.
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    _check_matrices("features", [features], dims=(2, 3))
    (x,) = _compute_dtype([features])
    if native("svd_mean", x):
        return _ScaledSvdMean.apply(x).reshape(x.shape[:-2])
    return reference.svd_mean(features)


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """svd_mean of each [N, D_l] matrix of a list (the layers of one batch: one N, any widths D_l), as a
    1-d tensor, in one call: all matrices whose Gram matrices have the same size (N × N for every
    D_l ≥ N) share one batched eigendecomposition. Mixed float32/float64 inputs are computed in float64.

    Args:
        features: [N, D_l] matrices.

    Returns:
        Their mean singular values, 1-d.
    """
    features = as_list("features", features)
    if not features:
        raise ValueError("features must hold at least one [N, D] matrix")
    _check_matrices("features", features)
    for i, t in enumerate(features):
        if t.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"features[{i}] has N = {t.shape[0]} rows but features[0] has {features[0].shape[0]}: "
                "every matrix of svd_mean_list must have the same N"
            )
    check_same_device({"features": features})
    xs = _compute_dtype(features)
    if native("svd_mean", xs):
        return _ScaledSvdMean.apply(*xs)
    return reference.svd_mean_list(features)


class _ScaledSvdMean(torch.autograd.Function):
    """The compiled op on F_b · 2**k_b, 2**k_b a power of two near 1 / max|F_b| (the scaling of
    `reference.svd_mean`, whose docstring has the formulas): the Gram matrix of the scaled matrix has
    entries of at most a few times D and eigenvalues that neither overflow nor underflow for any finite
    F_b (unscaled, σ² overflows float32 from σ ≈ 1.8e19 and is lost below the cutoff from σ ≈ 1e-19).
    The value is scaled back by 2**-k_b; the gradient, homogeneous of degree 0, is the op's backward
    applied to the scaled matrices directly, with no factor 2**k_b anywhere."""

    @staticmethod
    def forward(ctx, *features: Tensor) -> Tensor:
        exponents = [reference.scale_exponents(f) for f in features]
        values, factors = torch.ops.pyprune_fast.svd_mean(_scale(features, exponents))
        ctx.count = len(features)
        ctx.save_for_backward(*features, *exponents, *factors)
        return reference.ldexp(values, -torch.cat([k.reshape(-1) for k in exponents]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        saved, count = ctx.saved_tensors, ctx.count
        features, exponents, factors = saved[:count], saved[count : 2 * count], list(saved[2 * count :])
        scaled = _scale(features, exponents)  # again, rather than a copy of every matrix kept alive
        return tuple(torch.ops.pyprune_fast.svd_mean_backward(grad.contiguous(), scaled, factors))


def _scale(features: Sequence[Tensor], exponents: Sequence[Tensor]) -> list[Tensor]:
    """Each F · 2**k; on the CPU (where reading k costs no synchronization) F itself where k is all 0,
    the common case, which saves a pass over the features (the product would equal F)."""
    return [
        f if f.device.type == "cpu" and not k.any() else reference.scale_matrices(f, k)
        for f, k in zip(features, exponents)
    ]


def _fake_svd_mean(features):
    total = sum(f.shape[0] if f.dim() == 3 else 1 for f in features)
    factors = []
    for f in features:
        n = torch.sym_min(f.shape[-2], f.shape[-1])
        factors.append(f.new_empty((*f.shape[:-2], n, n)))
    return features[0].new_empty((total,)), factors


def _fake_svd_mean_backward(grad, features, factors):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features]


def _setup_context(ctx, inputs, output):
    (features,) = inputs
    _, factors = output
    ctx.count = len(features)
    ctx.save_for_backward(*features, *factors)


def _backward(ctx, grad_values, _grad_factors):
    saved = ctx.saved_tensors
    features, factors = list(saved[: ctx.count]), list(saved[ctx.count :])
    return (torch.ops.pyprune_fast.svd_mean_backward(grad_values, features, factors),)


@when_loaded
def _register() -> None:
    torch.library.register_fake("pyprune_fast::svd_mean", _fake_svd_mean)
    torch.library.register_fake("pyprune_fast::svd_mean_backward", _fake_svd_mean_backward)
    torch.library.register_autograd("pyprune_fast::svd_mean", _backward, setup_context=_setup_context)
