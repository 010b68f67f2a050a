"""The refinement protocol of the block pipeline (llm.refine): what each stage receives, the order the
pipeline applies refinements in whatever order they are named, refusals before anything is touched,
the model given back when a refinement fails, and each refinement's gains in the result."""

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.llm.refine import BlockStep, Gain, ModelStep, Refinement, get_refinements, register_refinement
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_pipeline import N_SAMPLES, run


class Recorder(Refinement):
    """Records what each call receives; optionally fails at a block."""

    def __init__(self, name, stage, order=0, fail_at=None, **flags):
        self.name, self.stage, self.order, self.fail_at = name, stage, order, fail_at
        for k, v in flags.items():
            setattr(self, k, v)
        self.calls = []

    def refine_(self, step):
        if isinstance(step, ModelStep):
            self.calls.append(("model", None, step))
            return Gain("nothing", 1.0, 1.0)
        i = step.block.index
        snapshot = {
            "weights": {n: lin.weight.detach().clone() for n, lin in step.block.linears.items()},
            "masks": None if step.masks is None else {n: m.clone() for n, m in step.masks.items()},
            "dense": step.dense,
            "targets": step.targets,
            "xtx": {n: s.xtx for n, s in step.stats.items()},
            "scores": None if step.scores is None else step.scores(list(step.block.linears)),
        }
        self.calls.append((self.stage, i, snapshot))
        if i == self.fail_at:
            with torch.no_grad():
                for lin in step.block.linears.values():
                    lin.weight.mul_(2)
                    if lin.bias is not None:
                        lin.bias.add_(1)
            raise RuntimeError("refinement failed on purpose")
        return Gain("error", 2.0 + i, 1.0 + i)


def test_masked_stage_receives_masks_dense_weights_targets_and_statistics():
    model = tiny_causal_lm("llama")
    dense = copy.deepcopy(model)
    rec = Recorder("probe", "masked", keeps_dense=True, keeps_targets=True, observes=frozenset({"xtx"}))
    result = run(model, "sparsegpt", "2:4", refine=rec)
    prefix, blocks = llm.find_blocks(model)
    assert [c[1] for c in rec.calls] == list(range(len(blocks)))
    for _, i, got in rec.calls:
        dense_linears = llm.block_linears(llm.find_blocks(dense)[1][i])
        for n, lin in llm.block_linears(blocks[i]).items():
            assert torch.equal(got["masks"][n], got["weights"][n] != 0), n
            assert torch.equal(got["masks"][n], lin.weight != 0)  # the refinement changed nothing
            assert got["masks"][n].view(-1, 4).sum(1).le(2).all()
            assert torch.equal(got["dense"][n], dense_linears[n].weight), "later blocks are dense until their turn"
            assert got["xtx"][n] is not None, "SparseGPT's freed XᵀX is given back to the refinement"
        assert got["targets"] is not None and len(got["targets"]) == N_SAMPLES // 2
        assert got["scores"] is None
    gains = result.refinements["probe"]
    assert [g.before for g in gains] == [2.0 + i for i in range(len(blocks))]
    assert all(g.seconds >= 0 for g in gains)
    assert "refine probe: error" in result.summary()


def test_a_run_without_refinements_is_unchanged_by_a_refinement_that_does_nothing():
    a, b = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    run(a, "wanda", 0.5)
    result = run(b, "wanda", 0.5, refine=Recorder("noop", "masked"))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert len(result.refinements["noop"]) == len(llm.find_blocks(b)[1])


def test_dense_stage_gets_the_method_scores_and_for_sparsegpt_wandas():
    model = tiny_causal_lm("llama")
    rec = Recorder("probe", "dense")
    run(model, "wanda", 0.5, refine=[rec])
    got = rec.calls[0][2]
    assert got["masks"] is None and got["dense"] is None
    w = got["weights"]["mlp.down_proj"]
    assert torch.equal(got["weights"]["mlp.down_proj"], w) and (w != 0).all(), "the dense block, before masking"
    rec2 = Recorder("probe", "dense")
    model2 = tiny_causal_lm("llama")
    run(model2, "sparsegpt", 0.5, refine=[rec2])
    scores = rec2.calls[0][2]["scores"]
    assert set(scores) == set(got["scores"])
    for n, s in scores.items():  # Wanda's score, whichever method masks
        torch.testing.assert_close(s, got["scores"][n])


def test_refinements_apply_by_stage_whatever_order_they_are_named_in():
    order = []

    class Ordered(Refinement):
        def __init__(self, name, stage, rank):
            self.name, self.stage, self.order = name, stage, rank

        def refine_(self, step):
            if isinstance(step, BlockStep) and step.block.index == 0 or isinstance(step, ModelStep):
                order.append(self.name)
            return Gain("x", 0.0, 0.0)

    chosen = [Ordered("c", "masked", 1), Ordered("b", "masked", 0), Ordered("a", "dense", 5), Ordered("m", "model", 0)]
    assert [r.name for r in get_refinements(chosen)] == ["m", "a", "b", "c"]
    assert [r.name for r in get_refinements(list(reversed(chosen)))] == ["m", "a", "b", "c"]
    run(tiny_causal_lm("llama"), "wanda", 0.5, refine=chosen)
    assert order == ["m", "a", "b", "c"]


@pytest.mark.parametrize(
    "refine,options,match",
    [
        (("nonesuch",), {}, r"unknown refinement 'nonesuch'"),
        (Recorder, {}, r"the class Recorder"),
        ((Recorder("x", "masked"), Recorder("x", "dense")), {}, r"repeated: x"),
        (Recorder("x", "masked"), {"granularity": "global"}, r"granularity='global'"),
        (Recorder("x", "after"), {}, r"stage must be one of"),
        ((3,), {}, r"got int"),
    ],
)
def test_bad_refinements_are_refused_before_the_model_is_touched(refine, options, match):
    model = tiny_causal_lm("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        run(model, "wanda", 0.5, refine=refine, **options)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_a_failing_refinement_gives_the_model_back_with_biases_and_model_stage_reverted():
    model = tiny_causal_lm("opt")  # Linears with biases
    before = copy.deepcopy(model.state_dict())
    reverted = []

    class Model(Refinement):
        name, stage = "whole", "model"

        def refine_(self, step):
            with torch.no_grad():
                step.model.get_input_embeddings().weight.mul_(2)
            step.undo.append(lambda: reverted.append(1) or step.model.get_input_embeddings().weight.div_(2))
            return Gain("x", 0.0, 0.0)

    with pytest.raises(RuntimeError, match="on purpose"):
        run(model, "wanda", 0.5, refine=(Recorder("probe", "masked", fail_at=1), Model()))
    assert reverted == [1]
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_registry_refuses_a_second_refinement_of_the_same_name():
    from pyprune_fast.llm.refine import REFINEMENTS

    name = "test-only-refinement"
    register_refinement(Recorder(name, "masked"))
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_refinement(Recorder(name, "dense"))
        assert get_refinements(name)[0] is REFINEMENTS[name]
    finally:
        del REFINEMENTS[name]
