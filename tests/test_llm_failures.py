"""What llm.prune guarantees when a run fails or the model is not what it expects: an in-memory run that
raises (a NaN, a Linear never called, Ctrl-C) gives the model back as it was; errors name the full
parameter; weight matrices that are not nn.Linear (mixture-of-experts routers) are listed as left
dense, not counted as pruned; ranks holding different models are refused on every
rank; the global run equals masks.global_unstructured over llm.scores at every sparsity."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pyprune_fast import llm, masks
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_moe import tiny_moe
from tests.test_llm_pipeline import BATCH, N_SAMPLES, SEQ_LEN, block_weights, calibration
from tests.worlds import run_world

transformers = pytest.importorskip("transformers")

OPTIONS = {"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "batch_size": BATCH, "progress": False}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(before, model):
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v.view(torch.uint8) if v.is_floating_point() else v, after[k].view(torch.uint8)
                           if after[k].is_floating_point() else after[k]), k  # fmt: skip


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_a_nan_weight_leaves_the_model_as_it_was_and_names_the_parameter(method):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\b.*(NaN|non-finite)"):
        llm.prune(model, calibration(), method=method, sparsity=0.5, **OPTIONS)
    assert_same(before, model)  # block 0 was pruned before block 1 failed: it is back


def test_a_linear_never_called_leaves_the_model_as_it_was():
    model = tiny_causal_lm("llama")
    model.model.layers[1].mlp.forward = lambda x: torch.zeros_like(x)  # gate/up/down never called
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"not called in its forward: \['model\.layers\.1\.mlp\.gate_proj'"):
        llm.prune(model, calibration(), method="wanda", sparsity=0.5, **OPTIONS)
    assert_same(before, model)


def test_an_interrupt_leaves_the_model_as_it_was(monkeypatch):
    from pyprune_fast.llm import pipeline

    model = tiny_causal_lm("llama")
    before = snapshot(model)
    real = pipeline.Run.record

    def interrupt(self, i):
        real(self, i)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Run, "record", interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.prune(model, calibration(), method="sparsegpt", sparsity="2:4", **OPTIONS)
    assert_same(before, model)


def test_a_successful_run_leaves_no_undo_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    llm.prune(tiny_causal_lm("llama"), calibration(), method="wanda", **OPTIONS)
    assert list(tmp_path.iterdir()) == []


def tiny_mixtral():
    return tiny_moe("mixtral")


def test_weights_that_are_not_linear_are_listed_as_left_dense():
    model = tiny_mixtral()
    routers = {n: p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    pruned = sum(lin.weight.numel() for block in model.model.layers for lin in llm.block_linears(block).values())
    result = llm.prune(model, calibration(), method="wanda", sparsity=0.5, min_expert_tokens=0, **OPTIONS)
    assert result.left_dense == routers  # the fused experts are pruned through their views (llm.moe)
    assert result.left_dense_fraction == pytest.approx(sum(routers.values()) / (sum(routers.values()) + pruned))
    assert result.overall_sparsity == pytest.approx(0.5)  # over what was pruned, and only that
    experts = model.model.layers[0].mlp.experts
    assert int((experts.down_proj == 0).sum()) == experts.down_proj.numel() // 2
    for name in result.left_dense:
        assert int((model.get_parameter(name) == 0).sum()) == 0, name
    assert "left dense (not nn.Linear weights): " in result.summary()
    assert llm.prune(tiny_causal_lm("llama"), method="magnitude", progress=False).left_dense == {}


@pytest.mark.parametrize("method", ["snip", "afr"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_global_sparsity_equals_masks_over_the_scores_at_every_sparsity(method, sparsity):
    model = tiny_causal_lm("llama")
    dense = {n: w.detach().clone() for n, w in block_weights(model).items()}
    scores = llm.scores(model, calibration(), method=method, sparsity=sparsity, **OPTIONS)
    want = masks.global_unstructured(scores, sparsity)
    llm.prune(model, calibration(), method=method, sparsity=sparsity, granularity="global", **OPTIONS)
    got = block_weights(model)
    for name, keep in want.items():
        assert torch.equal(got[name], dense[name] * keep), name


def test_scores_take_only_a_fraction():
    with pytest.raises(ValueError, match="sparsity must be a fraction in"):
        llm.scores(tiny_causal_lm("llama"), calibration(), method="snip", sparsity="2:4", **OPTIONS)


def _job(rank: int, world: int):
    def different():
        model = tiny_causal_lm("llama")
        if rank == 1:
            config = model.config
            config.intermediate_size = 48
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
        return llm.prune(model, calibration(), method="wanda", group=dist.group.WORLD, **OPTIONS)

    yield "different", different


JOBS = {"models": _job}


def test_ranks_holding_different_models_are_refused_on_every_rank(tmp_path):
    ranks = run_world(__name__, "models", 2, tmp_path)
    for r in ranks:
        assert r["different"][:2] == ("error", "ValueError"), r
        assert "the ranks hold different models" in r["different"][2]
