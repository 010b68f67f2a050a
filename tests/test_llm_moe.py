"""Mixture-of-experts LLMs in the block pipeline (llm.moe): every routed expert's Linears, views of the
fused 3-D expert tensors, are pruned as Linears and calibrated on the tokens routed to that expert only
(down_proj on the router-weighted inputs); experts with too few tokens are reported and handled as asked;
routers are never pruned; shared experts see every token. One tiny model of each MoE architecture of
the installed transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyprune_fast import llm
from pyprune_fast.criteria.method import LayerMethod
from pyprune_fast.llm import moe

transformers = pytest.importorskip("transformers")

VOCAB = 96
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss")
N_SAMPLES, SEQ_LEN = 4, 16
OPTIONS = {"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "progress": False, "blocksize": 16}


def tiny_moe(arch: str, seed: int = 0, **overrides):
    """A two-block model of `arch` with 4 experts (DeepSeek-V3: 8 in 2 groups, block 0 dense), top-2,
    its routers and experts drawn N(0, 0.2) so that routing differs from token to token."""
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)  # fmt: skip
    configs = {
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=4),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4
        ),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=16, num_experts=4, head_dim=8
        ),
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),  # fmt: skip
        "olmoe": lambda: transformers.OlmoeConfig(**common, intermediate_size=16, num_experts=4),
        "gpt_oss": lambda: transformers.GptOssConfig(
            **common, intermediate_size=16, num_local_experts=4, head_dim=8, sliding_window=16
        ),
    }
    config = configs[arch]()
    config.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            for m in moe.find_moe(block):
                for p in [*m.router.parameters(), *m.experts.parameters()]:
                    p.normal_(0, 0.2)
    return model


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def save_tiny_moe(directory, arch: str, model=None):
    """`model` (default tiny_moe(arch)) and the tiny tokenizer saved as an hf:DIR for the CLI; returns DIR."""
    from tests.test_llm_models import tiny_tokenizer

    (tiny_moe(arch) if model is None else model).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def first_moe_inputs(model) -> torch.Tensor:
    """The hidden states [tokens, hidden] that block 0's MoE layer receives over the calibration windows."""
    inputs = []
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        for window in calibration():
            model(input_ids=window[None], use_cache=False)
    handle.remove()
    x = torch.cat(inputs)
    return x.reshape(-1, x.shape[-1])


class Recorder(LayerMethod):
    """Magnitude scores that keep the input statistics each Linear was given (by qualified name)."""

    name = "recorder"
    observes = frozenset({"norms", "xtx"})

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def score(self, block, names=None):
        names = self.layers(block) if names is None else names
        for n in names:
            s = block.stats[n]
            self.seen[block.qualified(n)] = (s.tokens, s.sumsq.clone(), s.xtx.clone())
        return {n: block.linears[n].weight.abs().float() for n in names}


