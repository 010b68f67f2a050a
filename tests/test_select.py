"""Exact selection: kth_smallest and the masks built on it, against the sort-based reference."""

import pytest
import torch

from pyprune_fast import masks, ops, reference
from tests.conftest import DEVICES, native_or_skip

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def sort_kth(xs, k):
    flat = torch.cat([x.reshape(-1).double().cpu() for x in xs]) + 0.0
    return torch.sort(flat).values[k - 1].item()


def random_lists(dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(0, 300, (1,), generator=g)),), (7, 13), (0, 4), (70001,), (1,)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def adversarial(dtype, device):
    """Heavy ties, all-equal, ±0, ±inf, subnormals, one element, non-contiguous."""
    info = torch.finfo(dtype)
    tiny = info.tiny / 4 if dtype != torch.bfloat16 else info.tiny / 2  # subnormals
    base = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), tiny, -tiny, info.max, -info.max])
    ties = torch.randint(0, 3, (100_000,), generator=torch.Generator().manual_seed(1)).double() - 1
    transposed = torch.randn(64, 33, generator=torch.Generator().manual_seed(2)).t()
    return [
        base.to(device=device, dtype=dtype),
        ties.to(device=device, dtype=dtype),
        torch.full((5000,), 0.5).to(device=device, dtype=dtype),
        transposed.to(device=device, dtype=dtype),
        torch.tensor([-0.0]).to(device=device, dtype=dtype),
        transposed.to(device=device, dtype=dtype)[::3, 1:],
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kth_random(device, dtype, seed):
    xs = random_lists(dtype, device, seed)
    total = sum(x.numel() for x in xs)
    for k in [1, 2, total // 3, total // 2 + 1, total - 1, total]:
        got = ops.kth_smallest(xs, k)
        assert got.dtype == dtype and got.dim() == 0 and got.device.type == device
        assert got.item() == sort_kth(xs, k), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_adversarial(device, dtype):
    xs = adversarial(dtype, device)
    total = sum(x.numel() for x in xs)
    for k in [1, 2, 9, 10, 11, 5000, 33_333, 33_334, 66_666, 66_667, 100_010, total - 11, total - 1, total]:
        assert ops.kth_smallest(xs, k).item() == sort_kth(xs, k), k


@pytest.mark.parametrize("device", DEVICES)
def test_kth_counts_match_reference(device):
    xs = adversarial(torch.float32, device)
    total = sum(x.numel() for x in xs)
    for k in [1, 50_000, total]:
        value, counts = ops.select_counts(xs, k)
        ref_value, ref_counts, _ = reference.kth_smallest_counts(xs, k)
        assert value.item() == ref_value.item()
        assert counts.tolist() == ref_counts.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_smallest_counts_of_nan_input_is_the_reference_zero(device, dtype):
    """The compiled op on NaN input (ops.kth_smallest refuses it; torch.ops returns the NaN counts): value
    +0.0 and counts (0, 0), as the reference and the CUDA kernel return. The CPU kernel returned NaN: the
    key 0 of its stopped selection mapped back to all-ones bits."""
    native_or_skip(device)
    xs = [
        torch.tensor([1.0, float("nan"), -2.0], device=device).to(dtype),
        torch.tensor([3.0], device=device).to(dtype),
    ]
    width = torch.finfo(dtype).bits
    for k in (1, 2, 4):
        value, counts, nan = torch.ops.pyprune_fast.kth_smallest_counts(xs, k)
        ref_value, ref_counts, ref_nan = reference.kth_smallest_counts(xs, k)
        assert value.dtype == dtype and value.shape == ()
        bits = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
        assert value.view(bits).item() == 0 and ref_value.view(bits).item() == 0  # +0.0, not NaN or -0.0
        assert counts.tolist() == ref_counts.tolist() == [0, 0]
        assert nan.tolist() == ref_nan.tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kth_every_16_bit_pattern(dtype):
    """Every non-NaN bit pattern of the 16-bit formats once: the k-th is the k-th in float order."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[~torch.isnan(values)]
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]
    ordered = torch.sort(values.double() + 0.0).values
    for k in [1, 2, 100, 1000, values.numel() // 2, values.numel() // 2 + 1, values.numel() - 1, values.numel()]:
        assert ops.kth_smallest([shuffled], k).item() == ordered[k - 1].item()


@pytest.mark.parametrize("device", DEVICES)
def test_kth_errors(device):
    x = torch.randn(10, device=device)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\] \(the number of elements\), got 0"):
        ops.kth_smallest([x], 0)
    with pytest.raises(ValueError, match=r"got 11"):
        ops.kth_smallest([x], 11)
    with pytest.raises(ValueError, match="at least one tensor"):
        ops.kth_smallest([], 1)
    with pytest.raises(TypeError, match=r"tensors\[1\] is torch.float16 but tensors\[0\] is torch.float32"):
        ops.kth_smallest([x, x.half()], 1)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be one of"):
        ops.kth_smallest([torch.arange(3, device=device)], 1)
    bad = torch.tensor([1.0, float("nan"), 2.0], device=device)
    with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN \(1 values\)"):
        ops.kth_smallest([x, bad], 1)


def concat_masks(got):
    return torch.cat([m.reshape(-1).cpu() for m in got.values()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.001, 0.3, 0.5, 0.9, 1.0])
def test_global_masks_equal_reference(device, dtype, sparsity):
    xs = adversarial(dtype, device) + random_lists(dtype, device, 3)
    scores = {f"s{i}": x for i, x in enumerate(xs)}
    got = masks.global_unstructured(scores, sparsity)
    total = sum(x.numel() for x in xs)
    k = round(sparsity * total)
    expected = reference.prune_lowest(torch.cat([x.reshape(-1).double().cpu() for x in xs]), k)
    assert torch.equal(concat_masks(got), expected)
    assert all(m.shape == x.shape and m.dtype == torch.bool and m.device == x.device for m, x in zip(got.values(), xs))
    assert int((~concat_masks(got)).sum()) == k


@pytest.mark.parametrize("device", DEVICES)
def test_global_ties_split_across_chunks(device):
    """The threshold value fills many chunks and is only partly pruned: ranks cross chunk borders."""
    x = torch.zeros(300_000, device=device)
    x[::7] = 1.0
    y = torch.zeros(100_000, device=device)
    for k in [1, 65_535, 65_536, 65_537, 200_000, 357_142]:
        got = masks.global_unstructured({"x": x, "y": y}, k / 400_000)
        flat = torch.cat([got["x"], got["y"]]).cpu()
        expected = reference.prune_lowest(torch.cat([x, y]).cpu(), round(k / 400_000 * 400_000))
        assert torch.equal(flat, expected), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 1.0])
def test_apply_to_prunes_in_place_like_the_masks(device, sparsity):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 7)).to(device)
    scores = {n: (p.detach().abs() * 4).round() for n, p in model.named_parameters()}  # many ties
    keep = masks.global_unstructured(scores, sparsity)
    expected = {n: p.detach() * m for (n, p), m in zip(model.named_parameters(), keep.values())}
    assert masks.global_unstructured(scores, sparsity, apply_to=model) is None
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[n]), n
        assert p.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_apply_to_dict_of_non_contiguous_parameters(device):
    w = torch.randn(20, 30, device=device)
    wt = w.t()  # a transposed view: pruning it must prune w
    scores = {"wt": wt.abs().contiguous(), "b": torch.randn(9, device=device).abs()}
    b = torch.randn(9, device=device)
    keep = masks.global_unstructured(scores, 0.6)
    masks.global_unstructured(scores, 0.6, apply_to={"wt": wt, "b": b})
    assert torch.equal(wt == 0, ~keep["wt"] | (wt == 0))
    assert int((w == 0).sum()) == int((~keep["wt"]).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["layerwise", "per_row"])
def test_group_masks_equal_reference(device, dtype, granularity):
    xs = [x for x in adversarial(dtype, device) + random_lists(dtype, device, 4) if x.dim() > 0]
    scores = {f"s{i}": x for i, x in enumerate(xs)}
    for sparsity in [0.0, 0.3, 0.5, 1.0]:
        got = getattr(masks, granularity)(scores, sparsity)
        for (name, x), m in zip(scores.items(), got.values()):
            if granularity == "layerwise":
                expected = reference.prune_lowest(x.reshape(-1).cpu(), round(sparsity * x.numel())).view(x.shape)
            else:
                expected = reference.per_row_masks([x.cpu()], [round(sparsity * reference.rows_of(x).shape[1])])[0][0]
            assert torch.equal(m.cpu(), expected), (name, sparsity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["layerwise", "per_row"])
def test_group_apply_to(device, granularity):
    torch.manual_seed(1)
    model = torch.nn.Linear(50, 20).to(device)
    scores = {"weight": model.weight.detach().abs().round(decimals=1)}
    keep = getattr(masks, granularity)(scores, 0.7)["weight"]
    expected = model.weight.detach() * keep
    getattr(masks, granularity)(scores, 0.7, apply_to=model)
    assert torch.equal(model.weight.detach(), expected)


def test_masks_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 2"):
        masks.global_unstructured({"a": x}, 2)
    with pytest.raises(ValueError, match=r"scores\['b'\] contains NaN"):
        masks.global_unstructured({"a": x, "b": torch.tensor([float("nan")])}, 0.5)
    with pytest.raises(ValueError, match=r"scores\['b'\] contains NaN"):
        masks.global_unstructured({"a": x, "b": torch.tensor([float("nan")])}, 0.0)
    with pytest.raises(ValueError, match=r"scores\['a'\] contains NaN"):
        masks.layerwise({"a": torch.tensor([float("nan"), 1.0])}, 0.5)
    with pytest.raises(ValueError, match=r"apply_to has no parameters named \['a'\]"):
        masks.global_unstructured({"a": x}, 0.5, apply_to={"b": x})
    with pytest.raises(ValueError, match=r"apply_to\['a'\] has shape \(5,\) but its scores have \(10,\)"):
        masks.global_unstructured({"a": x}, 0.5, apply_to={"a": torch.zeros(5)})
    with pytest.raises(TypeError, match="apply_to must be an nn.Module or a dict"):
        masks.global_unstructured({"a": x}, 0.5, apply_to=[x])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote(device):
    a = torch.tensor([1.0, 3.0], device=device)
    b = torch.tensor([2.0], device=device, dtype=torch.float16)
    got = masks.global_unstructured({"a": a, "b": b}, 2 / 3)
    assert got["a"].tolist() == [False, True] and got["b"].tolist() == [False]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    native_or_skip(device)
    xs = [torch.randn(40, 3, device=device), torch.randn(17, device=device)]
    value, counts, _ = torch.ops.pyprune_fast.kth_smallest_counts(xs, 50)
    ops_ = torch.ops.pyprune_fast
    torch.library.opcheck(ops_.kth_smallest_counts.default, (xs, 50))
    torch.library.opcheck(ops_.threshold_masks.default, (xs, value, counts, 50))
    params = [torch.randn(40, 3, device=device), torch.randn(17, device=device)]
    torch.library.opcheck(ops_.threshold_apply_.default, (params, xs, value, counts, 50))
    torch.library.opcheck(ops_.layerwise_masks.default, (xs, [3, 4]))
    torch.library.opcheck(ops_.per_row_masks.default, ([xs[0], xs[1].view(17, 1)], [1, 0]))


@pytest.mark.over_int32
def test_more_than_2_31_elements():
    """fp16 scores over 2^31 + 2^20 elements in one tensor (4.3 GB): exact k-th values at both ends and a
    global mask whose ties (2^31 zeros) are split far past index 2^31."""
    n = 2**31 + 2**20
    x = torch.zeros(n, dtype=torch.float16)
    x[:3] = torch.tensor([-1.0, -2.0, -3.0])
    x[-5:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([-4.0, 6.0], dtype=torch.float16)
    total = n + 2
    for k, expected in [(1, -4.0), (4, -1.0), (5, 0.0), (total - 6, 0.0), (total - 5, 1.0), (total, 6.0)]:
        assert ops.kth_smallest([x, y], k).item() == expected, k
    k = 2**31 + 100  # 4 negatives, then 2^31 + 96 of the zeros: ranks past 2^31
    keep = masks.global_unstructured({"x": x, "y": y}, k / total)
    assert round(k / total * total) == k
    kx = keep["x"]
    # count_nonzero: a bool .sum() would widen 2^31 flags to int64 (17 GB)
    assert x.numel() - int(torch.count_nonzero(kx)) + 2 - int(torch.count_nonzero(keep["y"])) == k
    assert not kx[: 3 + 2**31 + 96].any()  # the negatives and the first 2^31 + 96 zeros are pruned
    assert kx[3 + 2**31 + 96 :].all()
    assert keep["y"].tolist() == [False, True]


def histogram_by_sort(xs, digit, prefix):
    """radix_histogram written out with Python ints: key, digit, prefix match, one element at a time
    over the distinct values (np.unique-style)."""
    width = torch.finfo(xs[0].dtype).bits
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    hist = [0] * 65536
    shift = width - 16 * (digit + 1)
    for x in xs:
        flat = x.detach().cpu().reshape(-1)
        values, counts = torch.unique(flat[~torch.isnan(flat)].contiguous().view(ints), return_counts=True)
        for bits, count in zip(values.tolist(), counts.tolist()):
            bits &= (1 << width) - 1
            sign = 1 << (width - 1)
            bits = 0 if bits == sign else bits
            key = (~bits & ((1 << width) - 1)) if bits & sign else bits | sign
            if (key >> (shift + 16)) == (prefix >> (shift + 16)):
                hist[(key >> shift) & 0xFFFF] += count
    nan = [int(torch.isnan(x).sum()) if digit == 0 else 0 for x in xs]
    return hist, nan


def histogram_cases(dtype, device):
    g = torch.Generator().manual_seed(5)
    xs = adversarial(dtype, device)[:3] + [torch.randn(3000, generator=g).to(device=device, dtype=dtype)]
    with_nan = [x.clone() for x in xs]
    with_nan[1][::997] = float("nan")
    with_nan[0][0] = -float("nan")
    return [xs, with_nan, [torch.empty(0, dtype=dtype, device=device), xs[3]]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_against_written_out_digits(device, dtype):
    """Every digit of the keys of the kth value as prefix (and a prefix shared with +inf and NaN keys):
    native (or reference) equals the written-out histogram, and so does the reference."""
    if device == "cuda":
        native_or_skip(device)
    width = torch.finfo(dtype).bits
    for xs in histogram_cases(dtype, device):
        ordered = [x[~torch.isnan(x)] for x in xs]
        kth = ops.kth_smallest(ordered, max(1, sum(x.numel() for x in ordered) // 3))
        kth_key = int(reference.order_keys(kth.reshape(1).cpu())[0]) & ((1 << width) - 1)
        inf_key = int(reference.order_keys(torch.tensor([float("inf")], dtype=dtype))[0]) & ((1 << width) - 1)
        for key in (kth_key, inf_key):
            for digit in range(width // 16):
                want_hist, want_nan = histogram_by_sort(xs, digit, key)
                signed = key - (1 << 64) if key >= 1 << 63 else key
                for name, (hist, nan) in {
                    "op": ops.radix_histogram(xs, digit, key),
                    "reference": reference.radix_histogram(xs, digit, signed),
                }.items():
                    assert hist.dtype == torch.int64 and hist.shape == (65536,) and hist.device.type == device
                    assert hist.cpu().tolist() == want_hist, (name, digit)
                    assert nan.cpu().tolist() == want_nan, (name, digit)


def test_radix_histogram_passes_select_the_kth_value():
    """Summing digit histograms and picking bins as a radix select does gives ops.kth_smallest."""
    xs = random_lists(torch.float64, "cpu", 3)
    total = sum(x.numel() for x in xs)
    for k in [1, total // 2, total]:
        prefix, rank = 0, k
        for digit in range(4):
            cum = ops.radix_histogram(xs, digit, prefix)[0].cumsum(0)
            b = int(torch.searchsorted(cum, torch.tensor([rank]))[0])
            rank -= int(cum[b - 1]) if b else 0
            prefix |= b << (64 - 16 * (digit + 1))
        assert prefix == int(reference.order_keys(ops.kth_smallest(xs, k).reshape(1))[0]) & (2**64 - 1)


def test_radix_histogram_checks_arguments():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="digit must be in \\[0, 2\\)"):
        ops.radix_histogram([x], 2)
    with pytest.raises(ValueError, match="digit must be in \\[0, 1\\)"):
        ops.radix_histogram([x.half()], 1)
    with pytest.raises(ValueError, match="prefix must be a 32-bit key"):
        ops.radix_histogram([x], 1, 1 << 32)
    with pytest.raises(TypeError, match="tensors\\[1\\] is torch.float64"):
        ops.radix_histogram([x, x.double()], 0)
    with pytest.raises(ValueError, match="at least one tensor"):
        ops.radix_histogram([], 0)


@pytest.mark.parametrize("device", DEVICES)
def test_radix_histogram_opcheck(device):
    native_or_skip(device)
    if not hasattr(torch.ops.pyprune_fast, "radix_histogram"):
        pytest.skip("the loaded library was built before radix_histogram: rebuild it")
    xs = [torch.randn(100, device=device), torch.randn(3, 7, device=device)]
    torch.library.opcheck(torch.ops.pyprune_fast.radix_histogram, (xs, 0, 0))
    torch.library.opcheck(torch.ops.pyprune_fast.radix_histogram, (xs, 1, 0x3F800000 | (1 << 31)))
