"""The mean singular value of feature matrices, ReFer's objective (reference), and the power-of-two
scaling that both backends apply to each matrix first."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _pow2(k: Tensor, dtype: torch.dtype) -> Tensor:
    """2**k exactly, written as exponent bits (k integer, within the normal exponents of `dtype`)."""
    mantissa_bits, bias = (52, 1023) if dtype == torch.float64 else (23, 127)
    bits = (k.to(torch.int64) + bias) << mantissa_bits
    return bits.view(torch.float64) if dtype == torch.float64 else bits.to(torch.int32).view(torch.float32)


def ldexp(x: Tensor, k: Tensor) -> Tensor:
    """x · 2**k, one exponent per value of x (k of x's shape): two factors 2**(k // 2) and 2**(k - k // 2)
    of the same sign, each a normal number even where 2**k is not (|k| up to 2 · 149 in float32), so the
    result is exact wherever it is a normal number."""
    half = torch.div(k, 2, rounding_mode="floor")
    return x * _pow2(half, x.dtype) * _pow2(k - half, x.dtype)


def scale_exponents(x: Tensor) -> Tensor:
    """k per matrix F of x [..., N, D] (an integer tensor [...]) such that F · 2**k has its largest |entry|
    near 1. With max|F| = m · 2**e, m in [0.5, 1):
      k = 0 where |e| <= S, S = 31 (float32) or 255 (float64), a quarter of the exponent range: there the
        unscaled σ² lies in [2**-2S, N·D·2**2S], far from overflow and from the smallest normal number;
      k = -e elsewhere, clamped to the normal exponents of the dtype so that 2**k is one normal number
        (float32: max|F · 2**k| in [0.5, 4) for normal max|F|, at least 2**-22 for subnormal ones);
      k = 0 for a zero matrix and for one with NaN or inf entries (those keep their value, 0 or NaN)."""
    amax = torch.linalg.vector_norm(x.detach(), float("inf"), dim=(-2, -1))
    _, e = torch.frexp(amax)
    info = torch.finfo(x.dtype)
    low, high = round(math.log2(info.tiny)), math.floor(math.log2(info.max))  # float32: -126, 127
    unsafe = (e.abs() > high // 4) & torch.isfinite(amax) & (amax > 0)
    return torch.where(unsafe, (-e).clamp(low, high), 0)


def scale_matrices(x: Tensor, k: Tensor) -> Tensor:
    """x [..., N, D] with each matrix multiplied by its 2**k (k from `scale_exponents`), one exact
    multiplication (exact wherever the product is a normal number)."""
    return x * _pow2(k, x.dtype)[..., None, None]


def svd_mean(features: Tensor) -> Tensor:
    """Mean of the min(N, D) singular values of each [N, D] matrix: [B, N, D] -> [B], [N, D] -> 0-d.
    Computed in float32 for half inputs; differentiable through torch.linalg.svdvals. A matrix with NaN
    or inf entries gives NaN (and a zero gradient).

    Scaling: singular values are homogeneous of degree 1 in F and their gradient U Vᵀ is homogeneous of
    degree 0, so with 2**k a power of two near 1 / max|F| where F is too large or too small to be used
    as it is (`scale_exponents`)
        value(F) = 2**-k · value(F'),    d value / dF = (d value / dF')(F'),    F' = F · 2**k.
    F' has max|F'| near 1: its singular values (and their squares, the eigenvalues of the Gram matrix in
    the compiled op) neither overflow nor underflow for any finite F, and only the mean is scaled back.
    The gradient flows past both scalings unchanged (x - x.detach() and v - v.detach() are zero-valued
    terms that carry it), so no intermediate 2**-k · grad can overflow or underflow. Powers of two make
    the scaling exact.
    """
    x = features if features.dtype in (torch.float32, torch.float64) else features.float()
    finite = torch.isfinite(x.detach()).flatten(-2).all(-1)
    k = scale_exponents(x)
    scaled = torch.where(finite[..., None, None], scale_matrices(x.detach(), k) + (x - x.detach()), 0)
    v = torch.linalg.svdvals(scaled).mean(-1)
    return torch.where(finite, ldexp(v.detach(), -k) + (v - v.detach()), float("nan"))


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """[svd_mean(F) for F in features] as one 1-d tensor."""
    return torch.stack([svd_mean(f) for f in features])