def _activation(arch: str, experts, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The experts' gated activation, written out: SiLU(gate)·up, gpt-oss's clamped SwiGLU."""
    if arch == "gpt_oss":
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    return F.silu(gate) * up


def expert_inputs(arch: str, m: moe.MoE, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's gate/up input (its routed tokens) and down_proj input (w_t·h_t), from the stock router
    and the fused tensors read directly (no views)."""
    _, weights, index = m.router(x)
    token, slot = torch.where(index == e)
    xe, w = x[token], weights[token, slot, None].to(x.dtype)
    ex = m.experts
    if arch == "gpt_oss":
        gate_up = xe @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        inter = ex.gate_up_proj.shape[1] // 2
        gate, up = xe @ ex.gate_up_proj[e, :inter].T, xe @ ex.gate_up_proj[e, inter:].T
    return xe, _activation(arch, ex, gate, up) * w


@pytest.mark.parametrize("arch", ARCHS)
def test_each_expert_sees_only_its_tokens_and_down_proj_their_router_weights(arch):
    model = tiny_moe(arch)
    moe_inputs: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(model.model.layers):
        for m in moe.find_moe(block):
            hook = lambda _m, args, i=i: moe_inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))  # noqa: E731
            handles.append(m.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for window in calibration():
            model(input_ids=window[None], use_cache=False)
    for h in handles:
        h.remove()
    recorder = Recorder()
    llm.prune(model, calibration(), method=recorder, sparsity=0.0, batch_size=1, min_expert_tokens=0, **OPTIONS)
    checked = 0
    for i, inputs in moe_inputs.items():
        x = torch.cat(inputs)
        (m,) = moe.find_moe(model.model.layers[i])
        for e in range(m.num_experts):
            with torch.no_grad():
                xe, he = expert_inputs(arch, m, x, e)
            name = f"model.layers.{i}.mlp.experts.{e}"
            if len(xe) == 0:
                assert f"{name}.gate_proj" not in recorder.seen
                continue
            for proj, want in (("gate_proj", xe), ("up_proj", xe), ("down_proj", he)):
                tokens, sumsq, xtx = recorder.seen[f"{name}.{proj}"]
                assert tokens == len(want), (name, proj)
                torch.testing.assert_close(sumsq, want.pow(2).sum(0), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(xtx, want.T @ want, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked >= 4


CASES = [("wanda", 0.5), ("sparsegpt", 0.375), ("magnitude", "2:4"), ("sparsegpt", "2:4")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "sparsity"), CASES)
def test_every_expert_is_pruned_exactly_in_its_fused_tensors(arch, method, sparsity):
    model = tiny_moe(arch)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n or ".router." in n}
    result = llm.prune(model, calibration(), method=method, sparsity=sparsity, rare_experts="route",
                       min_expert_tokens=4, **OPTIONS)  # fmt: skip
    pattern = llm.parse_sparsity(sparsity)
    experts = 0
    for i, block in enumerate(model.model.layers):
        for m in moe.find_moe(block):
            for e in range(m.num_experts):
                for proj, weight in zip(moe.PROJECTIONS, m.views(e)):
                    name = f"model.layers.{i}.{m.expert(e)}.{proj}.weight"
                    zeros = int((weight == 0).sum())
                    if pattern.is_nm:  # every group of 4 along the input holds 2 zeros
                        groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
                        assert bool((groups == 2).all()), name
                    else:
                        assert zeros == round(pattern.fraction * weight.numel()), name
                    assert result.layer_sparsity[name] == zeros / weight.numel()
                experts += 1
    assert experts >= 4
    for n, p in routers.items():  # routers (and a shared expert's gate) are never pruned
        assert torch.equal(model.get_parameter(n), p), n
    assert all(".gate." in n or ".router." in n or "shared_expert_gate" in n for n in result.left_dense)


def test_shared_experts_see_every_token_and_their_gate_stays():
    model = tiny_moe("qwen2_moe")
    gate = model.model.layers[0].mlp.shared_expert_gate.weight.detach().clone()
    recorder = Recorder()
    llm.prune(model, calibration(), method=recorder, sparsity=0.0, **OPTIONS)
    assert recorder.seen["model.layers.0.mlp.shared_expert.gate_proj"][0] == N_SAMPLES * SEQ_LEN
    assert "model.layers.0.mlp.shared_expert_gate" not in recorder.seen
    result = llm.prune(model, calibration(), method="wanda", sparsity=0.5, **OPTIONS)
    assert torch.equal(model.model.layers[0].mlp.shared_expert_gate.weight, gate)
    assert result.layer_sparsity["model.layers.0.mlp.shared_expert.down_proj.weight"] == 0.5


def _routed_tokens(model) -> dict[str, int]:
    recorder = Recorder()
    llm.prune(model, calibration(), method=recorder, sparsity=0.0, min_expert_tokens=0, propagate="dense", **OPTIONS)
    gates = [n for n in recorder.seen if ".experts." in n and n.endswith(".gate_proj")]
    return {n[: -len(".gate_proj")]: recorder.seen[n][0] for n in gates}


@pytest.mark.parametrize("policy", moe.RARE_EXPERTS)
def test_rare_experts_are_reported_and_handled_as_asked(policy):
    model = tiny_moe("mixtral")
    routed = _routed_tokens(tiny_moe("mixtral"))
    threshold = sorted(routed.values())[len(routed) // 2]  # about half the experts are rare
    rare = {n: c for n, c in routed.items() if c < threshold}
    assert 0 < len(rare) < len(routed)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder = Recorder() if policy == "route" else "wanda"
    result = llm.prune(model, calibration(), method=recorder, sparsity=0.5, rare_experts=policy,
                       min_expert_tokens=threshold, propagate="dense", **OPTIONS)  # fmt: skip
    assert result.rare_experts == rare
    assert "got too few calibration tokens" in result.summary()
    for i, block in enumerate(model.model.layers):
        (m,) = moe.find_moe(block)
        inter = m.experts.gate_up_proj.shape[1] // 2
        for e in range(m.num_experts):
            name = f"model.layers.{i}.{m.expert(e)}"
            original = dense[f"model.layers.{i}.mlp.experts.gate_up_proj"][e, :inter]
            gate = m.views(e)[0]
            if name not in rare:
                assert int((gate == 0).sum()) == gate.numel() // 2, name
            elif policy == "dense":
                assert torch.equal(gate, original), name
            elif policy == "magnitude":  # |W| at the run's granularity (wanda's: per row), half of each row
                order = torch.sort(original.abs(), dim=1, stable=True).indices
                want = original.clone().scatter_(1, order[:, : original.shape[1] // 2], 0.0)
                assert torch.equal(gate, want), name
            else:  # route: forced tokens bring it to the threshold
                assert recorder.seen[f"{name}.gate_proj.weight"[: -len(".weight")]][0] == threshold, name
                assert int((gate == 0).sum()) == gate.numel() // 2, name


def test_rare_options_are_checked_before_the_model_is_touched():
    model = tiny_moe("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="rare_experts must be one of"):
        llm.prune(model, calibration(), rare_experts="drop", **OPTIONS)
    with pytest.raises(ValueError, match="min_expert_tokens must be an int >= 0"):
        llm.prune(model, calibration(), min_expert_tokens=-1, **OPTIONS)
    with pytest.raises(ValueError, match="'snip' takes gradients of the Linear weights of block model.layers.0"):
        llm.prune(model, calibration(), method="snip", **OPTIONS)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_router_the_pruner_does_not_know_is_named():
    model = tiny_moe("mixtral")
    block = model.model.layers[0]
    block.mlp.gate = torch.nn.Identity()  # a routing module without a weight [experts, hidden]
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock at mlp: fused experts .4. without a router"):
        moe.find_moe(block)


@pytest.mark.parametrize("per_expert", [False, True])
def test_a_disk_streamed_run_equals_the_in_memory_one(tmp_path, per_expert):
    from safetensors.torch import load_file

    from pyprune_fast.bench.offload import synthetic_checkpoint

    sizes = dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, vocab_size=VOCAB)  # fmt: skip
    synthetic_checkpoint(tmp_path / "in", moe=True, per_expert=per_expert, dtype=torch.float32, **sizes)
    options = dict(method="wanda", sparsity=0.5, min_expert_tokens=4, rare_experts="route", **OPTIONS)
    result = llm.prune(tmp_path / "in", calibration(), offload="disk", out=tmp_path / "out", **options)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in").eval()
    want = llm.prune(model, calibration(), **options)
    assert result.layer_sparsity == want.layer_sparsity and result.rare_experts == want.rare_experts
    assert result.left_dense == want.left_dense
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(shard))
    stored = {k for shard in (tmp_path / "in").glob("*.safetensors") for k in load_file(shard)}
    assert set(written) == stored  # the input's layout, key for key
    if per_expert:
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in written
    else:
        for name, p in model.named_parameters():
            assert torch.equal(written[name], p), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)


@pytest.mark.parametrize("policy", ["dense", "magnitude"])
def test_whole_model_sparsity_counts_the_experts_and_keeps_rare_ones_as_asked(policy):
    model = tiny_moe("qwen2_moe")
    routed = _routed_tokens(tiny_moe("qwen2_moe"))  # the global run scores the dense model, as this does
    threshold = sorted(routed.values())[len(routed) // 2]
    result = llm.prune(model, calibration(), method="wanda", sparsity=0.5, granularity="global",
                       rare_experts=policy, min_expert_tokens=threshold, **OPTIONS)  # fmt: skip
    assert result.rare_experts == {n: c for n, c in routed.items() if c < threshold} != {}
    total = sum(result.layer_numel.values())
    zeros = sum(s * result.layer_numel[n] for n, s in result.layer_sparsity.items())
    assert round(zeros) == round(0.5 * total)
    for expert in result.rare_experts:  # "dense": +inf scores, never pruned; "magnitude": |W| among the others
        rare = [result.layer_sparsity[f"{expert}.{p}.weight"] for p in moe.PROJECTIONS]
        assert (max(rare) == 0) == (policy == "dense"), expert


def _world_job(rank: int, world: int):
    import torch.distributed as dist

    def prune():
        model = tiny_moe("mixtral")
        result = llm.prune(model, calibration(), method="wanda", sparsity=0.5, min_expert_tokens=32,
                           group=dist.group.WORLD, **OPTIONS)  # fmt: skip
        return result.rare_experts, {n: p.detach().clone() for n, p in model.named_parameters()}

    yield "prune", prune


JOBS = {"moe": _world_job}


def test_rare_experts_over_two_ranks_are_those_of_one_process(tmp_path):
    from tests.worlds import run_world

    ranks = run_world(__name__, "moe", 2, tmp_path)
    assert all(r["prune"][0] == "ok" for r in ranks), ranks
    model = tiny_moe("mixtral")
    want = llm.prune(model, calibration(), method="wanda", sparsity=0.5, min_expert_tokens=32, **OPTIONS)
    (rare0, weights0), (rare1, weights1) = (r["prune"][1] for r in ranks)
    assert rare0 == rare1 == want.rare_experts != {}
    for name, p in model.named_parameters():
        assert torch.equal(weights0[name], weights1[name]), name
        assert float(((weights0[name] == 0) == (p == 0)).float().mean()) > 0.99, name  # near-ties of summed stats
