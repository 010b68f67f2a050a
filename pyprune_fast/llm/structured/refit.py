"""Reconstruction of a consumer Linear (down_proj, o_proj, fc2) after some of its input features are
removed, from the statistics of its dense inputs x over the n calibration tokens (Σx, XᵀX):

    least squares   [W', b'] = argmin Σ_t ‖W x_t + b − W' x_{K,t} − b'‖²        (K: the kept inputs)
                    normal equations, with z_t = [x_{K,t}; 1] and everything divided by n:
                    [W', b'] (E[z zᵀ] + λ I_K) = [W E[x x_Kᵀ] + b E[x_K]ᵀ,  W E[x] + b]
                    λ = percdamp · mean(diag E[x_K x_Kᵀ]) on the x part only (as SparseGPT's dampening);
                    inputs that were always zero get E[x_j²] := 1. Without a bias available the
                    intercept column is left out (b' = b = 0).
    compensation    b' = b + W_{:,R} E[x_R]   (R: the removed inputs): FLAP's bias compensation (An et
                    al. 2024), the mean of what was removed, without changing W_{:,K}

Solved in float64 by Cholesky; a system that is not positive definite, or non-finite statistics, raise
ValueError saying what to change."""

from __future__ import annotations

import torch
from torch import Tensor

from ...criteria.input_stats import InputStats


def _check(stats: InputStats, what: str) -> None:
    if stats.xtx is None or stats.sums is None:
        raise ValueError(f"{what}: the refit needs XᵀX and Σx of the consumer's inputs")
    if stats.tokens < 1:
        raise ValueError(f"{what}: no calibration tokens reached the consumer")
    for t in (stats.xtx, stats.sums):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: the calibration statistics hold non-finite values")


@torch.no_grad()
def least_squares(
    weight: Tensor,
    bias: Tensor | None,
    keep: Tensor,
    stats: InputStats,
    *,
    intercept: bool,
    percdamp: float = 0.01,
    what: str = "consumer",
) -> tuple[Tensor, Tensor | None]:
    """(W' [out, |K|], b' [out] or None) of the least-squares refit (module docstring), in the weight's
    dtype. `keep`: the kept input indices (int64, ascending); `intercept`: fit a bias (else an existing
    bias is kept as it is and W' fits W x alone)."""
    _check(stats, what)
    n = float(stats.tokens)
    w = weight.detach().double()
    device = w.device
    g = stats.xtx.to(device=device, dtype=torch.float64) / n
    mu = stats.sums.to(device=device, dtype=torch.float64) / n
    keep = keep.to(device)
    b0 = None if bias is None else bias.detach().double()
    gkk = g[keep][:, keep].clone()
    diag = gkk.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(percdamp * diag.mean())
    rhs = w @ g[:, keep]
    if intercept:
        if b0 is not None:
            rhs += b0.unsqueeze(1) * mu[keep].unsqueeze(0)
        k = keep.numel()
        a = torch.empty(k + 1, k + 1, dtype=torch.float64, device=device)
        a[:k, :k], a[:k, k], a[k, :k], a[k, k] = gkk, mu[keep], mu[keep], 1.0
        target = w @ mu + (0 if b0 is None else b0)
        rhs = torch.cat([rhs, target.unsqueeze(1)], 1)
    else:
        a = gkk
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(
            f"{what}: the refit's system is not positive definite (percdamp={percdamp}): use a larger percdamp "
            "or more calibration tokens"
        )
    solution = torch.cholesky_solve(rhs.T, chol).T
    if not bool(torch.isfinite(solution).all()):
        raise ValueError(f"{what}: the refit gave non-finite weights (percdamp={percdamp})")
    if intercept:
        return solution[:, :-1].to(weight.dtype), solution[:, -1].to(weight.dtype)
    return solution.to(weight.dtype), None if bias is None else bias.detach().clone()


@torch.no_grad()
def compensate(weight: Tensor, bias: Tensor | None, keep: Tensor, stats: InputStats) -> Tensor:
    """b' = b + W_{:,R} E[x_R]: FLAP's bias compensation for the removed inputs R (module docstring)."""
    if stats.sums is None:
        raise ValueError("bias compensation needs Σx of the consumer's inputs")
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[keep.to(weight.device)] = False
    mean = stats.mean().to(weight.device, torch.float64)
    extra = weight.detach().double()[:, removed] @ mean[removed]
    base = torch.zeros_like(extra) if bias is None else bias.detach().double()
    return (base + extra).to(weight.dtype)
