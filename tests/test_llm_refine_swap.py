"""Swaps (llm.refine.swap): against a brute-force search that re-solves the revived weight by least
squares on the activations themselves, the pattern and counts exact, the layer error never higher, and
the refinement in the pipeline."""

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.llm.refine.swap import group_pairs, group_swaps, layer_error, row_swaps, swap_
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_pipeline import run


def problem(rows=6, d=8, tokens=40, seed=0, dtype=torch.float64):
    """Correlated input features of unequal scales (activations), random weights."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d, dtype=dtype) + 0.5 * torch.randn(d, d, generator=g, dtype=dtype)
    x = torch.randn(tokens, d, generator=g, dtype=dtype) @ mixing * torch.rand(d, generator=g, dtype=dtype).add(0.2)
    w = torch.randn(rows, d, generator=g, dtype=dtype)
    return x, w


def nm_keep(w, x, n=2, m=4):
    score = (w.abs() * x.norm(dim=0)).view(w.shape[0], -1, m)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(2, score.topk(n, dim=2).indices, True)
    return keep.view_as(w)


def row_keep(w, x, kept):
    score = w.abs() * x.norm(dim=0)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.scatter_(1, score.topk(kept, dim=1).indices, True)
    return keep


def brute_force_best(x, dense, weight, keep, m):
    """Every row's best single swap, every candidate pair tried explicitly: the revived weight fitted by
    least squares on X, the error measured as ‖X(w − ŵ)ᵀ‖². Returns [(error, p, q, new row) or None]."""
    out = []
    for r in range(weight.shape[0]):
        best = None
        for p in torch.nonzero(keep[r]).flatten().tolist():
            for q in torch.nonzero(~keep[r]).flatten().tolist():
                if m is not None and p // m != q // m or float(x[:, q].pow(2).sum()) == 0:
                    continue
                trial = weight[r].clone()
                trial[p] = 0
                base = x @ (dense[r] - trial)
                trial[q] = float(torch.linalg.lstsq(x[:, q : q + 1], base.unsqueeze(1)).solution)
                e = float((x @ (dense[r] - trial)).pow(2).sum())
                if best is None or e < best[0]:
                    best = (e, p, q, trial)
        out.append(best)
    return out


def case(seed, kind):
    x, w = problem(seed=seed, d=8 if kind == "2:4" else 7)
    keep = nm_keep(w, x) if kind == "2:4" else row_keep(w, x, 3)
    start = w * keep
    if seed % 2:  # kept weights updated as SparseGPT's are, not the dense values
        start = start + 0.3 * torch.randn_like(w, generator=torch.Generator().manual_seed(9)) * keep
    return x, w, keep, start, (4 if kind == "2:4" else None)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["2:4", "row"])
def test_each_rows_best_swap_equals_a_brute_force_search(seed, kind):
    x, w, keep, start, m = case(seed, kind)
    h = x.T @ x
    g = (w - start) @ h
    if m is None:
        delta, p, q = row_swaps(start, keep, g, h, candidates=8)
    else:
        delta, p, q = group_swaps(start, keep, g, h, group_pairs(h, m))
    best, where = delta.min(1)
    errors = layer_error(w, start, h)
    for r, want in enumerate(brute_force_best(x, w, start, keep, m)):
        assert (int(p[r, where[r]]), int(q[r, where[r]])) == want[1:3]
        torch.testing.assert_close(float(errors[r] + best[r]), want[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["2:4", "row"])
def test_swaps_end_where_brute_force_finds_no_better_swap(seed, kind):
    x, w, keep, start, m = case(seed, kind)
    got_w, got_keep = start.clone(), keep.clone()
    before, after, swaps = swap_(got_w, got_keep, w, x.T @ x, m, budget=100, candidates=8)
    assert swaps > 0 and after < before
    torch.testing.assert_close(after, float(layer_error(w, got_w, x.T @ x).sum()), rtol=1e-9, atol=0)
    errors = (x @ (w - got_w).T).pow(2).sum(0)
    for r, best in enumerate(brute_force_best(x, w, got_w, got_keep, m)):
        assert best is None or best[0] >= float(errors[r]) * (1 - 1e-6), f"row {r} still has a better swap"


@pytest.mark.parametrize("seed", range(3))
def test_pattern_exact_error_never_higher_and_dead_inputs_never_revived(seed):
    x, w = problem(rows=16, d=32, tokens=64, seed=seed, dtype=torch.float32)
    x[:, 5] = 0  # an input that is always zero
    x[:, 9] *= 1e3  # an outlier feature
    h = x.T @ x
    for m, keep in ((4, nm_keep(w, x)), (None, row_keep(w, x, 12))):
        weight, k = (w * keep), keep.clone()
        before_rows = layer_error(w, weight, h)
        e0, e1, _ = swap_(weight, k, w, h, m, budget=50)
        assert e1 <= e0
        assert float(layer_error(w, weight, h).sum()) <= float(before_rows.sum()) * (1 + 1e-5)
        assert not bool(weight[~k].any()), "pruned weights are zero"
        if m:
            assert bool((k.view(16, -1, 4).sum(2) == 2).all())
        else:
            assert bool((k.sum(1) == 12).all())
        assert not bool(k[:, 5][~keep[:, 5]].any()), "a dead input is never revived"


def test_bad_swap_options_are_refused():
    from pyprune_fast.llm.refine import Swap

    with pytest.raises(ValueError, match="budget must be a positive int"):
        Swap(budget=0)
    with pytest.raises(ValueError, match="candidates must be a positive int"):
        Swap(candidates=True)


@pytest.mark.parametrize("sparsity,granularity", [("2:4", None), (0.5, "row"), (0.5, "layer")])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_swap_in_the_pipeline_keeps_counts_and_lowers_the_layer_error(method, sparsity, granularity):
    model = tiny_causal_lm("llama")
    plain = tiny_causal_lm("llama")
    result = run(model, method, sparsity, granularity=granularity, refine="swap")
    run(plain, method, sparsity, granularity=granularity)
    gains = result.refinements["swap"]
    assert len(gains) == len(llm.find_blocks(model)[1])
    assert all(g.after <= g.before for g in gains) and any(g.after < g.before for g in gains)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        if a.dim() == 2 and "layers" in name:
            if sparsity == "2:4":
                assert bool(((a != 0).view(a.shape[0], -1, 4).sum(2) <= 2).all()), name
            elif granularity == "row":
                assert torch.equal((a == 0).sum(1), (b == 0).sum(1)), name
            assert int((a == 0).sum()) == int((b == 0).sum()), name
    assert "refine swap: layer error" in result.summary()


def test_swap_refuses_nested_runs_before_touching_the_model():
    model = tiny_causal_lm("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="nested=True"):
        run(model, "wanda", 0.5, refine=["swap"], nested=True)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
