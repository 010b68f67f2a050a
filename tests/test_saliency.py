"""The fused saliency op against pyprune_fast.reference (the pure-PyTorch spec) on random and adversarial inputs."""

import math

import pytest
import torch

from pyprune_fast import ops, reference
from tests.conftest import DEVICES, native_or_skip

STAT_NAMES = reference.STATS_FIELDS

# The CPU kernel sums runs of 64 values per fp32 lane (1024 over 16 lanes) and the runs' sums in fp64
# (a run whose fp32 sum or square overflowed again in fp64); CUDA threads sum in fp64. 256 bounds both.
FP32_RUN = 256
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of fp32 and fp64


def sum_bounds(values) -> dict[str, tuple[float, float]]:
    """{"sum" | "sumsq": (exact value, error bound)} over the finite entries of `values`. Exact: math.fsum of
    the fp64 values (x * x of an fp32 x is exact in fp64). Bound of fp32 runs of FP32_RUN terms summed in fp64,
    n terms in all: (FP32_RUN u32 + n u64) sum |x| for the sum; sumsq adds one fp32 rounding of each square."""
    x = torch.cat([v.detach().reshape(-1).double().cpu() for v in values] + [torch.zeros(0, dtype=torch.float64)])
    x = x[torch.isfinite(x)]
    n = x.numel()
    squares = (x * x).tolist()
    exact_sumsq = math.fsum(squares)
    return {
        "sum": (math.fsum(x.tolist()), (FP32_RUN * U32 + n * U64) * math.fsum(x.abs().tolist())),
        "sumsq": (exact_sumsq, ((FP32_RUN + 1) * U32 + n * U64) * exact_sumsq),
    }


def assert_stats(stats: ops.Stats, values):
    """The statistics of the op's own output `values`: counts, min and max exact; sum and sumsq within the
    rounding bound of the kernels' summation order (sum_bounds), whatever the backend."""
    expected = reference.stats_of([v.cpu() for v in values], torch.device("cpu"))
    got = torch.stack(list(stats)).cpu()
    bounds = sum_bounds(values)
    for i, name in enumerate(STAT_NAMES):
        if name in bounds:
            exact, bound = bounds[name]
            error = abs(got[i].item() - exact)
            assert error <= bound, f"stats.{name}: {got[i].item()} vs exact {exact}: error {error} > bound {bound}"
        else:
            assert got[i].item() == expected[i].item() or (got[i].isnan() and expected[i].isnan()), (
                f"stats.{name}: {got[i].item()} != {expected[i].item()}"
            )


def pairs(shapes, dtypes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads, weights = [], []
    for shape, dtype in zip(shapes, dtypes):
        grads.append(torch.randn(shape, generator=g).to(device=device, dtype=dtype))
        weights.append(torch.randn(shape, generator=g).to(device=device, dtype=dtype))
    return grads, weights


SHAPES = [(1,), (7,), (3, 5, 7), (65537,), (0,), (130, 1031), (2, 0, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, dtype):
    grads, weights = pairs(SHAPES, [dtype] * len(SHAPES), device)
    scores, stats = ops.saliency(grads, weights)
    ref_scores, _ = reference.saliency(grads, weights)
    assert len(scores) == len(SHAPES)
    for s, r, w in zip(scores, ref_scores, weights):
        assert s.dtype == torch.float32 and s.shape == w.shape and s.device == w.device
        assert torch.equal(s, r)
    assert_stats(stats, scores)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_call(device):
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float32]
    grads, weights = pairs([(33,), (70000,), (5, 9), (1,)], dtypes, device, seed=3)
    scores, stats = ops.saliency(grads, weights)
    ref_scores, _ = reference.saliency(grads, weights)
    assert all(torch.equal(s, r) for s, r in zip(scores, ref_scores))
    assert_stats(stats, scores)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_layouts(device):
    base_g, base_w = pairs([(64, 48), (40, 30), (6, 8, 10, 12)], [torch.float32] * 3, device, seed=5)
    grads = [base_g[0].t(), base_g[1][::2, 1:], base_g[2].permute(0, 2, 3, 1)]
    weights = [
        base_w[0].t(),
        base_w[1][::2, 1:],
        base_w[2].contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1),
    ]
    # same dense layout, non-dense slice, and two different layouts
    scores, stats = ops.saliency(grads, weights)
    ref_scores, _ = reference.saliency(grads, weights)
    for s, r, w in zip(scores, ref_scores, weights):
        assert s.shape == w.shape
        assert torch.equal(s, r)
    assert scores[0].stride() == weights[0].stride()  # a transposed weight keeps its layout, no copy
    assert_stats(stats, scores)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inf_nan_and_signed_zero(device, dtype):
    inf, nan = float("inf"), float("nan")
    g = torch.tensor([inf, -inf, 0.0, nan, 2.0, -0.0, 3.0, -1.0, 1e-30, 5.0], dtype=dtype, device=device)
    w = torch.tensor([1.0, 2.0, inf, 1.0, -0.5, 7.0, -0.0, -4.0, 1e-30, 2.0], dtype=dtype, device=device)
    scores, stats = ops.saliency([g], [w])
    ref_scores, ref_stats = reference.saliency([g], [w])
    torch.testing.assert_close(scores[0], ref_scores[0], equal_nan=True, rtol=0, atol=0)
    assert not torch.signbit(scores[0][5]) and scores[0][5] == 0  # |−0·7| = +0
    assert stats.nonfinite.item() == 4 and stats.nan.item() == 2  # inf, inf, inf*0 = nan, nan
    assert_stats(stats, scores)
    assert stats.max.item() == 10.0 and stats.min.item() == ref_stats[3].item()


