"""Reconstruction after masking (llm.refine.reconstruct): the closed form against a direct solve of
every row's masked least squares, the masks kept exactly, the errors falling, each mode in the
pipeline, and clear errors on non-finite calibration activations with the model left as it was."""

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.llm.refine import Reconstruct
from pyprune_fast.llm.refine.reconstruct import masked_least_squares_, parts
from pyprune_fast.llm.refine.swap import layer_error
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_pipeline import run
from tests.test_llm_refine_swap import nm_keep, problem, row_keep


def direct(dense, keep, xtx, percdamp):
    """Each row's A_SS ŵ_S = (A w)_S solved directly, A = XᵀX + λI."""
    a = xtx.clone()
    a.diagonal().add_(percdamp * float(xtx.diagonal().mean()))
    out = torch.zeros_like(dense)
    for r in range(dense.shape[0]):
        s = keep[r]
        out[r, s] = torch.linalg.solve(a[s][:, s], (dense[r] @ a)[s])
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["2:4", "row"])
def test_the_closed_form_equals_a_direct_solve_of_each_rows_masked_least_squares(seed, kind):
    x, w = problem(rows=5, d=16, tokens=64, seed=seed)
    keep = nm_keep(w, x) if kind == "2:4" else row_keep(w, x, 7)
    weight = w * keep
    h = x.T @ x
    before, after = masked_least_squares_(weight, keep, w, h, percdamp=0.01, iterations=16)
    torch.testing.assert_close(weight, direct(w, keep, h, 0.01), rtol=1e-7, atol=1e-9)
    assert not bool(weight[~keep].any())
    assert after < before
    torch.testing.assert_close(after, float(layer_error(w, weight, h).sum()), rtol=1e-9, atol=0)


def test_the_closed_form_never_raises_the_undamped_error():
    x, w = problem(rows=4, d=8, tokens=64, seed=3)
    keep = nm_keep(w, x)
    h = x.T @ x
    best = direct(w, keep, h, 0.0)  # already optimal: a damped solve can only move away from it
    weight = best.clone()
    before, after = masked_least_squares_(weight, keep, w, h, percdamp=10.0, iterations=8)
    assert after == before and torch.equal(weight, best)


def test_parts_are_attention_and_mlp_or_bare_linears():
    assert set(parts(llm.find_blocks(tiny_causal_lm("llama"))[1][0])) == {"self_attn", "mlp"}
    assert set(parts(llm.find_blocks(tiny_causal_lm("opt"))[1][0])) == {"self_attn", "fc1", "fc2"}


MODES = [
    Reconstruct("linear"),
    Reconstruct("sequential"),
    Reconstruct("block", steps=8, lr=1e-3),
    Reconstruct("parts", steps=8, lr=1e-3),
]


@pytest.mark.parametrize("refinement", MODES, ids=lambda r: r.mode)
@pytest.mark.parametrize("method,sparsity", [("wanda", "2:4"), ("sparsegpt", 0.5), ("magnitude", 0.6)])
def test_masks_kept_exactly_and_the_error_falls(refinement, method, sparsity):
    model, plain = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    before = copy.deepcopy(model.state_dict())
    run(plain, method, sparsity)
    result = run(model, method, sparsity, refine=refinement)
    gains = result.refinements["reconstruct"]
    assert all(g.after <= g.before for g in gains) and any(g.after < g.before for g in gains)
    changed = False
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        if name.endswith("proj.weight") and ".layers." in name:
            assert int((a == 0).sum()) == int((b == 0).sum()), f"{name}: exact sparsity"
            if ".layers.0." in name:  # later blocks see other inputs, so other masks
                assert torch.equal(a == 0, b == 0), f"{name}: the masks are the method's"
                changed |= not torch.equal(a, b)
        elif name.endswith("norm.weight"):
            assert torch.equal(a, before[name])
    assert changed
    assert all(p.grad is None for p in model.parameters())


def test_block_reconstruction_lowers_the_measured_block_errors():
    model, plain = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    base = run(plain, "wanda", "2:4", block_errors=True).block_error
    got = run(model, "wanda", "2:4", block_errors=True, refine=Reconstruct("block", steps=10, lr=1e-3)).block_error
    assert got[0] < base[0]
    assert sum(got) < sum(base)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "global"}, "mode must be one of"),
        ({"iterations": 0}, "iterations must be a positive int"),
        ({"steps": 1.5}, "steps must be a positive int"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"percdamp": -1}, "percdamp must be a finite number"),
        ({"rank": -1}, "rank must be an int >= 0"),
        ({"rank": True}, "rank must be an int >= 0"),
    ],
)
def test_bad_reconstruct_options_are_refused(kwargs, match):
    mode = kwargs.pop("mode", "linear")
    with pytest.raises(ValueError, match=match):
        Reconstruct(mode, **kwargs)


@pytest.mark.parametrize(
    "refine", ["swap", Reconstruct("linear"), Reconstruct("sequential"), Reconstruct("block", steps=2)], ids=str
)
def test_non_finite_calibration_activations_are_refused_and_the_model_left_as_it_was(refine):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"(not finite|non-finite)"):
        run(model, "magnitude", "2:4", refine=refine)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_in_features_not_a_multiple_of_m_is_refused_before_anything_is_touched():
    model = tiny_causal_lm("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"in_features \d+ is not divisible by m=5"):
        run(model, "wanda", "2:5", refine=("swap", "reconstruct"))
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
