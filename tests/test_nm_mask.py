"""The fused N:M mask op (ops.nm_mask, behind masks.n_m) against reference.n_m, the sort-based spec."""

import pytest
import torch

import pyprune_fast as ppf
from pyprune_fast import masks, ops, reference
from tests.conftest import DEVICES, native_or_skip
from tests.models import image_batches, tiny_vit

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def expected(scores, n, m):
    return [reference.n_m({"s": s.cpu()}, n, m)["s"] for s in scores]


def assert_masks(got, scores, n, m):
    for keep, s, ref in zip(got, scores, expected(scores, n, m)):
        assert keep.dtype == torch.bool and keep.shape == s.shape and keep.device == s.device
        assert torch.equal(keep.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (0, 4), (4, 4), (1, 2), (4, 8), (3, 6), (5, 16), (1, 1)])
def test_matches_reference_with_ties(device, dtype, n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    # few distinct values: many ties in every group
    scores = [
        torch.randint(-2, 3, (8, 6 * m), generator=g).to(device=device, dtype=dtype),
        torch.randn(3, 5, m, generator=g).to(device=device, dtype=dtype),
        torch.randint(0, 2, (70000 // m * m,), generator=g).to(device=device, dtype=dtype),
    ]
    keep, nan = ops.nm_mask(scores, n, m)
    assert_masks(keep, scores, n, m)
    assert nan.tolist() == [0, 0, 0] and nan.device == scores[0].device
    assert all(int(k.reshape(-1, m).sum(1).eq(n).all()) for k in keep)  # exactly n kept in every group


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_signed_zero_and_infinities(device, dtype):
    inf = float("inf")
    s = torch.tensor(
        [
            [-0.0, 0.0, -0.0, 0.0],  # all equal: the two lowest indices kept
            [0.0, -0.0, 1.0, -1.0],  # 1.0, then 0.0 (index 0) over -0.0 (index 1)
            [inf, -inf, inf, 5.0],  # both +inf
            [-inf, -inf, -inf, -inf],
            [-inf, 3.0, -inf, -inf],  # 3.0 and the first -inf
            [1e-30, -1e-30, 0.0, 65504.0],
        ],
        dtype=dtype,
        device=device,
    )
    keep = masks.n_m({"w": s})["w"].cpu().tolist()
    assert keep[0] == [True, True, False, False]
    assert keep[1] == [True, False, True, False]
    assert keep[2] == [True, False, True, False]
    assert keep[3] == [True, True, False, False]
    assert keep[4] == [True, True, False, False]
    assert_masks(ops.nm_mask([s], 2, 4)[0], [s], 2, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty_and_many_tensors(device):
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 4, (16, 24), generator=g).float().to(device)
    scores = [base.t(), base[::2], torch.zeros(0, 8, device=device), base.half()[:, 4:12]]
    scores += [torch.randn(4, 8, generator=g).to(device) for _ in range(150)]
    keep, nan = ops.nm_mask(scores, 2, 4)
    assert_masks(keep, scores, 2, 4)
    assert nan.shape == (len(scores),) and int(nan.sum()) == 0
    assert ops.nm_mask([], 2, 4)[0] == []


@pytest.mark.parametrize("device", DEVICES)
def test_nan_is_counted_and_refused_by_name(device):
    s = torch.ones(4, 8, device=device)
    s[1, 5] = float("nan")
    s[3, 0] = float("nan")
    _, nan = ops.nm_mask([torch.ones(2, 4, device=device), s, s.half()], 2, 4)
    assert nan.tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match=r"scores\['b'\] contains NaN"):
        masks.n_m({"a": torch.ones(2, 4, device=device), "b": s})


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ops.nm_mask([torch.ones(2, 5)], 2, 4), ValueError, r"scores\[0\] has 10 entries .* multiple of m=4"),
        (lambda: ops.nm_mask([torch.ones(8)], 3, 2), ValueError, "n:m must satisfy"),
        (lambda: ops.nm_mask([torch.ones(8)], 2, True), TypeError, "m must be an int"),
        (lambda: ops.nm_mask([torch.ones(8, dtype=torch.int32)], 2, 4), TypeError, r"scores\[0\] must be one of"),
        (lambda: ops.nm_mask(torch.ones(8), 2, 4), TypeError, "scores must be a list of tensors"),
        (lambda: masks.n_m({"a": torch.ones(8, dtype=torch.int64)}), TypeError, "floating-point"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_n_m_composes_with_criteria_scores():
    model = tiny_vit()
    scores = {n: s for n, s in ppf.score(model, "snip", image_batches()).items() if s[0].numel() % 4 == 0}
    keep = masks.n_m(scores)
    assert keep.keys() == scores.keys()
    assert_masks(list(keep.values()), list(scores.values()), 2, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    native_or_skip(device)
    scores = [torch.randn(4, 8, device=device), torch.randn(2, 3, 4, device=device).half()]
    torch.library.opcheck(torch.ops.pyprune_fast.nm_mask.default, (scores, 2, 4))


@pytest.mark.cuda
def test_scores_on_several_devices():
    scores = {"a": torch.randn(4, 8), "b": torch.randn(4, 8).cuda(), "c": torch.randn(8, 4)}
    keep = masks.n_m(scores)
    assert list(keep) == ["a", "b", "c"] and keep["b"].is_cuda
    assert_masks(list(keep.values()), list(scores.values()), 2, 4)


@pytest.mark.cuda
def test_cuda_matches_cpu_on_many_tensors():
    native_or_skip("cuda")
    g = torch.Generator().manual_seed(7)
    scores = [torch.randint(0, 5, (i % 7 + 1, 4 * (i % 300 + 1)), generator=g).float() for i in range(400)]
    cpu_keep, _ = ops.nm_mask(scores, 2, 4)
    gpu_keep, nan = ops.nm_mask([s.cuda() for s in scores], 2, 4)
    assert all(torch.equal(c, g.cpu()) for c, g in zip(cpu_keep, gpu_keep))
    assert int(nan.sum()) == 0
