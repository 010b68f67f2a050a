"""Attention heads and global allocation in mixture-of-experts width pruning (llm.prune_structured on
Mixtral, Qwen2/3-MoE, gpt-oss; llm.structured.moe_width): the query heads removed are those the dense
path's rule picks on the block's o_proj statistics (written out here), o_proj refitted as the dense path
refits it; without the refit the model computes what the original computes with the removed heads' o_proj
columns and the removed channels zeroed; DeepSeek-V3 (MLA) and OLMoE (q_norm over all heads) keep their
heads; global allocation gives the blocks the widths one threshold over their normalized scores gives
(written out here on weights where the blocks differ clearly), recorded so that llm.load_pretrained
rebuilds the model with identical logits, from the API and from the command line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.errors import UsageError
from pyprune_fast.llm import moe
from tests.test_llm_moe import N_SAMPLES, SEQ_LEN, calibration, save_tiny_moe, tiny_moe
from tests.test_llm_moe_width import kept_rows, zeroed_original

transformers = pytest.importorskip("transformers")

OPTIONS = {"structure": "width", "num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "progress": False}
HEADS = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"]  # (moe_width.ATTENTION)


def _tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def _head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _kept_heads(before, after, head_dim: int) -> torch.Tensor:
    """The query heads of `before` (a q_proj) that `after` kept: each kept head's rows an exact copy."""
    h = before.weight.shape[1]
    return kept_rows(before.weight.detach().reshape(-1, head_dim * h), after.weight.detach().reshape(-1, head_dim * h))


def _o_inputs(model, block: int = 0) -> torch.Tensor:
    """o_proj's input in block `block` over the calibration windows, as prune_structured cuts them."""
    seen = []
    o = model.model.layers[block].self_attn.o_proj
    handle = o.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for window in calibration():
            model(input_ids=window[None], use_cache=False)
    handle.remove()
    return torch.cat(seen).reshape(-1, o.in_features)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_heads_are_the_dense_rule_on_o_proj_statistics_and_o_proj_is_refitted(arch):
    model = tiny_moe(arch)
    d, kv = _head_dim(model), model.config.num_key_value_heads
    x = _o_inputs(model).double()
    o = model.model.layers[0].self_attn.o_proj
    w = o.weight.detach().double()
    wanda = (w.abs().sum(0) * x.norm(dim=0)).reshape(-1, d).sum(1)  # Wanda summed over a head's columns
    per_group = wanda.reshape(kv, -1)
    g = per_group.shape[1]
    want = torch.cat([torch.argsort(s, stable=True)[1:].sort().values + k * g for k, s in enumerate(per_group)])
    q_before = copy.deepcopy(model.model.layers[0].self_attn.q_proj)
    sinks = model.model.layers[0].self_attn.sinks.detach().clone() if arch == "gpt_oss" else None
    result = llm.prune_structured(model, calibration(), ratio=0.4, score="wanda", **OPTIONS)
    assert result.units == "both" and result.heads == [kv * (g - 1)] * 2  # round(0.4 × 2) = 1 per group
    attention = model.model.layers[0].self_attn
    assert torch.equal(_kept_heads(q_before, attention.q_proj, d), want)
    if sinks is not None:
        assert torch.equal(attention.sinks.detach(), sinks[want])
    cols = (want[:, None] * d + torch.arange(d)).flatten()
    gram = x.T @ x / len(x)
    gkk = gram[cols][:, cols]
    diag = gkk.diagonal()
    diag[diag == 0] = 1.0
    diag += 0.01 * diag.mean()
    rhs = w @ gram[:, cols]
    if o.bias is not None:  # gpt-oss: the intercept row/column of the normal equations, z = [x_K; 1]
        b, mu = o.bias.detach().double(), x.mean(0)[cols]
        k = len(cols)
        rhs = torch.cat([rhs + b[:, None] * mu[None], (w @ x.mean(0) + b)[:, None]], 1)
        gkk = torch.cat([torch.cat([gkk, mu[:, None]], 1), torch.cat([mu, torch.ones(1, dtype=mu.dtype)])[None]])
    refit = torch.linalg.solve(gkk, rhs.T).T  # [W', b'] = rhs (E[z zᵀ] + λ I_K)⁻¹
    torch.testing.assert_close(attention.o_proj.weight.detach().double(), refit[:, : len(cols)], rtol=1e-4, atol=1e-5)
    if o.bias is not None:
        torch.testing.assert_close(attention.o_proj.bias.detach().double(), refit[:, k], rtol=1e-4, atol=1e-5)
    assert model.config.num_attention_heads == kv * (g - 1) and model.config.head_dim == d


