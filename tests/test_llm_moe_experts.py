"""Expert removal (llm.prune_experts): the pruned model computes what the original computes with the
removed experts' router logits at −inf (the routing written out here), saves as a standard directory
that stock from_pretrained loads, scores follow their formulas, and bad input is refused before the
model is touched."""

from __future__ import annotations

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.errors import UsageError
from pyprune_fast.llm import moe
from tests.test_llm_moe import ARCHS, N_SAMPLES, SEQ_LEN, calibration, first_moe_inputs, save_tiny_moe, tiny_moe

transformers = pytest.importorskip("transformers")

OPTIONS = {"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "progress": False}


def masked(model, removed: dict[str, list[int]]):
    """A copy of `model` whose routers never choose the `removed` experts (by MoE module name): their
    logits −inf. Softmax routers are written out; gpt-oss and DeepSeek-V3 get −inf in their biases."""
    model = copy.deepcopy(model)
    for name, gone in removed.items():
        m = model.get_submodule(name)
        router = m.router if hasattr(m, "router") else m.gate
        if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3: the choice score s + b
            router.e_score_correction_bias.data[gone] = -torch.inf
        elif isinstance(getattr(router, "bias", None), torch.Tensor):  # gpt-oss: logits x Wᵀ + b
            router.bias.data[gone] = -torch.inf
        else:

            def forward(x, router=router, gone=gone):
                x = x.reshape(-1, router.weight.shape[1])
                logits = x @ router.weight.T
                logits[:, gone] = -torch.inf
                top, index = torch.softmax(logits.float(), dim=-1).topk(router.top_k, dim=-1)
                if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalizes
                    top = top / top.sum(-1, keepdim=True)
                return logits, top, index

            router.forward = forward
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_the_routing_rule_of_each_router_is_the_stock_one(arch):
    model = tiny_moe(arch)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(3))
    layers = [m for block in model.model.layers for m in moe.find_moe(block)]
    for m in layers:
        _, weights, index = m.router(x)
        ours, chosen = moe.route(m, x)
        a, b = torch.sort(index, 1), torch.sort(chosen, 1)
        assert torch.equal(a.values, b.values)
        torch.testing.assert_close(ours.gather(1, b.indices), weights.gather(1, a.indices).to(ours.dtype))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("score", ["reap", "frequency", "loss"])
def test_removal_equals_the_original_with_those_router_logits_at_minus_inf(arch, score, tmp_path):
    model = tiny_moe(arch)
    original = copy.deepcopy(model)
    result = llm.prune_experts(model, calibration(), ratio=0.5, score=score, **OPTIONS)
    assert result.standard
    removed = result.removed
    for name, before in result.experts_before.items():
        assert len(removed[name]) == before // 2
        assert model.get_submodule(name).experts.gate_up_proj.shape[0] == before - before // 2
    reference = masked(original, removed)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert getattr(model.config, moe.COUNT_KEYS[arch]) == next(iter(result.experts_before.values())) // 2
    assert model.config.num_experts_per_tok == 2
    if score == "frequency":  # one architecture each score is enough for the round trip
        llm.save_pretrained(model, None, tmp_path / "pruned")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, got, rtol=1e-5, atol=1e-5)


def test_scores_follow_their_formulas():
    model = tiny_moe("mixtral")
    x = first_moe_inputs(model)
    m = moe.find_moe(model.model.layers[0])[0]
    with torch.no_grad():
        logits = x @ m.router.weight.T
        top, index = torch.softmax(logits, -1).topk(2, -1)
        top = top / top.sum(-1, keepdim=True)
        inter = m.experts.gate_up_proj.shape[1] // 2
        frequency, reap = [], []
        for e in range(4):
            token, slot = torch.where(index == e)
            w = m.experts.gate_up_proj[e]
            h = torch.nn.functional.silu(x[token] @ w[:inter].T) * (x[token] @ w[inter:].T)
            out = h @ m.experts.down_proj[e].T
            frequency.append(float(len(token)))
            reap.append(float((top[token, slot] * out.norm(dim=-1)).sum()) / max(len(token), 1))
    for score, want in (("frequency", frequency), ("reap", reap)):
        result = llm.prune_experts(copy.deepcopy(model), calibration(), ratio=0.25, score=score, **OPTIONS)
        assert result.scores["model.layers.0.mlp"] == pytest.approx(want, rel=1e-4), score


def test_global_allocation_removes_the_lowest_scores_over_all_layers():
    model = tiny_moe("qwen3_moe")
    result = llm.prune_experts(model, calibration(), ratio=0.5, score="frequency", allocation="global", **OPTIONS)
    scores = [(s, name, e) for name, values in result.scores.items() for e, s in enumerate(values)]
    removed = {(name, e) for name, gone in result.removed.items() for e in gone}
    assert len(removed) == 4
    assert all(len(kept) >= 2 for kept in result.kept.values())
    for s, name, e in scores:  # nothing kept scores lower than something removed, unless its layer was at top-k
        if (name, e) not in removed and len(result.kept[name]) > 2:
            assert all(s >= r for r, n2, e2 in scores if (n2, e2) in removed)
    counts = [len(k) for k in result.kept.values()]
    assert result.standard == (len(set(counts)) == 1)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[n]) for n, v in model.state_dict().items()) and set(before) == set(
        model.state_dict()
    )


