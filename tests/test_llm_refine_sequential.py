"""Sequential reconstruction against the dense model (llm.refine.reconstruct, mode "sequential"): the
closed form against torch.linalg.lstsq on the augmented least-squares problem, written independently;
the Linears grouped in their call order; the dense model's inputs of every block that the pipeline
hands to the refinement; the masks kept exactly; and the pruned model closer to the dense one than
with the plain per-Linear solve."""

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.llm.refine import Gain, Reconstruct, Refinement
from pyprune_fast.llm.refine.reconstruct import call_groups, dense_target_least_squares_, masked_least_squares_
from pyprune_fast.llm.refine.swap import layer_error
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_pipeline import N_SAMPLES, SEQ_LEN, calibration, run
from tests.test_llm_refine_swap import nm_keep, problem, row_keep


def lstsq_reference(xd, xp, dense, keep, damp):
    """Each row's min ‖X_d w_dᵀ − X_p[:, S] ŵ_Sᵀ‖² + damp·‖ŵ_S − w_d,S‖², by torch.linalg.lstsq on the
    stacked system [X_p[:, S]; √damp·I] ŵ_Sᵀ = [X_d w_dᵀ; √damp·w_d,Sᵀ]."""
    out = torch.zeros_like(dense)
    for r in range(dense.shape[0]):
        s = keep[r]
        lhs = torch.cat([xp[:, s], damp**0.5 * torch.eye(int(s.sum()), dtype=xp.dtype)])
        rhs = torch.cat([xd @ dense[r], damp**0.5 * dense[r, s]])
        out[r, s] = torch.linalg.lstsq(lhs, rhs.unsqueeze(1)).solution.squeeze(1)
    return out


def inputs_pair(seed, d=16, tokens=64):
    """Dense-model inputs X_d and the pruned model's X_p = X_d plus a correlated error."""
    xd, w = problem(rows=5, d=d, tokens=tokens, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    xp = xd + 0.3 * torch.randn(tokens, d, generator=g, dtype=xd.dtype) @ torch.randn(d, d, generator=g, dtype=xd.dtype)
    return xd, xp, w


def stats_of(xd, xp, w):
    return xp.T @ xp, xd.T @ xp, float((xd @ w.T).pow(2).sum())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["2:4", "row"])
@pytest.mark.parametrize("rank", [0, 3])
def test_the_dense_target_solve_equals_lstsq_on_each_rows_support(seed, kind, rank):
    xd, xp, w = inputs_pair(seed)
    keep = nm_keep(w, xp) if kind == "2:4" else row_keep(w, xp, 7)
    weight = w * keep
    percdamp = 0.01
    damp = percdamp * float((xp.T @ xp).diagonal().mean())
    stats = stats_of(xd, xp, w)
    before, after = dense_target_least_squares_(weight, keep, w, stats, percdamp, iterations=16, rank=rank)
    torch.testing.assert_close(weight, lstsq_reference(xd, xp, w, keep, damp), rtol=1e-7, atol=1e-9)
    assert not bool(weight[~keep].any())
    # the returned errors are the undamped ‖X_d w_dᵀ − X_p ŵᵀ‖², measured directly
    torch.testing.assert_close(before, float((xd @ w.T - xp @ (w * keep).T).pow(2).sum()), rtol=1e-9, atol=0)
    torch.testing.assert_close(after, float((xd @ w.T - xp @ weight.T).pow(2).sum()), rtol=1e-9, atol=0)
    assert after < before


def test_the_dense_target_solve_is_the_plain_solve_when_the_inputs_agree():
    x, w = problem(rows=5, d=16, tokens=64, seed=4)
    keep = nm_keep(w, x)
    a, b = w * keep, w * keep
    masked_least_squares_(a, keep, w, x.T @ x, 0.01, iterations=16)
    dense_target_least_squares_(b, keep, w, stats_of(x, x, w), 0.01, iterations=16)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def outlier_problem(seed, d=128, tokens=512, rows=24):
    """Inputs like an LLM's calibration activations: a few feature directions with 30-100× the scale of
    the rest (outlier features), which make XᵀX ill-conditioned beyond what its diagonal shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    strong = torch.randn(tokens, 4, generator=g, dtype=torch.float64) * torch.tensor([100.0, 60.0, 40.0, 30.0])
    x = x + strong @ torch.randn(4, d, generator=g, dtype=torch.float64) / d**0.5
    return x, torch.randn(rows, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_the_low_rank_preconditioner_converges_faster_than_the_diagonal(seed):
    x, w = outlier_problem(seed)
    keep = nm_keep(w, x)
    h = x.T @ x
    best = w * keep
    masked_least_squares_(best, keep, w, h, 0.01, iterations=400, rank=0)
    exact = lstsq_reference(x, x, w, keep, 0.01 * float(h.diagonal().mean()))
    torch.testing.assert_close(best, exact, rtol=1e-6, atol=1e-8)  # the common optimum

    def excess(rank):
        weight = w * keep
        masked_least_squares_(weight, keep, w, h, 0.01, iterations=6, rank=rank)
        assert not bool(weight[~keep].any())
        e, e0, e1 = (float(layer_error(w, v, h).sum()) for v in (exact, w * keep, weight))
        return (e1 - e) / (e0 - e)

    jacobi, low_rank = excess(0), excess(8)
    assert -1e-6 < low_rank < 0.01 * jacobi, (low_rank, jacobi)


def test_the_dense_target_solve_never_raises_the_undamped_error():
    xd, xp, w = inputs_pair(5, d=8)
    keep = nm_keep(w, xp)
    best = lstsq_reference(xd, xp, w, keep, 0.0)  # already optimal: a damped solve only moves away
    weight = best.clone()
    before, after = dense_target_least_squares_(weight, keep, w, stats_of(xd, xp, w), percdamp=10.0, iterations=8)
    assert after == before and torch.equal(weight, best)


def test_linears_are_grouped_by_shared_input_in_call_order():
    model = tiny_causal_lm("llama")
    inputs = llm.blocks.capture_inputs(model, model.model.layers[0], [windows()[:2]], torch.device("cpu"))
    groups = call_groups(model.model.layers[0], llm.block_linears(model.model.layers[0]), inputs)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


class Spy(Refinement):
    """Records the dense model's inputs of every block as the pipeline hands them over."""

    name, stage, keeps_dense_inputs = "spy", "masked", True

    def __init__(self):
        self.seen = []

    def refine_(self, step):
        given = step.dense_inputs if step.dense_inputs is not None else step.block.inputs.hidden
        self.seen.append(torch.cat([h.clone() for h in given]))
        return Gain("nothing", 0.0, 0.0)


