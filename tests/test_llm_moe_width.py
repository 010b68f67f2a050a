"""Width pruning inside mixture-of-experts models (llm.prune_structured on Mixtral, Qwen2/3-MoE,
DeepSeek-V3, OLMoE, gpt-oss; llm.structured.moe_width): every routed expert, shared expert and dense MLP
loses channels, each expert scored on its own routed tokens; without the refit the model computes what
the original computes with those channels zeroed; the refit is the least-squares solution on the
expert's routed (router-weighted) down_proj inputs, written out here; the config is updated, the saved
directory loads with stock from_pretrained; bad input is refused before the model is touched."""

from __future__ import annotations

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.errors import UsageError
from pyprune_fast.llm import moe
from pyprune_fast.llm.structured.moe_width import WIDTH_KEYS
from tests.test_llm_moe import (
    ARCHS,
    N_SAMPLES,
    SEQ_LEN,
    calibration,
    expert_inputs,
    first_moe_inputs,
    save_tiny_moe,
    tiny_moe,
)

transformers = pytest.importorskip("transformers")

OPTIONS = {"structure": "width", "num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "progress": False}
# every architecture, and Qwen3-MoE with a dense block (mlp_only_layers) as well
CASES = [(a, {}) for a in ARCHS] + [("qwen3_moe", {"mlp_only_layers": [0]})]


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The rows of `before` that `after` kept (exact copies), ascending."""
    same = (before[:, None, :] == after[None, :, :]).all(-1)  # [I, I']
    assert bool((same.sum(0) == 1).all()), "every kept row is one row of the original"
    return same.any(1).nonzero().flatten()


def _mlps(model):
    """(block index, path, gate weight, down module-or-None, MoE-or-None, expert) of every MLP unit."""
    for i, block in enumerate(model.model.layers):
        layers = moe.find_moe(block)
        for m in layers:
            for e in range(m.num_experts):
                yield i, m.expert(e), m.views(e)[0], m, e
            for name in ("shared_expert", "shared_experts"):
                if hasattr(m.module, name):
                    yield i, f"{m.path}.{name}", getattr(m.module, name).gate_proj.weight, None, -1
        if not layers:
            yield i, "mlp", block.mlp.gate_proj.weight, None, -1


def zeroed_original(original, pruned):
    """A copy of `original` whose channels that `pruned` removed are zero in every down_proj."""
    zeroed = copy.deepcopy(original)
    kept = {}
    for (i, path, gate, m, e), (_, _, gate_after, _, _) in zip(_mlps(zeroed), _mlps(pruned)):
        keep = kept_rows(gate.detach(), gate_after.detach())
        gone = torch.ones(gate.shape[0], dtype=torch.bool)
        gone[keep] = False
        down = m.views(e)[2] if m is not None else zeroed.model.layers[i].get_submodule(path).down_proj.weight
        with torch.no_grad():
            down[:, gone] = 0  # (a view: writes into the fused tensor)
        kept[(i, path)] = keep
    return zeroed, kept


@pytest.mark.parametrize(("arch", "overrides"), CASES)
def test_channels_leave_every_expert_and_the_output_is_the_zeroed_original(arch, overrides):
    model = tiny_moe(arch, **overrides)
    original = copy.deepcopy(model)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n or ".router." in n}
    widths = {k: getattr(model.config, k) for k in WIDTH_KEYS[arch] if k is not None}
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="wanda", reconstruct=False, **OPTIONS)
    assert result.standard and 0.2 < result.removed_fraction < 0.4
    routed_key, shared_key, dense_key = WIDTH_KEYS[arch]
    routed = getattr(model.config, routed_key)
    assert routed < widths[routed_key] and routed % 4 == 0  # 16-byte rows for grouped_mm (float32)
    for i, block in enumerate(model.model.layers):
        for m in moe.find_moe(block):
            ex = m.experts
            assert result.intermediate[i] == routed
            gate_up = (m.num_experts, 32, 2 * routed) if arch == "gpt_oss" else (m.num_experts, 2 * routed, 32)
            assert tuple(ex.gate_up_proj.shape) == gate_up
            assert ex.down_proj.shape[1:].numel() == 32 * routed
            if arch == "gpt_oss":
                assert tuple(ex.gate_up_proj_bias.shape) == (m.num_experts, 2 * routed)
            if shared_key is not None:
                assert m.module.shared_expert.down_proj.in_features == getattr(model.config, shared_key)
                assert getattr(model.config, shared_key) < widths[shared_key]
            if arch == "deepseek_v3":  # its shared experts are n_shared_experts × moe_intermediate_size
                assert m.module.shared_experts.down_proj.in_features == routed * model.config.n_shared_experts
        if not moe.find_moe(block):
            assert block.mlp.down_proj.in_features == getattr(model.config, dense_key) < widths[dense_key]
    zeroed, kept = zeroed_original(original, model)
    experts = [k for k in kept if ".experts." in k[1]]
    assert len({tuple(kept[k].tolist()) for k in experts}) > 1  # each expert chose its own channels
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, zeroed(tokens).logits, rtol=1e-5, atol=1e-5)
    for n, p in routers.items():
        assert torch.equal(model.get_parameter(n), p), n


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_each_expert_is_scored_and_refitted_on_its_routed_tokens(arch):
    model = tiny_moe(arch)
    x = first_moe_inputs(model)
    (m,) = moe.find_moe(model.model.layers[0])
    want = {}
    with torch.no_grad():
        for e in range(m.num_experts):
            _, h = expert_inputs(arch, m, x, e)  # down_proj's input: w_t·h_t over the tokens routed to e
            w = m.views(e)[2].double()
            score = (w.abs().sum(0) * h.double().norm(dim=0)).float()  # Wanda, summed per channel
            want[e] = (score, h.double(), w)
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="wanda", min_expert_tokens=0, **OPTIONS)
    assert result.rare_experts == {}
    (pruned,) = moe.find_moe(model.model.layers[0])
    width = pruned.views(0)[2].shape[1]
    for e, (score, h, w) in want.items():
        keep = torch.argsort(score, stable=True)[len(score) - width :].sort().values
        g = h.T @ h / len(h)
        gkk = g[keep][:, keep]
        diag = gkk.diagonal()
        diag[diag == 0] = 1.0
        diag += 0.01 * diag.mean()
        refit = torch.linalg.solve(gkk, (w @ g[:, keep]).T).T  # W' = W G[:, K] (G_KK + λI)⁻¹
        torch.testing.assert_close(pruned.views(e)[2].double(), refit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_saved_directory_loads_with_stock_from_pretrained(arch, tmp_path):
    model = tiny_moe(arch)
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="flap", **OPTIONS)
    assert result.standard and "standard config" in result.summary()
    llm.save_pretrained(model, None, tmp_path / "pruned")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    for key in (k for k in WIDTH_KEYS[arch] if k is not None):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_rare_experts_are_reported_and_scored_by_magnitude():
    model = tiny_moe("mixtral")
    original = copy.deepcopy(model)
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="wanda", min_expert_tokens=30,
                                  reconstruct=False, **OPTIONS)  # fmt: skip
    assert result.rare_experts and all(c < 30 for c in result.rare_experts.values())
    assert f"{len(result.rare_experts)} routed experts below min_expert_tokens" in result.summary()
    for name in result.rare_experts:
        i, e = int(name.split(".")[2]), int(name.split(".")[-1])
        (m,) = moe.find_moe(original.model.layers[i])
        (p,) = moe.find_moe(model.model.layers[i])
        gate, up, down = (t.detach().float() for t in m.views(e))
        magnitude = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()
        width = p.views(e)[0].shape[0]
        keep = torch.argsort(magnitude, stable=True)[len(magnitude) - width :].sort().values
        assert torch.equal(p.views(e)[0], m.views(e)[0][keep]), name


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_bad_input_is_refused_before_the_model_is_touched():
    model = tiny_moe("qwen2_moe")
    before = _state(model)
    bad = [
        ({"units": "experts"}, "units must be one of"),
        ({"units": "heads"}, "ratio=0.25 leaves no query head in a key/value group of block 0"),
        ({"score": "taylor"}, "score='taylor' takes block-local gradients"),
        ({"rare_experts": "dense"}, "rare_experts must be one of"),
        ({"min_expert_tokens": -1}, "min_expert_tokens must be an int >= 0"),
        ({"ratio": 0.97, "units": "mlp"}, "ratio=0.97 leaves no channel in the routed experts of block 0"),
    ]
    for options, message in bad:
        with pytest.raises(UsageError, match=message):
            llm.prune_structured(model, calibration(), **{**OPTIONS, "ratio": 0.25, **options})

    class CustomRouter(type(model.model.layers[1].mlp.gate)):
        pass

    model.model.layers[1].mlp.gate.__class__ = CustomRouter
    with pytest.raises(UsageError, match="the router CustomRouter at mlp.gate is not one the pruner recognises"):
        llm.prune_structured(model, calibration(), ratio=0.25, **OPTIONS)
    after = _state(model)
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_the_cli_prunes_expert_widths_and_saves_a_standard_directory(tmp_path, capsys):
    import json

    from pyprune_fast.app import cli

    directory = save_tiny_moe(tmp_path / "qwen2_moe", "qwen2_moe")
    out = tmp_path / "out"
    argv = ["prune", "--model", f"hf:{directory}", "--structure", "width", "--criterion", "wanda", "--ratio", "0.25",
            "--save-model", "--out", str(out), "--samples", "4", "--seq-len", "16", "--eval-tokens", "256",
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    with open(out / "report.json") as f:
        doc = json.load(f)
    assert doc["structured"]["dense"]["intermediate"] == [16, 16]
    (r,) = doc["results"]
    assert r["structured"]["standard"] and r["structured"]["intermediate"] == [8, 8]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out / r["files"]["model"])
    assert pruned.config.moe_intermediate_size == 8 and pruned.config.shared_expert_intermediate_size < 24
    assert pruned.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 8)


@pytest.mark.parametrize("policy", ["magnitude", "route"])
def test_rare_experts_are_refitted_only_when_routed_tokens_are_forced_to_them(policy):
    model = tiny_moe("mixtral")
    original = copy.deepcopy(model)
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="wanda", min_expert_tokens=30,
                                  rare_experts=policy, **OPTIONS)  # fmt: skip
    assert result.rare_experts
    for name in result.rare_experts:
        i, e = int(name.split(".")[2]), int(name.split(".")[-1])
        (m,) = moe.find_moe(original.model.layers[i])
        (p,) = moe.find_moe(model.model.layers[i])
        keep = kept_rows(m.views(e)[0].detach(), p.views(e)[0].detach())
        sliced = torch.equal(p.views(e)[2], m.views(e)[2][:, keep])
        assert sliced == (policy == "magnitude"), name  # "route": refitted on the forced tokens as well