def test_bad_input_is_refused_before_the_model_is_touched():
    model = tiny_moe("mixtral")
    before = _state(model)
    with pytest.raises(UsageError, match="num_experts_per_tok=2 is larger than the 1 experts"):
        llm.prune_experts(model, calibration(), ratio=0.75, **OPTIONS)
    with pytest.raises(UsageError, match="ratio must be a number in"):
        llm.prune_experts(model, calibration(), ratio=1.0, **OPTIONS)
    with pytest.raises(UsageError, match="score must be one of"):
        llm.prune_experts(model, calibration(), score="gradient", **OPTIONS)
    with pytest.raises(UsageError, match="allocation must be one of"):
        llm.prune_experts(model, calibration(), allocation="random", **OPTIONS)

    class CustomRouter(type(model.model.layers[1].mlp.gate)):
        pass

    model.model.layers[1].mlp.gate.__class__ = CustomRouter
    with pytest.raises(UsageError, match="the router CustomRouter at mlp.gate is not one the pruner recognises"):
        llm.prune_experts(model, calibration(), **OPTIONS)
    assert _unchanged(model, before)
    grouped = tiny_moe("deepseek_v3")
    with pytest.raises(UsageError, match="allocation='global' .* group-limited routing of model.layers.1.mlp"):
        llm.prune_experts(grouped, calibration(), allocation="global", **OPTIONS)
    with pytest.raises(UsageError, match="has no mixture-of-experts layers"):
        llm.prune_experts(transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
            vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
            calibration(), **OPTIONS)  # fmt: skip


def test_the_cli_removes_experts_and_saves_a_standard_directory(tmp_path, capsys):
    import json
    import os

    from pyprune_fast.app import cli

    directory = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    argv = ["prune", "--model", f"hf:{directory}", "--structure", "experts", "--ratio", "0.5", "--save-model",
            "--out", str(out), "--samples", "2", "--seq-len", "32", "--eval-tokens", "256", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    with open(out / "report.json") as f:
        doc = json.load(f)
    assert doc["structured"]["dense"] == {"experts": [4, 4]}
    (r,) = doc["results"]
    assert r["criterion"] == "reap" and r["files"]["model"] == "experts-reap-0.5"
    assert r["structured"]["experts"] == [2, 2] and r["structured"]["standard"]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out / "experts-reap-0.5")
    assert pruned.config.num_local_experts == 2 and pruned.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    md = (out / "report.md").read_text()
    assert "experts 2 per MoE layer" in md and "| experts removed |" in md and "blocks' removed" not in md
    assert "ratios 50 % of each MoE layer's routed experts" in md
    assert os.path.isfile(out / "widths.png")
    bad = ["prune", "--model", f"hf:{directory}", "--structure", "experts", "--criterion", "flap", "--out",
           str(tmp_path / "bad"), "--quiet"]  # fmt: skip
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "--criterion flap is not a score of --structure experts; it takes: reap, frequency, loss" in err


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"])
def test_global_removal_reloads_with_load_pretrained(arch, tmp_path):
    model = tiny_moe(arch)
    result = llm.prune_experts(model, calibration(), ratio=0.375, score="reap", allocation="global", **OPTIONS)
    counts = [len(k) for k in result.kept.values()]
    assert counts == [2, 3] and not result.standard and "llm.load_pretrained" in result.summary()
    assert model.config.pyprune_fast_experts == counts
    llm.save_pretrained(model, None, tmp_path / "pruned")  # stock writing: Mixtral's experts one tensor each
    with pytest.raises((ValueError, RuntimeError)):  # stock from_pretrained cannot build differing counts
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    loaded, tokenizer = llm.load_pretrained(tmp_path / "pruned")
    assert tokenizer is None
    assert [m.num_experts for _, _, m in llm.structured.experts.moe_layers(loaded)] == counts
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_the_cli_says_how_to_load_a_global_removal(tmp_path, capsys):
    import json

    from pyprune_fast.app import cli

    directory = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    argv = ["prune", "--model", f"hf:{directory}", "--structure", "experts", "--ratio", "0.375", "--allocation",
            "global", "--save-model", "--out", str(out), "--samples", "4", "--seq-len", "16", "--eval-tokens", "256",
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    with open(out / "report.json") as f:
        (r,) = json.load(f)["results"]
    s = r["structured"]
    assert not s["standard"] and s["load"] == "pyprune_fast.llm.load_pretrained(DIR)" and sorted(s["experts"]) == [2, 3]
    assert "`llm.load_pretrained`" in (out / "report.md").read_text()
    loaded, tokenizer = llm.load_pretrained(out / r["files"]["model"])
    assert tokenizer is not None
    assert [m.num_experts for _, _, m in llm.structured.experts.moe_layers(loaded)] == s["experts"]


def test_the_cli_refuses_a_ratio_that_leaves_fewer_experts_than_the_top_k(tmp_path, capsys):
    from pyprune_fast.app import cli

    directory = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    argv = ["prune", "--model", f"hf:{directory}", "--structure", "experts", "--ratio", "0.75", "--out",
            str(tmp_path / "out"), "--samples", "4", "--seq-len", "16", "--eval-tokens", "256", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "num_experts_per_tok=2 is larger than the 1 experts --ratio leaves in model.layers.0.mlp" in (
        capsys.readouterr().err
    )