def test_the_pipeline_hands_over_the_dense_models_own_block_inputs():
    model = tiny_causal_lm("llama")
    dense = copy.deepcopy(model)
    spy = Spy()
    run(model, "wanda", "2:4", refine=spy, batch_size=2)
    with torch.no_grad():
        hidden = dense(windows(), output_hidden_states=True).hidden_states
    assert len(spy.seen) == len(hidden) - 1
    for i, got in enumerate(spy.seen):
        torch.testing.assert_close(got, hidden[i], rtol=1e-5, atol=1e-5)
    # ... which differ from the pruned model's inputs after block 0
    with torch.no_grad():
        pruned = model(windows(), output_hidden_states=True).hidden_states
    assert not torch.allclose(pruned[1], hidden[1], atol=1e-3)


def windows():
    return llm.calibration_windows(calibration(), N_SAMPLES, SEQ_LEN)


def final_error(model, dense_logits):
    with torch.no_grad():
        logits = model(windows()).logits
    return float((logits - dense_logits).pow(2).sum() / dense_logits.pow(2).sum())


@pytest.mark.parametrize("method,sparsity", [("wanda", "2:4"), ("sparsegpt", "2:4"), ("sparsegpt", 0.5)])
def test_sequential_keeps_the_masks_and_ends_closer_to_the_dense_model_than_the_plain_solve(method, sparsity):
    """toward=1 (the dense model's target); toward=0 below."""
    base = tiny_causal_lm("llama")
    with torch.no_grad():
        dense_logits = base(windows()).logits
    plain, seq, none = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    run(none, method, sparsity)
    run(plain, method, sparsity, refine=Reconstruct("linear"))
    result = run(seq, method, sparsity, refine=Reconstruct("sequential"))
    gains = result.refinements["reconstruct"]
    assert all(g.after <= g.before for g in gains) and all(g.after < g.before for g in gains[:1])
    first = {n: w for n, w in seq.state_dict().items() if ".layers.0." in n and n.endswith("proj.weight")}
    for n, w in first.items():  # block 0 sees the same inputs in every run: the method's masks, kept
        assert torch.equal(w == 0, none.state_dict()[n] == 0), n
    for n, w in seq.state_dict().items():
        if n.endswith("proj.weight"):
            assert int((w == 0).sum()) == int((none.state_dict()[n] == 0).sum()), n
    assert final_error(seq, dense_logits) < final_error(plain, dense_logits) < final_error(none, dense_logits)


@pytest.mark.parametrize("toward", [0.0, 0.3])
def test_toward_blends_the_dense_models_target_with_the_pruned_inputs_own(toward):
    xd, xp, w = inputs_pair(6)
    keep = nm_keep(w, xp)
    weight = w * keep
    damp = 0.01 * float((xp.T @ xp).diagonal().mean())
    dense_target_least_squares_(weight, keep, w, stats_of(xd, xp, w), 0.01, iterations=16, toward=toward)
    blend = toward * xd + (1 - toward) * xp  # the aim X_t w_dᵀ, fitted by lstsq
    torch.testing.assert_close(weight, lstsq_reference(blend, xp, w, keep, damp), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("toward", [-0.1, 1.5, float("nan"), True])
def test_toward_outside_0_1_is_refused(toward):
    with pytest.raises(ValueError, match="toward must be a number in"):
        Reconstruct("sequential", toward=toward)


def test_sequential_without_the_dense_target_runs_no_dense_stream_and_still_gains():
    base = tiny_causal_lm("llama")
    with torch.no_grad():
        dense_logits = base(windows()).logits
    none, seq = copy.deepcopy(base), copy.deepcopy(base)
    run(none, "wanda", "2:4")
    refinement = Reconstruct("sequential", toward=0.0)
    assert not refinement.keeps_dense_inputs
    result = run(seq, "wanda", "2:4", refine=refinement)
    gains = result.refinements["reconstruct"]
    assert all(g.metric == "layer error" and g.after < g.before for g in gains)
    for n, w in seq.state_dict().items():
        if n.endswith("proj.weight") and ".layers.0." in n:
            assert torch.equal(w == 0, none.state_dict()[n] == 0), n
    assert final_error(seq, dense_logits) < final_error(none, dense_logits)


def test_streamed_from_disk_the_dense_stream_gives_the_in_memory_result(tmp_path):
    from tests.test_llm_offload import OPTIONS, assert_same_model, checkpoint, load

    model, path = checkpoint(tmp_path, "llama")
    refine = Reconstruct("sequential", toward=1.0)
    llm.prune(path, calibration(), method="wanda", sparsity="2:4", offload="disk", out=tmp_path / "o", refine=refine,
              **OPTIONS)  # fmt: skip
    llm.prune(model, calibration(), method="wanda", sparsity="2:4", refine=refine, **OPTIONS)
    assert_same_model(load(tmp_path / "o"), model)
