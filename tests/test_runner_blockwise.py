"""`pyprune-fast prune` with a method of the block pipeline that is not a registry criterion
(SparseGPT) on a model that is not a causal LM: the runner prunes the model block by block
(llm.prune with the bundle's forward), evaluates the pruned weights, hands them to on_masks, and gives
the model back bit for bit; refused where it cannot run."""

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.app import runner
from pyprune_fast.app.bundle import Bundle
from pyprune_fast.errors import UsageError
from tests.models import image_batches, tiny_vit


def bundle() -> Bundle:
    model = tiny_vit()

    def evaluate(m):
        with torch.no_grad():
            return {"logit_mass": float(m(image_batches(seed=9)[0][0]).abs().sum())}

    return Bundle("tiny-vit", model, calibration=image_batches(count=3), evaluate=evaluate)


@pytest.mark.parametrize("granularity,expected", [("layerwise", "layer"), ("global", "layer"), ("per-row", "row")])
def test_sparsegpt_prunes_block_by_block_and_the_model_is_restored(granularity, expected):
    b = bundle()
    before = copy.deepcopy(b.model.state_dict())
    reference = copy.deepcopy(b.model)
    llm.prune(reference, b.calibration[:2], method="sparsegpt", sparsity=0.5, granularity=expected,
              forward=lambda m, x: m(x), progress=False)  # fmt: skip
    seen = {}

    def on_masks(result, keep, model):
        seen[result.criterion] = {n: p.detach().clone() for n, p in model.named_parameters()}

    run = runner.prune(b, ["sparsegpt", "magnitude"], [0.5], granularity, batches=2, on_masks=on_masks)
    got = seen["sparsegpt"]
    for name, p in reference.named_parameters():  # the very weights llm.prune gives, OBS updates included
        assert torch.equal(got[name], p.detach()), name
    result = next(r for r in run.results if r.criterion == "sparsegpt")
    blocks = sum(lin.weight.numel() for blk in reference.blocks for lin in llm.block_linears(blk).values())
    scored = sum(p.numel() for n, p in reference.named_parameters() if n.endswith("weight") and p.dim() >= 2)
    assert result.achieved == pytest.approx(0.5 * blocks / scored, abs=1e-9)  # the head stays dense
    assert result.metrics["logit_mass"] != run.dense["logit_mass"]
    assert run.score_seconds["sparsegpt"] > 0
    after = b.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if granularity == "global":
        assert "per layer" in run.info["sparsegpt granularity"]


def test_sparsegpt_at_two_four():
    b = bundle()
    run = runner.prune(b, ["sparsegpt"], [0.5], "2:4", batches=2)
    assert run.results[0].criterion == "sparsegpt" and run.results[0].achieved > 0


def test_block_methods_are_refused_where_they_cannot_run():
    b = bundle()
    with pytest.raises(UsageError, match="sparsegpt prunes block by block: schedule iterative re-scores"):
        runner.prune(b, ["sparsegpt"], [0.5], "layerwise", schedule="iterative", rounds=2)
    with pytest.raises(UsageError, match=r"criteria \['sparsegpt'\] score weights: use a weight granularity"):
        runner.prune(b, ["sparsegpt"], [0.5], "channel")
    with pytest.raises(UsageError, match="unknown criteria"):
        runner.check_criteria(b, ["sparsegpt"])  # `score` writes scores: a solver has none
    nodata = Bundle("tiny-vit", tiny_vit())
    with pytest.raises(runner.CriterionDataError, match="criterion 'sparsegpt' needs calibration data"):
        runner.prune(nodata, ["sparsegpt"], [0.5], "layerwise")