@pytest.mark.parametrize("device", DEVICES)
def test_all_empty_and_no_finite_values(device):
    empty = [torch.zeros(0, 3, device=device)]
    scores, stats = ops.saliency(empty, [torch.zeros(0, 3, device=device)])
    assert scores[0].shape == (0, 3)
    assert stats.count.item() == 0 and stats.sum.item() == 0
    assert stats.min.item() == float("inf") and stats.max.item() == float("-inf")
    scores, stats = ops.saliency([torch.full((3,), float("inf"), device=device)], [torch.ones(3, device=device)])
    assert stats.nonfinite.item() == 3 and stats.min.item() == float("inf")


def test_empty_list():
    scores, stats = ops.saliency([], [])
    assert scores == [] and stats.count.item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("power,scale", [(1, 1.0), (2, 0.5), (1, -3.0)])
def test_accumulate_matches_reference(device, power, scale):
    shapes = [(7,), (65537,), (30, 20), (0,)]
    grads, weights = pairs(shapes, [torch.float32, torch.float16, torch.bfloat16, torch.float32], device, seed=9)
    acc = [torch.randn(s, device=device) for s in shapes]
    acc[2] = torch.randn(20, 30, device=device).t()  # an accumulator with another layout than its weight
    expected = [a.clone() for a in acc]
    ref_stats = reference.saliency_accumulate_(expected, grads, weights, scale, power)
    stats = ops.saliency_accumulate_(acc, grads, weights, scale=scale, power=power)
    for a, e in zip(acc, expected):
        torch.testing.assert_close(a, e, rtol=2e-6, atol=1e-6)
    assert stats.count.item() == ref_stats[0].item()
    assert_stats(stats, acc)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_twice_equals_double(device):
    grads, weights = pairs([(1000,), (3, 3)], [torch.float32] * 2, device, seed=11)
    acc = [torch.zeros(1000, device=device), torch.zeros(3, 3, device=device)]
    ops.saliency_accumulate_(acc, grads, weights)
    ops.saliency_accumulate_(acc, grads, weights)
    scores, _ = ops.saliency(grads, weights)
    for a, s in zip(acc, scores):
        assert torch.equal(a, 2 * s)


def test_stats_mean_and_std():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, float("inf")])
    _, stats = ops.saliency([x], [torch.ones(5)])
    assert stats.mean().item() == pytest.approx(2.5)
    assert stats.std().item() == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std(unbiased=False).item())


@pytest.mark.parametrize(
    "grads,weights,error,match",
    [
        (
            [torch.ones(3)],
            [torch.ones(4)],
            ValueError,
            r"grads\[0\] has shape \(3,\) but weights\[0\] has shape \(4,\)",
        ),
        ([torch.ones(3)], [torch.ones(3), torch.ones(3)], ValueError, "same length"),
        (
            [torch.ones(3, dtype=torch.int32)],
            [torch.ones(3, dtype=torch.int32)],
            TypeError,
            r"grads\[0\] must be one of",
        ),
        ([torch.ones(3)], [torch.ones(3).half()], TypeError, r"grads\[0\] is torch.float32 but weights\[0\] is"),
        ([torch.ones(3, dtype=torch.float64)], [torch.ones(3, dtype=torch.float64)], TypeError, "float64"),
        (torch.ones(3), [torch.ones(3)], TypeError, "grads must be a list of tensors"),
    ],
)
def test_bad_input(grads, weights, error, match):
    with pytest.raises(error, match=match):
        ops.saliency(grads, weights)


def test_bad_accumulate_input():
    g, w = [torch.ones(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match="power must be 1 or 2, got 3"):
        ops.saliency_accumulate_([torch.zeros(3)], g, w, power=3)
    with pytest.raises(TypeError, match=r"acc\[0\] must be one of float32, got float16"):
        ops.saliency_accumulate_([torch.zeros(3).half()], g, w)
    with pytest.raises(ValueError, match=r"acc\[0\] has shape \(4,\)"):
        ops.saliency_accumulate_([torch.zeros(4)], g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    native_or_skip(device)
    grads, weights = pairs([(5, 3), (17,)], [torch.float32, torch.float16], device)
    torch.library.opcheck(torch.ops.pyprune_fast.saliency.default, (grads, weights))
    acc = [torch.zeros(5, 3, device=device), torch.zeros(17, device=device)]
    torch.library.opcheck(torch.ops.pyprune_fast.saliency_accumulate_.default, (acc, grads, weights, 0.5, 2))


@pytest.mark.cuda
def test_cuda_matches_cpu_on_many_tensors():
    """Scores equal bit for bit; the statistics of each backend within the bound of its own summation
    against the exact sums (the two backends sum in different orders, so they differ by ~1e-9 relative)."""
    native_or_skip("cuda")
    shapes = [(i * 37 % 5000 + 1,) for i in range(300)] + [(3, 70001)]
    grads, weights = pairs(shapes, [torch.float32] * len(shapes), "cpu", seed=21)
    cpu_scores, cpu_stats = ops.saliency(grads, weights)
    gpu_scores, gpu_stats = ops.saliency([g.cuda() for g in grads], [w.cuda() for w in weights])
    assert all(torch.equal(c, g.cpu()) for c, g in zip(cpu_scores, gpu_scores))
    assert_stats(cpu_stats, cpu_scores)
    assert_stats(gpu_stats, gpu_scores)
