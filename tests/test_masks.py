"""Masks: exact counts and the tie rules, written out independently of the production code."""

import numpy as np
import pytest
import torch
from torch import nn

from pyprune_fast import masks


def brute_prune(values: list[float], count: int) -> list[bool]:
    """Keep-flags with `count` lowest pruned; ties: the lower index is pruned first."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    pruned = set(order[:count])
    return [i not in pruned for i in range(len(values))]


def test_global_exact_count_and_ties():
    scores = {"a": torch.tensor([[1.0, 0.0], [2.0, 0.0]]), "b": torch.tensor([0.0, -0.0, 3.0])}
    keep = masks.global_unstructured(scores, 0.5)  # round(0.5 * 7) = 4 pruned: the four zeros in flat order
    assert keep["a"].tolist() == [[True, False], [True, False]]
    assert keep["b"].tolist() == [False, False, True]
    keep = masks.global_unstructured(scores, 3 / 7)  # 3 pruned: zeros at flat 1, 3, 4 (a's two, then b[0])
    assert keep["b"].tolist() == [False, True, True]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_global_and_layerwise_against_brute_force(seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    scores = {
        f"t{i}": torch.randint(0, 5, (int(torch.randint(1, 9, (1,), generator=g)), 3), generator=g).float()
        for i in range(4)
    }
    flat = [v for s in scores.values() for v in s.reshape(-1).tolist()]
    expected = brute_prune(flat, round(sparsity * len(flat)))
    got = masks.global_unstructured(scores, sparsity)
    assert [v for m in got.values() for v in m.reshape(-1).tolist()] == expected
    for name, s in masks.layerwise(scores, sparsity).items():
        values = scores[name].reshape(-1).tolist()
        assert s.reshape(-1).tolist() == brute_prune(values, round(sparsity * len(values)))


@pytest.mark.parametrize("seed", range(4))
def test_per_row_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    scores = {"w": torch.randint(0, 3, (5, 2, 3), generator=g).float(), "v": torch.randn(4, 7, generator=g)}
    got = masks.per_row(scores, 0.4)
    for name, s in scores.items():
        rows = s.reshape(s.shape[0], -1)
        for r in range(rows.shape[0]):
            values = rows[r].tolist()
            assert got[name].reshape(rows.shape)[r].tolist() == brute_prune(values, round(0.4 * len(values)))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (0, 2), (3, 3)])
def test_n_m_against_brute_force(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    s = torch.randint(0, 3, (6, 2 * m), generator=g).float()
    got = masks.n_m({"w": s}, n, m)["w"]
    for r in range(6):
        for start in range(0, 2 * m, m):
            values = s[r, start : start + m].tolist()
            order = sorted(range(m), key=lambda i: (-values[i], i))  # highest first, lower index first
            expected = [i in order[:n] for i in range(m)]
            assert got[r, start : start + m].tolist() == expected


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: masks.global_unstructured({"a": torch.ones(3)}, 1.5),
            ValueError,
            r"sparsity must be in \[0, 1\], got 1.5",
        ),
        (lambda: masks.layerwise({"a": torch.ones(3)}, -0.1), ValueError, r"sparsity must be in \[0, 1\]"),
        (lambda: masks.global_unstructured({"a": torch.ones(3, dtype=torch.int64)}, 0.5), TypeError, "floating-point"),
        (
            lambda: masks.per_row({"a": torch.tensor([1.0, float("nan")])}, 0.5),
            ValueError,
            r"scores\['a'\] contains NaN",
        ),
        (lambda: masks.n_m({"a": torch.ones(2, 6)}, 2, 4), ValueError, "row length 6 .* not divisible by m=4"),
        (lambda: masks.n_m({"a": torch.ones(2, 8)}, 5, 4), ValueError, "n:m must satisfy"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_apply_masks_in_place():
    model = torch.nn.Linear(3, 2)
    keep = {"weight": torch.tensor([[True, False, True], [False, True, True]])}
    masks.apply_masks(model, keep)
    assert (model.weight[~keep["weight"]] == 0).all() and (model.weight[keep["weight"]] != 0).all()
    with pytest.raises(ValueError, match="masks name parameters the model does not have"):
        masks.apply_masks(model, {"nope": torch.ones(1, dtype=torch.bool)})


def test_empty_score_dicts_give_empty_masks_at_every_granularity():
    assert masks.global_unstructured({}, 0.5) == {}
    assert masks.layerwise({}, 0.5) == {}
    assert masks.per_row({}, 0.5) == {}
    assert masks.channels({}, 0.5, scope="layer") == {}
    assert masks.channels({}, 0.5, scope="global") == {}
    assert masks.layerwise({}, 0.5, apply_to={}) is None


@pytest.mark.parametrize(
    "sparsity", [np.float64(0.5), np.float32(0.5), np.float16(0.5), torch.tensor(0.5), torch.tensor(0.5).double()]
)
def test_sparsity_as_a_numpy_or_0d_tensor_scalar(sparsity):
    scores = {"a": torch.tensor([[4.0, 1.0, 3.0, 2.0]]), "b": torch.tensor([[0.5, 6.0, 5.0, 7.0]])}
    for fn in (masks.global_unstructured, masks.layerwise, masks.per_row):
        expected = fn(scores, 0.5)
        got = fn(scores, sparsity)
        assert all(torch.equal(got[n], expected[n]) for n in expected), fn.__name__
    assert masks.global_unstructured(scores, np.int64(1))["a"].sum() == 0  # an integer 1: everything pruned
    channel = {"c": torch.tensor([3.0, 1.0, 2.0, 0.0])}
    assert masks.channels(channel, torch.tensor(0.5), scope="layer")["c"].tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    "sparsity",
    [
        True,
        np.bool_(False),
        torch.tensor(True),
        float("nan"),
        np.float64("nan"),
        torch.tensor(float("nan")),
        np.float32(1.5),
        torch.tensor(-0.1),
        torch.tensor([0.5]),
        "0.5",
        None,
    ],
)
def test_sparsity_refused_with_its_value(sparsity):
    for fn in (masks.global_unstructured, masks.layerwise, masks.per_row):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got "):
            fn({"a": torch.ones(2, 4)}, sparsity)


def test_keep_follows_the_model_to_another_dtype():
    """masks.keep, then model.half(): the parameters are the same objects with other data; the masks
    follow them (converted once), and a shape changed since is refused naming the parameter."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    keep_mask = torch.rand(4, 8) > 0.5
    with masks.keep(model, {"weight": keep_mask}):
        model.half()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 8, dtype=torch.half)).sum().backward()
        opt.step()
        assert model.weight.dtype == torch.half
        assert bool((model.weight[~keep_mask] == 0).all()) and bool((model.weight[keep_mask] != 0).any())
        model.weight.data = torch.ones(4, 4, dtype=torch.half)
        model.weight.grad = None
        with pytest.raises(ValueError, match="masks.keep: parameter 'weight' has shape \\(4, 4\\) now"):
            opt.step()
