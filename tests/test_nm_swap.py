"""The fused kept-score gains of N:M channel swaps (ops.nm_swap_gains) against reference.nm_swap_gains,
and the gains against the kept score of N:M masks computed from scratch (reference.n_m)."""

import pytest
import torch

from pyprune_fast import ops, reference
from tests.conftest import DEVICES, native_or_skip

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INF = float("inf")


def kept_score(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """The score an N:M mask keeps on the columns of `scores` [R, C] taken in the order `perm`."""
    s = scores[:, perm].double()
    return float((s * reference.n_m({"s": s}, n, m)["s"]).sum())


def check(channel_scores, perm, positions, n, m, exact):
    got = ops.nm_swap_gains(channel_scores, perm, positions, n, m)
    ref = reference.nm_swap_gains(channel_scores.cpu(), perm.cpu(), positions.cpu(), n, m)
    assert got.shape == (positions.numel(), channel_scores.shape[0]) and got.device == channel_scores.device
    assert got.dtype == (torch.float64 if channel_scores.dtype == torch.float64 else torch.float32)
    if exact:
        assert torch.equal(got.cpu(), ref)
    else:  # float sums: per-lane partial sums of ≤ 64 terms in float, then double
        bound = 64 * torch.finfo(torch.float32).eps * channel_scores.shape[1] * 2 * channel_scores.abs().max()
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=float(bound) + 1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (0, 4), (4, 4), (1, 2), (4, 8), (3, 6), (1, 1)])
def test_matches_reference_with_ties(device, dtype, n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    for rows in (1, 7, 1500):  # odd sizes, one more than a CPU tile of 1024 rows
        scores = torch.randint(-3, 4, (6 * m, rows), generator=g).to(device=device, dtype=dtype)
        perm = torch.randperm(6 * m, generator=g).to(device)
        positions = torch.tensor([0, m - 1, 3 * m + m // 2, 6 * m - 1, 2], device=device) % (6 * m)
        check(scores, perm, positions, n, m, exact=True)  # small integers: every sum is exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_on_random_floats(device, dtype):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(64, 2500, generator=g).abs().to(device=device, dtype=dtype)
    perm = torch.randperm(64, generator=g).to(device)
    check(scores, perm, torch.arange(64, device=device), 2, 4, exact=dtype == torch.float64 and device == "cpu")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_gains_are_the_change_of_the_kept_score(n, m):
    """out[a, perm[b]] + out[b, perm[a]] = kept score after swapping positions a and b − before."""
    g = torch.Generator().manual_seed(m)
    scores = torch.randn(37, 8 * m, generator=g, dtype=torch.float64)
    perm = torch.randperm(8 * m, generator=g)
    gains = ops.nm_swap_gains(scores.t().contiguous(), perm, torch.arange(8 * m), n, m)
    for a, b in [(0, m), (1, 7 * m + 2), (m + 1, 3 * m), (8 * m - 1, 0)]:
        swapped = perm.clone()
        swapped[[a, b]] = perm[[b, a]]
        change = kept_score(scores, swapped, n, m) - kept_score(scores, perm, n, m)
        assert float(gains[a, perm[b]] + gains[b, perm[a]]) == pytest.approx(change, abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_infinities_are_ordinary_values(device, dtype):
    # one row, two groups of 4: [inf, 1, 2, 3 | -inf, inf, inf, 0]; 2:4
    s = torch.tensor([[INF], [1.0], [2.0], [3.0], [-INF], [INF], [INF], [0.0]], dtype=dtype, device=device)
    perm = torch.arange(8, device=device)
    got = ops.nm_swap_gains(s, perm, torch.arange(8, device=device), 2, 4).cpu()
    assert torch.equal(got, reference.nm_swap_gains(s.cpu(), perm.cpu(), torch.arange(8), 2, 4))
    assert got[0, 0] == 0 and got[0, 3] == -INF  # inf kept either way: 0, not inf - inf; inf out: -inf
    assert got[1, 0] == INF and got[1, 5] == INF  # a kept inf enters the first group
    assert got[4, 0] == 0 and got[4, 3] == 0  # u = inf (two infs kept): nothing -inf could gain
    assert got[5, 4] == -INF and got[5, 6] == 0  # -inf replaces a kept inf; inf replaces inf
    assert got[7, 1] == 0 and got[7, 4] == 0  # below the kept infs: no change


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(device):
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 5, (300, 48), generator=g).float().to(device)
    perm = torch.randperm(24, generator=g).to(device)
    check(base.t()[::2], perm, torch.arange(0, 24, 5, device=device), 2, 4, exact=True)
    check(base[:, :24].t(), perm, torch.tensor([3], device=device), 1, 4, exact=True)
    empty = ops.nm_swap_gains(
        base.t(), torch.arange(48, device=device), torch.zeros(0, dtype=torch.long, device=device), 2, 4
    )
    assert empty.shape == (0, 48)
    no_rows = ops.nm_swap_gains(
        torch.zeros(8, 0, device=device), torch.arange(8, device=device), torch.arange(8, device=device), 2, 4
    )
    assert torch.equal(no_rows.cpu(), torch.zeros(8, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_is_refused(device):
    s = torch.ones(8, 3, device=device)
    s[5, 1] = float("nan")
    with pytest.raises(ValueError, match="channel_scores contains NaN"):
        ops.nm_swap_gains(s, torch.arange(8, device=device), torch.arange(8, device=device), 2, 4)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.ones(6, 3), torch.arange(6), torch.arange(2), 2, 4), ValueError, "multiple of m=4"),
        ((torch.ones(8), torch.arange(8), torch.arange(2), 2, 4), ValueError, r"must be \[C, R\]"),
        ((torch.ones(8, 3), torch.arange(8) % 7, torch.arange(2), 2, 4), ValueError, "perm must be a permutation"),
        ((torch.ones(8, 3), torch.arange(4), torch.arange(2), 2, 4), ValueError, "perm must be a permutation"),
        ((torch.ones(8, 3), torch.arange(8).int(), torch.arange(2), 2, 4), TypeError, "perm must be a 1-d int64"),
        ((torch.ones(8, 3), torch.arange(8), torch.tensor([8]), 2, 4), ValueError, r"positions must be in \[0, 8\)"),
        ((torch.ones(8, 3), torch.arange(8), torch.tensor([-1]), 2, 4), ValueError, "positions must be in"),
        ((torch.ones(8, 3).int(), torch.arange(8), torch.arange(2), 2, 4), TypeError, r"^channel_scores must be"),
        ((torch.ones(8, 3), torch.arange(8), torch.arange(2), 5, 4), ValueError, "n:m must satisfy"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.nm_swap_gains(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    native_or_skip(device)
    s = torch.randn(16, 40, device=device)
    args = (s, torch.randperm(16).to(device), torch.tensor([0, 5, 15], device=device), 2, 4)
    torch.library.opcheck(torch.ops.pyprune_fast.nm_swap_gains.default, args)
    torch.library.opcheck(torch.ops.pyprune_fast.nm_swap_gains.default, (s.half(), *args[1:]))


@pytest.mark.cuda
def test_cuda_matches_cpu_on_large_inputs():
    native_or_skip("cuda")
    g = torch.Generator().manual_seed(9)
    scores = torch.randint(0, 50, (576, 3000), generator=g).float()
    perm, positions = torch.randperm(576, generator=g), torch.arange(0, 576, 7)
    cpu = ops.nm_swap_gains(scores, perm, positions, 2, 4)
    gpu = ops.nm_swap_gains(scores.cuda(), perm.cuda(), positions.cuda(), 2, 4)
    assert torch.equal(cpu, gpu.cpu())
