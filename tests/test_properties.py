"""Property-based tests (hypothesis): every op's compiled kernel against its pure-PyTorch reference on
generated shapes (empty and odd sizes included), dtypes, strides (contiguous, transposed, sliced),
ties, ±0, ±inf and NaN; CUDA against CPU when a GPU is present; float8 refused by every op.

Profiles (tests/conftest.py): "ci" (default, derandomized, a few dozen examples per test) and
"thorough" (HYPOTHESIS_PROFILE=thorough, hundreds). No example database is written.

Equality. Selection, masks, counts, histograms, 2:4 layouts and |g·w| are exact: the same IEEE
operations in both backends, so bitwise equal (NaN where NaN). Floating sums get bounds derived from
how they are summed, stated at each test:
  - saliency sum / sumsq: the CPU kernel adds runs of 1024 values over 16 float32 lanes (64 per lane)
    before float64, and sums such a run again in float64 when a lane's sum or square overflowed; CUDA
    threads sum in float64. With R = 256 (a bound for both), |S - S_exact| <= (R + 1) · u32 · Σ|x|
    (u32 = 2⁻²⁴); the float64 reference is off by at most n · u64 · Σ|x|.
  - sparse24_linear: a K-term dot product in float32, |y - y_exact| <= K · u32 · Σ_k |x_k w_k|, then one
    rounding to the output dtype (u_out · |y|); GELU adds at most 1.13 × that (its slope) + 4 u32 |y|.
  - svd_mean: σ_i from the eigenvalues λ_i of a Gram matrix whose entries are off by at most
    (D + k) · u · ‖F‖²_F, so |Δσ_i| <= sqrt((D + k) · u) · ‖F‖_F (|√(λ+δ) - √λ| <= √|δ|), and the mean
    as well; svdvals (the reference) is backward stable, |Δσ_i| <= 4 k u ‖F‖_F.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pyprune_fast import masks, ops, reference
from pyprune_fast.reference import mma_sp
from tests.conftest import native_or_skip

P = torch.ops.pyprune_fast
HALF_AND_SINGLE = [torch.float16, torch.bfloat16, torch.float32]
SCORE_DTYPES = HALF_AND_SINGLE + [torch.float64]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
U32, U64 = 2.0**-24, 2.0**-53
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _native_cpu():
    native_or_skip("cpu")


# ---- generated tensors ------------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, float("inf"), float("-inf"), 1e-30, 65504.0]


@st.composite
def values(draw, shape, dtype, *, nan=True, inf=True):
    """A tensor of `shape` and `dtype`: Gaussian values at a drawn scale, with a drawn share of its
    entries taken from a small drawn pool (ties) of special values (±0, ±inf, NaN, tiny, huge)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-20, 1e20]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    pool = [v for v in SPECIAL if (inf or math.isfinite(v))] + ([float("nan")] if nan else [])
    chosen = draw(st.lists(st.sampled_from(pool), min_size=0, max_size=4))
    share = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])) if chosen else 0.0
    if chosen and x.numel():
        picks = torch.tensor(chosen, dtype=torch.float64)[torch.randint(len(chosen), shape, generator=g)]
        x = torch.where(torch.rand(shape, generator=g) < share, picks, x)
    if not inf:  # finite after the cast too
        x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return x.to(dtype)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: transposed strides or every other element of a
    larger buffer."""
    if layout == "transposed" and x.dim() >= 2:
        return x.mT.contiguous().mT
    if layout == "sliced" and x.dim() >= 1:
        buffer = torch.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        buffer[..., ::2] = x
        return buffer[..., ::2]
    return x


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])
SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, 5, 7, 16, 33]), min_size=0, max_size=3).map(tuple)
NONEMPTY_SHAPES = st.lists(st.sampled_from([1, 2, 3, 5, 7, 16, 33]), min_size=1, max_size=3).map(tuple)


@st.composite
def score_lists(draw, dtypes=SCORE_DTYPES, *, nan=False, min_size=1, max_size=4, shapes=SHAPES):
    """A list of score tensors of one dtype, each its own shape and layout."""
    dtype = draw(st.sampled_from(dtypes))
    shapes = draw(st.lists(shapes, min_size=min_size, max_size=max_size))
    return [laid_out(draw(values(s, dtype, nan=nan)), draw(LAYOUTS)) for s in shapes]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality up to NaN payloads (and -0.0 = 0.0 where the op defines them as one value)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# ---- saliency ---------------------------------------------------------------------------------------


@st.composite
def saliency_inputs(draw):
    dtype = draw(st.sampled_from(HALF_AND_SINGLE))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    grads = [laid_out(draw(values(s, dtype)), draw(LAYOUTS)) for s in shapes]
    weights = [laid_out(draw(values(s, dtype)), draw(LAYOUTS)) for s in shapes]
    return grads, weights


def sum_bound(scores: list[torch.Tensor], square: bool) -> float:
    """(R + 1) · u32 · Σ|x| + n · u64 · Σ|x| over the finite values (x = s or s², R = 256), + n · 2⁻¹⁵⁰
    for squares (a float32 square below the subnormals rounds to 0)."""
    flat = torch.cat([s.reshape(-1).double() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    x = flat[torch.isfinite(flat)]
    x = x * x if square else x.abs()
    total = float(x.sum())
    return (257 * U32 + x.numel() * U64) * total + (x.numel() * 2.0**-150 if square else 0.0)


def assert_stats_match(stats: torch.Tensor, ref: torch.Tensor, scores: list[torch.Tensor]) -> None:
    count, total, sumsq, lo, hi, nonfinite, nan = stats.tolist()
    r = ref.tolist()
    assert [count, lo, hi, nonfinite, nan] == [r[0], r[3], r[4], r[5], r[6]]
    assert abs(total - r[1]) <= sum_bound(scores, square=False)
    assert abs(sumsq - r[2]) <= sum_bound(scores, square=True)


@given(saliency_inputs())
def test_saliency(inputs):
    grads, weights = inputs
    scores, stats = ops.saliency(grads, weights)
    ref_scores, ref_stats = reference.saliency(grads, weights)
    assert all(same(s, r) for s, r in zip(scores, ref_scores))
    assert_stats_match(torch.stack(list(stats)), ref_stats, ref_scores)


@given(saliency_inputs(), st.sampled_from([1, 2]), st.sampled_from([1.0, 0.5, -3.0]))
def test_saliency_accumulate(inputs, power, scale):
    """acc + scale · |g·w|^power: the same float32 operations in both, except that the compiled kernel's
    multiply-add may be fused (one rounding instead of two): the results differ by at most the rounding
    of each operation, u32 · (|acc| + |scale · t|) each (t = |g·w|^power), + the smallest subnormal."""
    grads, weights = inputs
    acc0 = [torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())) for w in weights]
    acc, ref_acc = [a.clone() for a in acc0], [a.clone() for a in acc0]
    stats = ops.saliency_accumulate_(acc, grads, weights, scale=scale, power=power)
    ref_stats = reference.saliency_accumulate_(ref_acc, grads, weights, scale, power)
    for a, r, a0, g, w in zip(acc, ref_acc, acc0, grads, weights):
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(a), finite) and torch.equal(a.isnan(), r.isnan())
        assert torch.equal(a[~finite & ~r.isnan()], r[~finite & ~r.isnan()])
        term = (g.double() * w.double()).abs() ** power * abs(scale)
        bound = 2 * U32 * (a0.double().abs() + term + r.double().abs()) + 2.0**-149
        assert bool((a.double() - r.double()).abs().le(bound)[finite].all())
    count, _, _, _, _, nonfinite, nan = torch.stack(list(stats)).tolist()
    r = ref_stats.tolist()
    assert [count, nonfinite, nan] == [r[0], r[5], r[6]]


def test_saliency_sumsq_of_large_finite_scores():
    """Found by test_saliency: a finite score s > 1.8e19 has s² beyond float32, and the kernels squared
    in float32 before the float64 sum. Input g = w = [1e10] (s = 1e20): sumsq 1e40 (float64, the
    reference), was inf."""
    g = torch.full((1,), 1e10)
    _, stats = ops.saliency([g], [g])
    assert stats.sumsq.item() == pytest.approx(1e40, rel=1e-6)


@pytest.mark.parametrize("n", [64, 1024 + 37])
def test_saliency_sum_of_large_finite_scores(n):
    """Found by test_saliency: the kernels added up to 64 values per lane (CPU; 256 per thread on CUDA)
    in float32 before float64, which overflowed for finite scores whose sum passes 3.4e38. Input g = w =
    [1e19] * n (s = 1e38 each): sum n · 1e38 (float64, the reference), was inf. n = 1061: a run of 1024
    summed again in float64, then a tail."""
    g = torch.full((n,), 1e19)
    _, stats = ops.saliency([g], [g])
    assert stats.sum.item() == pytest.approx(n * float(torch.tensor(1e19) ** 2), rel=1e-6)
    assert stats.sumsq.item() == pytest.approx(n * float(torch.tensor(1e19) ** 2) ** 2, rel=1e-6)


# ---- selection --------------------------------------------------------------------------------------


@given(score_lists(nan=True), st.data())
def test_kth_smallest_counts(tensors, data):
    total = sum(t.numel() for t in tensors)
    assume(total > 0)
    k = data.draw(st.integers(1, total))
    value, counts, nan = P.kth_smallest_counts(tensors, k)
    ref_value, ref_counts, ref_nan = reference.kth_smallest_counts(tensors, k)
    assert torch.equal(nan, ref_nan)
    assert same(value, ref_value) and torch.equal(counts, ref_counts)  # with NaN too: value 0, counts 0
    if int(nan.sum()) == 0:
        assert ops.kth_smallest(tensors, k).item() == ref_value.item()
    else:
        with pytest.raises(ValueError, match="contains NaN"):
            ops.kth_smallest(tensors, k)


@given(score_lists(nan=True), st.data())
def test_radix_histogram(tensors, data):
    """Every digit, with the prefix of a drawn element's key (a path a radix select can take)."""
    width = reference.radix_width(tensors[0].dtype)
    keys = torch.cat([reference.order_keys(t).reshape(-1) for t in tensors])
    prefix = int(keys[data.draw(st.integers(0, keys.numel() - 1))]) & (2**width - 1) if keys.numel() else 0
    signed = prefix - (1 << 64) if prefix >= 1 << 63 else prefix  # the reference takes the int64 bits
    for digit in range(width // reference.RADIX_DIGIT_BITS):
        hist, nan = ops.radix_histogram(tensors, digit, prefix)
        ref_hist, ref_nan = reference.radix_histogram(tensors, digit, signed)
        assert torch.equal(hist, ref_hist) and torch.equal(nan, ref_nan)


@given(score_lists(), st.data())
def test_threshold_masks_and_apply(tensors, data):
    total = sum(t.numel() for t in tensors)
    assume(total > 0)
    k = data.draw(st.integers(1, total))
    value, counts, _ = reference.kth_smallest_counts(tensors, k)
    got = P.threshold_masks(tensors, value, counts, k)
    expected = reference.threshold_masks(tensors, value, counts, k)
    assert all(torch.equal(m, e) for m, e in zip(got, expected))
    params = [laid_out(torch.arange(1.0, t.numel() + 1).reshape(t.shape), "transposed") for t in tensors]
    ops.threshold_apply_(params, tensors, value, counts, k)
    for p, e in zip(params, expected):
        assert torch.equal(p != 0, e)


@given(score_lists(nan=True), st.data())
def test_layerwise_masks(tensors, data):
    ks = [data.draw(st.integers(0, t.numel())) for t in tensors]
    got, nan = P.layerwise_masks(tensors, ks)
    expected, ref_nan = reference.layerwise_masks(tensors, ks)
    assert torch.equal(nan, ref_nan)
    if int(nan.sum()) == 0:
        assert all(torch.equal(m, e) for m, e in zip(got, expected))


@given(score_lists(nan=True, shapes=NONEMPTY_SHAPES), st.data())
def test_per_row_masks(tensors, data):
    counts = [data.draw(st.integers(0, t.numel() // t.shape[0])) for t in tensors]
    got, nan = P.per_row_masks(tensors, counts)
    expected, ref_nan = reference.per_row_masks(tensors, counts)
    assert torch.equal(nan, ref_nan)
    if int(nan.sum()) == 0:
        assert all(torch.equal(m, e) for m, e in zip(got, expected))


@given(score_lists(), st.floats(0.0, 1.0))
def test_mask_functions_agree_with_the_reference_backend(tensors, sparsity):
    """masks.global_unstructured / layerwise over the compiled ops against the reference's stable sort."""
    scores = {f"t{i}": t for i, t in enumerate(tensors)}
    total = sum(t.numel() for t in tensors)
    kept = masks.global_unstructured(scores, sparsity)
    flat = reference.prune_lowest(torch.cat([reference.sortable(t) for t in tensors]), round(sparsity * total))
    assert torch.equal(torch.cat([kept[n].reshape(-1) for n in scores]), flat)
    per_tensor = masks.layerwise(scores, sparsity)
    for n, t in scores.items():
        expected = reference.prune_lowest(t.reshape(-1), round(sparsity * t.numel()))
        assert torch.equal(per_tensor[n].reshape(-1), expected)


# ---- N:M --------------------------------------------------------------------------------------------


@given(st.sampled_from([(2, 4), (1, 4), (0, 3), (3, 3), (4, 8), (1, 1), (2, 5)]), st.data())
def test_nm_mask(nm, data):
    n, m = nm
    groups = st.sampled_from([0, 1, 3, 8]).map(lambda g: g * m)
    shapes = st.one_of(groups.map(lambda c: (c,)), groups.flatmap(lambda c: st.sampled_from([(1, c), (3, c)])))
    tensors = data.draw(score_lists(nan=True, shapes=shapes))
    keep, nan = ops.nm_mask(tensors, n, m)
    ref_keep, ref_nan = reference.nm_mask(tensors, n, m)
    assert torch.equal(nan, ref_nan)
    for t, k, r in zip(tensors, keep, ref_keep):
        no_nan_group = ~t.isnan().reshape(-1, m).any(1).repeat_interleave(m).reshape(t.shape) if t.numel() else k
        assert torch.equal(k[no_nan_group], r[no_nan_group])


@given(st.sampled_from([(2, 4), (1, 4), (0, 4), (4, 4), (3, 6), (1, 2)]), st.data())
def test_nm_swap_gains(nm, data):
    """Sums: the CPU kernel adds up to 1024 rows over 16 float32 lanes (float64 for float64 scores), then
    float64; every row's term is at most 2 max|s| (finite scores), so |out - ref| <= 1025 · u32 · 2 R
    max|s| + u32 · |ref|. Infinite and NaN sums (+inf and -inf terms) are bitwise equal."""
    n, m = nm
    dtype = data.draw(st.sampled_from(SCORE_DTYPES))
    channels, rows = m * data.draw(st.sampled_from([1, 2, 5])), data.draw(st.sampled_from([0, 1, 7, 33]))
    scores = laid_out(data.draw(values((channels, rows), dtype, nan=False)), data.draw(LAYOUTS))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    perm = torch.randperm(channels, generator=g)
    positions = torch.randint(0, channels, (data.draw(st.sampled_from([0, 1, 3])),), generator=g)
    got = ops.nm_swap_gains(scores, perm, positions, n, m)
    ref = reference.nm_swap_gains(scores, perm, positions, n, m)
    finite = ref.isfinite()
    assert same(got[~finite], ref[~finite]) and bool(got[finite].isfinite().all())
    big = float(torch.where(scores.isfinite(), scores, 0).double().abs().max()) if scores.numel() else 0.0
    bound = 1025 * U32 * 2 * rows * big + U32 * ref.double().abs()
    assert bool(((got.double() - ref.double()).abs() <= bound)[finite].all())


# ---- 2:4 layout and sparse matmul -------------------------------------------------------------------


@st.composite
def sparse24_weights(draw, dtypes=HALF_AND_SINGLE):
    """w [out, in] (out % 16 = 0, in % 32 = 0) with at most two non-zeros in most chunks of 4, a few
    chunks with more (invalid), and special values; a keep-mask of exactly two per chunk, or not."""
    dtype = draw(st.sampled_from(dtypes))
    out, cols = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([32, 64, 128]))
    w = draw(values((out, cols), dtype, nan=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    zeros = draw(st.sampled_from([2, 3, 4]))  # zeros per chunk in the valid chunks
    order = torch.rand(out, cols // 4, 4, generator=g).argsort(-1)
    zero = torch.zeros(out, cols // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :zeros], True)
    invalid = torch.rand(out, cols // 4, 1, generator=g) < draw(st.sampled_from([0.0, 0.0, 0.05]))
    w = torch.where((zero & ~invalid).reshape(out, cols), torch.zeros((), dtype=dtype), w)
    mask = None
    if draw(st.booleans()):
        two = torch.zeros(out, cols // 4, 4, dtype=torch.bool).scatter_(-1, order[..., 2:], True)
        wrong = torch.rand(out, cols // 4, 1, generator=g) < draw(st.sampled_from([0.0, 0.05]))
        mask = (two ^ (wrong & (torch.arange(4) == 0))).reshape(out, cols)
    return laid_out(w, draw(LAYOUTS)), mask


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


@given(sparse24_weights())
def test_compress_24(weights):
    w, mask = weights
    values, meta, invalid = P.compress_24(w, mask)
    ref_values, ref_meta, ref_invalid = reference.compress_24(w, mask)
    assert int(invalid) == int(ref_invalid)
    assert torch.equal(bits(values), bits(ref_values)) and torch.equal(meta, ref_meta)


@given(sparse24_weights(), st.data())
def test_decompress_24(weights, data):
    """Meta words of compress_24, some replaced by arbitrary 32-bit words (unordered index pairs)."""
    w, _ = weights
    values, meta, _ = reference.compress_24(w.contiguous() * (reference.compress_24(w)[2] == 0))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    noise = torch.randint(-(2**31), 2**31, meta.shape, generator=g, dtype=torch.int64).to(torch.int32)
    meta = torch.where(torch.rand(meta.shape, generator=g) < data.draw(st.sampled_from([0.0, 0.2])), noise, meta)
    dense, invalid = P.decompress_24(values, meta)
    ref_dense, ref_invalid = reference.decompress_24(values, meta)
    assert int(invalid) == int(ref_invalid) and torch.equal(bits(dense), bits(ref_dense))


@st.composite
def linear_inputs(draw):
    dtype = draw(st.sampled_from(HALF_AND_SINGLE))
    out, cols = draw(st.sampled_from([64, 128])), draw(st.sampled_from([64, 128]))
    w = draw(values((out, cols), dtype, nan=False, inf=False))
    w = torch.where(masks.n_m({"w": w.float().abs() + 1}, 2, 4)["w"], w, 0)  # 2:4 by position, any values
    batch = draw(st.sampled_from([(0,), (1,), (5,), (2, 3), (17,)]))
    x = laid_out(draw(values((*batch, cols), dtype, nan=False, inf=False)), draw(LAYOUTS))
    bias = draw(st.one_of(st.none(), values((out,), dtype, nan=False, inf=False)))
    return x, w, bias, draw(st.sampled_from(["none", "relu", "gelu"]))


def linear_bound(x: torch.Tensor, w: torch.Tensor, bias, activation: str, z: torch.Tensor) -> torch.Tensor:
    """K · u32 · Σ|x w| + K · 2⁻¹⁴⁹ (products below the float32 subnormals) (+ |b| u32) for the float32
    dot products z, × 1.13 + 4 u32 |z| for GELU (z/2 · (1 + erf(z/√2)) in float32: 1 + erf cancels for
    negative z, an absolute error of a few u32 · |z|), + one rounding to the output dtype (u_out |z|,
    |act(z)| <= |z|) and its smallest subnormal; inf where Σ|x w| reaches the float32 range (a product
    or partial sum may overflow in float32, in both backends alike)."""
    magnitude = x.double().abs() @ w.double().abs().T
    err = cols_err = x.shape[-1] * (U32 * magnitude + 2.0**-149)
    if bias is not None:
        err = cols_err + U32 * bias.double().abs()
    if activation == "gelu":
        err = 1.13 * err + 4 * U32 * z.abs()
    out = torch.finfo(x.dtype)
    err = err + out.eps / 2 * z.abs() * 1.01 + out.smallest_normal * out.eps
    return torch.where(magnitude >= torch.finfo(torch.float32).max / 2, math.inf, err)


@given(linear_inputs())
def test_sparse24_linear(inputs):
    """Compiled and reference against the float64 product, each within the float32 summation bound."""
    x, w, bias, activation = inputs
    values, meta = ops.compress_24(w)
    z64 = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    y64 = {"none": z64, "relu": torch.relu(z64), "gelu": torch.nn.functional.gelu(z64)}[activation]
    bound = linear_bound(x, w, bias, activation, z64)
    for y in (
        ops.sparse24_linear(x, values, meta, bias, None if activation == "none" else activation),
        reference.sparse24_linear(x, values, meta, bias, activation),
    ):
        assert y.dtype == x.dtype and y.shape == y64.shape
        # where y64 ± bound is finite in x's dtype (an inf bound: float32 itself may overflow)
        checked = y64.abs() + bound < torch.finfo(x.dtype).max
        assert bool(((y.double() - y64).abs() <= bound)[checked].all())


@given(st.integers(1, 40), st.sampled_from([None, "relu"]), st.data())
def test_mma_sp_emulation(tokens, activation, data):
    """The lane-by-lane emulation of the CUDA kernel's tile loop (reference.mma_sp, smallest tile) on
    integer data, exact in float64, against the reference sparse24_linear."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = torch.randint(-4, 5, (64, 64), generator=g).float()
    w = masks.n_m({"w": torch.rand(64, 64, generator=g)}, 2, 4)["w"] * w
    x = torch.randint(-3, 4, (tokens, 64), generator=g).float()
    bias = torch.randint(-9, 10, (64,), generator=g).float()
    values, meta = ops.compress_24(w)
    y = mma_sp.emulate_sparse24_linear(x, values, meta, bias, activation, mma_sp.TILES[2])
    expected = reference.sparse24_linear(x.double(), values.double(), meta, bias.double(), activation or "none")
    assert torch.equal(y, expected)


# ---- svd_mean ---------------------------------------------------------------------------------------


@st.composite
def svd_inputs(draw):
    dtype = draw(st.sampled_from(SCORE_DTYPES))
    n, d = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    batch = draw(st.sampled_from([(), (0,), (1,), (3,)]))
    f = draw(values((*batch, n, d), dtype, nan=True))
    exponent = draw(st.integers(-35, 35) if dtype != torch.float64 else st.integers(-300, 300))
    f = (f.double() * 10.0**exponent).to(dtype) if dtype in (torch.float32, torch.float64) else f
    return laid_out(f, draw(LAYOUTS))


def svd_bounds(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(compiled, reference) error bounds per matrix, from its Frobenius norm (module docstring)."""
    compute = torch.float64 if f.dtype == torch.float64 else torch.float32
    u = torch.finfo(compute).eps / 2
    n, d = f.shape[-2:]
    k = min(n, d)
    amax = f.double().abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
    norm = torch.linalg.matrix_norm(f.double() / amax[..., None, None], "fro") * amax  # no underflow
    tiny = torch.finfo(compute).smallest_normal * torch.finfo(compute).eps
    return 2 * math.sqrt((n + d + k) * u) * norm + tiny, 4 * k * u * norm + tiny


@given(svd_inputs())
def test_svd_mean(f):
    value = ops.svd_mean(f)
    ref_value = reference.svd_mean(f)
    assert value.shape == ref_value.shape == f.shape[:-2]
    bad = ~torch.isfinite(f.double()).flatten(-2).all(-1)
    assert torch.equal(value.isnan(), bad) and torch.equal(ref_value.isnan(), bad)
    exact = torch.linalg.svdvals(torch.where(bad[..., None, None], 0, f.double())).mean(-1)
    ours_bound, ref_bound = svd_bounds(f)
    assert bool(((value.double() - exact).abs() <= ours_bound)[~bad].all())
    assert bool(((ref_value.double() - exact).abs() <= ref_bound)[~bad].all())


@given(st.lists(svd_inputs(), min_size=1, max_size=4))
def test_svd_mean_list(fs):
    """Matrices of mixed dtypes, widths and magnitudes cut to one N: each value is svd_mean's, within
    twice the compiled bound (the list shares batched Gram products and eigensolves, whose rounding
    differs from one matrix's)."""
    mats = [f.reshape(-1, *f.shape[-2:])[0] for f in fs if f.dim() == 2 or f.shape[0] > 0]
    assume(mats)
    rows = mats[0].shape[0]
    mats = [m[:rows] if m.shape[0] >= rows else torch.cat([m] * rows)[:rows] for m in mats]
    values = ops.svd_mean_list(mats)
    assert values.dtype == (torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32)
    for v, m in zip(values, mats):
        m = m.to(values.dtype)
        single = ops.svd_mean(m)
        assert v.isnan() == single.isnan()
        assert v.isnan() or abs(float(v) - float(single)) <= 2 * float(svd_bounds(m)[0])


# ---- float8 and CUDA --------------------------------------------------------------------------------


def fp8_calls(t: torch.Tensor) -> dict[str, object]:
    """Every public op called with the float8 tensor t [64, 64] where a floating tensor is expected."""
    f32 = torch.zeros(64, 64)
    values, meta = ops.compress_24(torch.zeros(64, 64))
    return {
        "saliency": lambda: ops.saliency([t], [t]),
        "saliency_accumulate_": lambda: ops.saliency_accumulate_([f32], [t], [t]),
        "kth_smallest": lambda: ops.kth_smallest([t], 1),
        "radix_histogram": lambda: ops.radix_histogram([t], 0),
        "nm_mask": lambda: ops.nm_mask([t], 2, 4),
        "nm_swap_gains": lambda: ops.nm_swap_gains(t, torch.arange(64), torch.arange(2), 2, 4),
        "compress_24": lambda: ops.compress_24(t),
        "decompress_24": lambda: ops.decompress_24(values.to(t.dtype), meta),
        "sparse24_linear": lambda: ops.sparse24_linear(t, values, meta),
        "svd_mean": lambda: ops.svd_mean(t),
        "svd_mean_list": lambda: ops.svd_mean_list([t]),
    }


def fp8_mask_calls(t: torch.Tensor) -> dict[str, object]:
    return {
        "global_unstructured": lambda: masks.global_unstructured({"w": t}, 0.5),
        "layerwise": lambda: masks.layerwise({"w": t}, 0.5),
        "per_row": lambda: masks.per_row({"w": t}, 0.5),
        "n_m": lambda: masks.n_m({"w": t}, 2, 4),
    }


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("op", list(fp8_calls(torch.zeros(1))))
def test_float8_is_refused(op, dtype):
    """A clear TypeError naming the argument, before any kernel reads the 1-byte elements."""
    with pytest.raises(TypeError, match=r"must be .*got float8"):
        fp8_calls(torch.zeros(64, 64, dtype=dtype))[op]()


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("op", list(fp8_mask_calls(torch.zeros(1))))
def test_float8_scores_are_refused_by_the_mask_functions(op, dtype):
    """masks.* pass float8 scores on to the compiled ops, whose C++ check refuses them (a RuntimeError
    that names the op's argument `xs`/`scores`, not the score dict entry)."""
    with pytest.raises((TypeError, RuntimeError), match=r"(?i)float8"):
        fp8_mask_calls(torch.zeros(64, 64, dtype=dtype))[op]()


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_float8_is_refused_by_the_compiled_ops(dtype):
    """The same at the torch.ops level (callers that skip the Python checks). threshold_apply_'s params
    are covered by tests/test_op_dtypes.py."""
    t = torch.zeros(64, 64, dtype=dtype)
    values = torch.zeros(64, 32, dtype=dtype)
    meta = torch.zeros(4, 2, 16, dtype=torch.int32)
    counts = torch.zeros(2, dtype=torch.int64)
    calls = [
        lambda: P.saliency([t], [t]),
        lambda: P.saliency_accumulate_([torch.zeros(64, 64)], [t], [t], 1.0, 1),
        lambda: P.kth_smallest_counts([t], 1),
        lambda: P.radix_histogram([t], 0, 0),
        lambda: P.threshold_masks([t], torch.zeros((), dtype=dtype), counts, 1),
        lambda: P.layerwise_masks([t], [1]),
        lambda: P.per_row_masks([t], [1]),
        lambda: P.nm_mask([t], 2, 4),
        lambda: P.nm_swap_gains(t, torch.arange(64), torch.arange(2), 2, 4),
        lambda: P.compress_24(t, None),
        lambda: P.decompress_24(values, meta),
        lambda: P.sparse24_linear(t, values, meta, None, "none"),
        lambda: P.svd_mean([t]),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="Float8"):
            call()


@pytest.mark.cuda
@given(score_lists(nan=True), st.data())
def test_cuda_selection_matches_cpu(tensors, data):
    native_or_skip("cuda")
    cuda = [t.cuda() for t in tensors]
    total = sum(t.numel() for t in tensors)
    assume(total > 0)
    k = data.draw(st.integers(1, total))
    for got, expected in zip(P.kth_smallest_counts(cuda, k), P.kth_smallest_counts(tensors, k)):
        assert same(got.cpu(), expected)
    ks = [data.draw(st.integers(0, t.numel())) for t in tensors]
    got, nan = P.layerwise_masks(cuda, ks)
    expected, ref_nan = P.layerwise_masks(tensors, ks)
    assert torch.equal(nan.cpu(), ref_nan)
    if int(ref_nan.sum()) == 0:
        assert all(torch.equal(m.cpu(), e) for m, e in zip(got, expected))
    for digit in range(reference.radix_width(tensors[0].dtype) // reference.RADIX_DIGIT_BITS):
        got, expected = P.radix_histogram(cuda, digit, 0), P.radix_histogram(tensors, digit, 0)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))


@pytest.mark.cuda
@given(saliency_inputs())
def test_cuda_saliency_matches_cpu(inputs):
    native_or_skip("cuda")
    grads, weights = inputs
    scores, stats = ops.saliency([g.cuda() for g in grads], [w.cuda() for w in weights])
    ref_scores, ref_stats = reference.saliency(grads, weights)
    assert all(same(s.cpu(), r) for s, r in zip(scores, ref_scores))
    assert_stats_match(torch.stack(list(stats)).cpu(), ref_stats, ref_scores)


@pytest.mark.cuda
@given(st.sampled_from([(2, 4), (1, 4), (4, 8)]), st.data())
def test_cuda_nm_mask_and_compress_match_cpu(nm, data):
    native_or_skip("cuda")
    n, m = nm
    tensors = data.draw(score_lists(shapes=st.sampled_from([(0,), (8,), (3, 16), (5, 8)])))
    keep, nan = ops.nm_mask([t.cuda() for t in tensors], n, m)
    ref_keep, ref_nan = ops.nm_mask(tensors, n, m)
    assert torch.equal(nan.cpu(), ref_nan) and all(torch.equal(a.cpu(), b) for a, b in zip(keep, ref_keep))
    w, mask = data.draw(sparse24_weights())
    got = P.compress_24(w.cuda(), None if mask is None else mask.cuda())
    values, meta, invalid = P.compress_24(w, mask)
    assert torch.equal(bits(got[0].cpu()), bits(values)) and torch.equal(got[1].cpu(), meta)
    assert int(got[2]) == int(invalid)


@pytest.mark.cuda
@given(svd_inputs())
def test_cuda_svd_mean_matches_the_bound(f):
    native_or_skip("cuda")
    value = ops.svd_mean(f.cuda()).cpu()
    bad = ~torch.isfinite(f.double()).flatten(-2).all(-1)
    assert torch.equal(value.isnan(), bad)
    exact = torch.linalg.svdvals(torch.where(bad[..., None, None], 0, f.double())).mean(-1)
    assert bool(((value.double() - exact).abs() <= svd_bounds(f)[0])[~bad].all())