@pytest.mark.parametrize("arch", HEADS)
def test_without_the_refit_the_output_is_the_original_with_heads_and_channels_zeroed(arch, tmp_path):
    model = tiny_moe(arch)
    original = copy.deepcopy(model)
    d = _head_dim(model)
    result = llm.prune_structured(
        model, calibration(), ratio=0.4, score="flap", reconstruct=False, bias=False, **OPTIONS
    )
    assert result.standard and result.heads == [2, 2] and 0.3 < result.removed_fraction < 0.5
    zeroed, _ = zeroed_original(original, model)
    for block, pruned in zip(zeroed.model.layers, model.model.layers):
        kept = _kept_heads(block.self_attn.q_proj, pruned.self_attn.q_proj, d)
        gone = torch.ones(model.config.num_key_value_heads * 2, dtype=torch.bool)
        gone[kept] = False
        with torch.no_grad():
            block.self_attn.o_proj.weight.reshape(-1, len(gone), d)[:, gone] = 0
            if block.self_attn.o_proj.bias is not None:  # gpt-oss: FLAP's compensation moved into its bias
                block.self_attn.o_proj.bias.copy_(pruned.self_attn.o_proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()).logits, zeroed(_tokens()).logits, rtol=1e-5, atol=1e-5)
    llm.save_pretrained(model, None, tmp_path / "pruned")  # uniform heads: a standard config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.config.num_attention_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(_tokens()).logits, model(_tokens()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["deepseek_v3", "olmoe"])
def test_mla_and_olmoe_keep_their_heads(arch):
    model = tiny_moe(arch)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    why = "multi-head latent attention" if arch == "deepseek_v3" else "q_norm and k_norm are RMSNorms over all heads"
    for units in ("both", "heads"):
        with pytest.raises(
            UsageError, match=f"units='{units}': architecture {arch} keeps its attention heads: its {why}"
        ):
            llm.prune_structured(model, calibration(), ratio=0.25, units=units, **OPTIONS)
    assert all(torch.equal(model.state_dict()[n], p) for n, p in before.items())
    q = {n: p.detach().clone() for n, p in model.named_parameters() if ".self_attn." in n}
    result = llm.prune_structured(model, calibration(), ratio=0.25, **OPTIONS)
    assert result.units == "mlp" and result.heads == [4, 4] and "(units='mlp': heads kept)" in result.summary()
    assert all(torch.equal(model.get_parameter(n), p) for n, p in q.items())


def _scale_channels(m: moe.MoE, channels: slice, factor: float) -> None:
    with torch.no_grad():
        for e in range(m.num_experts):
            gate, up, down = m.views(e)
            gate[channels] *= factor
            up[channels] *= factor
            down[:, channels] *= factor


def _split_blocks(model) -> None:
    """Blocks whose routed channels differ in shape: block 0's experts keep 4 of 16 channels at full
    magnitude (12 at 2 %: standardized near −0.58), block 1's one channel 20× (the others near −0.25)."""
    (m0,) = moe.find_moe(model.model.layers[0])
    (m1,) = moe.find_moe(model.model.layers[1])
    _scale_channels(m0, slice(0, 12), 0.02)
    _scale_channels(m1, slice(0, 1), 20.0)


