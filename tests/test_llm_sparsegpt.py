"""SparseGPT's solver (Cholesky rows of H⁻¹, lazy column blocks, adaptive masks) against a direct
small-matrix OBS computation with explicit inverses of the sub-Hessians of the free columns."""

import pytest
import torch

from pyprune_fast.llm import sparsegpt
from pyprune_fast.llm.sparsity import parse_sparsity


def damped_hessian(x: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H = 2XᵀX/n, dead inputs H_jj := 1, + percdamp · mean(diag H) · I (float64)."""
    h = 2.0 * x.T @ x / x.shape[0]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


def lowest(saliency: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest entries of a 1-D tensor (the test data has no ties)."""
    return torch.argsort(saliency)[:count]


def obs_reference(w, h, dead, pattern, granularity, blocksize):
    """Column i = 0..d-1: F = {i..d-1}, G = (H_FF)⁻¹; the saliency of w_ri is w_ri² / G_00; a pruned
    w_ri is removed with the OBS update w_rF −= w_ri / G_00 · G_0,: (w_ri becomes 0), a kept one is
    frozen; weights of dead inputs are zeroed first. Masks: per block of columns from the weights at
    the block's start (unstructured, the block's share of the exact total), or per group of m
    columns when the sweep reaches it (N:M)."""
    w = w.clone()
    rows, d = w.shape
    w[:, dead] = 0
    inverses = [torch.linalg.inv(h[i:, i:]) for i in range(d)]
    g00 = torch.stack([g[0, 0] for g in inverses])
    pruned = torch.zeros(rows, d, dtype=torch.bool)
    f = pattern.fraction
    for c0 in range(0, d, blocksize):
        c1 = min(c0 + blocksize, d)
        if not pattern.is_nm:
            sal = w[:, c0:c1] ** 2 / g00[c0:c1]
            if granularity == "row":
                for r in range(rows):
                    idx = lowest(sal[r], round(f * c1) - round(f * c0))
                    pruned[r, c0 + idx] = True
            else:
                idx = lowest(sal.reshape(-1), round(f * rows * c1) - round(f * rows * c0))
                chosen = torch.zeros(rows * (c1 - c0), dtype=torch.bool)
                chosen[idx] = True
                pruned[:, c0:c1] = chosen.view(rows, c1 - c0)
        for i in range(c0, c1):
            if pattern.is_nm and (i - c0) % pattern.m == 0:
                sal = w[:, i : i + pattern.m] ** 2 / g00[i : i + pattern.m]
                for r in range(rows):
                    pruned[r, i + lowest(sal[r], pattern.m - pattern.n)] = True
            g = inverses[i]
            for r in range(rows):
                if pruned[r, i]:
                    w[r, i:] -= w[r, i] / g[0, 0] * g[0, :]
                    w[r, i] = 0.0
    return w, ~pruned


CASES = [  # d = 80 with blocks of 64 or 128 runs the 32-column sub-blocks inside a block
    ("0.5", "layer", 4, 16),
    ("0.3", "row", 4, 16),
    ("0.3", "layer", 5, 16),
    ("0.6", "row", 128, 16),
    ("2:4", None, 4, 16),
    ("2:4", None, 8, 16),
    ("1:4", None, 128, 16),
    ("0.45", "row", 64, 80),
    ("0.5", "layer", 128, 80),
    ("2:4", None, 64, 80),
    ("3:8", None, 128, 80),
]


@pytest.mark.parametrize("sparsity,granularity,blocksize,d", CASES)
def test_update_equals_direct_obs(sparsity, granularity, blocksize, d):
    gen = torch.Generator().manual_seed(7)
    rows, n = 6, 2 * d + 8
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    x[:, 3] = 0.0  # a dead input
    w = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    pattern = parse_sparsity(float(sparsity) if "." in sparsity else sparsity)
    h = damped_hessian(x, 0.01)

    expected_w, expected_keep = obs_reference(w, h, (x == 0).all(0), pattern, granularity, blocksize)

    stats_h = 2.0 * x.T @ x / n
    factor = sparsegpt.inverse_factor(stats_h, percdamp=0.01)
    got = w.clone()
    keep = sparsegpt.prune_(got, factor, pattern, granularity=granularity or "layer", blocksize=blocksize)

    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(got, expected_w, rtol=1e-9, atol=1e-9)
    assert torch.equal(got == 0, ~keep)
    if pattern.is_nm:
        kept_per_group = keep.view(rows, d // pattern.m, pattern.m).sum(-1)
        assert bool((kept_per_group == pattern.n).all())
    elif granularity == "row":
        assert bool(((~keep).sum(1) == round(pattern.fraction * d)).all())
    else:
        assert int((~keep).sum()) == round(pattern.fraction * rows * d)


def test_update_lowers_the_reconstruction_error_of_its_mask():
    """‖(W − Ŵ)Xᵀ‖ with the OBS update is below that of zeroing the same entries without it."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    w = torch.randn(32, 64, generator=gen)
    factor = sparsegpt.inverse_factor(2.0 * x.T @ x / x.shape[0])
    pruned = w.clone()
    keep = sparsegpt.prune_(pruned, factor, parse_sparsity(0.5), granularity="row")
    updated = ((w - pruned) @ x.T).norm()
    masked = ((w - w * keep) @ x.T).norm()
    assert updated < 0.9 * masked


def test_float32_matches_float64():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, 32, generator=gen, dtype=torch.float64)
    w = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    h = 2.0 * x.T @ x / x.shape[0]
    exact = w.clone()
    sparsegpt.prune_(exact, sparsegpt.inverse_factor(h), parse_sparsity("2:4"), blocksize=8)
    single = w.float()
    sparsegpt.prune_(single, sparsegpt.inverse_factor(h.float()), parse_sparsity("2:4"), blocksize=8)
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    factor = sparsegpt.inverse_factor(torch.eye(8))
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt.prune_(torch.randn(4, 6), factor, parse_sparsity(0.5))
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt.prune_(torch.randn(4, 8), factor, parse_sparsity("2:4"), blocksize=6)
    with pytest.raises(ValueError, match="non-finite"):
        sparsegpt.inverse_factor(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt.inverse_factor(-torch.eye(4), percdamp=0.0)