def _routed_global(model, total: int, floor: float = 0.1, multiple: int = 4) -> list[int]:
    """The global allocation's routed widths written out: each block's magnitudes standardized together,
    each expert's sorted, the mean over experts per rank; the `total` lowest over both blocks, each
    keeping `floor` of its channels; widths rounded to `multiple`."""
    slices = []
    for block in model.model.layers:
        (m,) = moe.find_moe(block)
        mags = []
        for e in range(m.num_experts):
            gate, up, down = (t.detach().double() for t in m.views(e))
            mags.append((gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt())
        s = torch.stack(mags)
        z = (s - s.mean()) / s.flatten().std()
        slices.append(z.sort(dim=1).values.mean(0))
    order = sorted((float(v), b, k) for b, z in enumerate(slices) for k, v in enumerate(z))
    taken = [0, 0]
    for _, b, _k in order:
        if sum(taken) == total:
            break
        if taken[b] < len(slices[b]) - max(1, math.ceil(floor * len(slices[b]))):
            taken[b] += 1
    widths = [len(z) for z in slices]
    return [max(multiple, round((w - t) / multiple) * multiple) for w, t in zip(widths, taken)]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_global_allocation_follows_the_scores_and_load_pretrained_rebuilds_it(arch, tmp_path):
    model = tiny_moe(arch)
    _split_blocks(model)
    uniform = copy.deepcopy(model)
    u = llm.prune_structured(uniform, calibration(), ratio=0.25, score="magnitude", units="mlp", **OPTIONS)
    removed = sum(16 - w for w in u.intermediate)
    want = _routed_global(model, removed)
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="magnitude", units="mlp",
                                  allocation="global", **OPTIONS)  # fmt: skip
    assert result.intermediate == want and want[0] < want[1], (want, u.intermediate)
    assert not result.standard and "llm.load_pretrained" in result.summary()
    widths = model.config.pyprune_fast_widths
    assert widths["intermediate_size"] == want
    if arch == "qwen2_moe":  # shared experts lose their block's routed fraction
        shared = [b.mlp.shared_expert.down_proj.in_features for b in model.model.layers]
        assert widths["shared_intermediate_size"] == shared == [round(24 * w / 16) for w in want]
        assert model.config.shared_expert_intermediate_size == max(shared)
    llm.save_pretrained(model, None, tmp_path / "pruned")
    with pytest.raises((RuntimeError, ValueError)):  # the config's widths are the largest: stock refuses
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    loaded, _ = llm.load_pretrained(tmp_path / "pruned")
    assert llm.structured.moe_widths(loaded) == (result.intermediate, result.heads)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_tokens()).logits, model(_tokens()).logits, rtol=0, atol=0)


def test_global_heads_differ_per_block_and_reload_with_their_sinks(tmp_path):
    model = tiny_moe("gpt_oss", num_attention_heads=8)  # 4 query heads per key/value group
    d = 8
    with torch.no_grad():  # head magnitudes: block 0 three low, one high per group; block 1 two and two
        for b, low in ((0, [0, 1, 2, 4, 5, 6]), (1, [0, 1, 4, 5])):
            attention = model.model.layers[b].self_attn
            for h in low:
                attention.q_proj.weight[h * d : (h + 1) * d] *= 0.05
                attention.o_proj.weight[:, h * d : (h + 1) * d] *= 0.05
    sinks = [block.self_attn.sinks.detach().clone() for block in model.model.layers]
    result = llm.prune_structured(model, calibration(), ratio=0.25, score="magnitude", allocation="global",
                                  **OPTIONS)  # fmt: skip
    # one slice a block (round(0.25 × 4)) in all: block 1's two low heads per group (standardized −0.87)
    # come before block 0's three (−0.58)
    assert result.heads == [8, 4] and not result.standard
    assert torch.equal(model.model.layers[0].self_attn.sinks.detach(), sinks[0])
    assert torch.equal(model.model.layers[1].self_attn.sinks.detach(), sinks[1][[2, 3, 6, 7]])
    assert model.config.num_attention_heads == 8 and model.config.pyprune_fast_widths["num_attention_heads"] == [8, 4]
    llm.save_pretrained(model, None, tmp_path / "pruned")
    loaded, _ = llm.load_pretrained(tmp_path / "pruned")
    assert loaded.model.layers[1].self_attn.sinks.shape == (4,)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_tokens()).logits, model(_tokens()).logits, rtol=0, atol=0)


def test_the_cli_saves_a_global_allocation_that_load_pretrained_loads(tmp_path, capsys):
    from pyprune_fast.app import cli

    model = tiny_moe("qwen2_moe")
    _split_blocks(model)
    directory = save_tiny_moe(tmp_path / "qwen2_moe", "qwen2_moe", model)
    out = tmp_path / "out"
    argv = ["prune", "--model", f"hf:{directory}", "--structure", "width", "--criterion", "magnitude", "--ratio",
            "0.25", "--allocation", "global", "--save-model", "--out", str(out), "--samples", "4", "--seq-len", "16",
            "--eval-tokens", "256", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    with open(out / "report.json") as f:
        (r,) = json.load(f)["results"]
    info = r["structured"]
    assert not info["standard"] and info["load"] == "pyprune_fast.llm.load_pretrained(DIR)"
    assert info["units"] == "both" and info["intermediate"][0] < info["intermediate"][1]
    loaded, _ = llm.load_pretrained(out / r["files"]["model"])
    assert sum(p.numel() for p in loaded.parameters()) == info["params_after"]
    assert llm.structured.moe_widths(loaded) == (info["intermediate"], info["heads"])
