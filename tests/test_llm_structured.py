"""Structured pruning of decoder LLMs (llm.prune_structured): shapes changed for real, the GQA rule,
the least-squares refit and FLAP's score against formulas written out here, ShortGPT's block influence,
saving and loading (stock from_pretrained for standard configs, llm.load_pretrained otherwise), and bad
input refused with the model untouched."""

import pytest
import torch
from torch import nn

from pyprune_fast import llm
from pyprune_fast.criteria.input_stats import InputStats
from pyprune_fast.errors import UsageError
from pyprune_fast.llm.structured import refit
from tests.test_llm_models import VOCAB, tiny_config

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt")
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
OPTS = dict(num_samples=8, seq_len=32, progress=False)


def tiny(arch: str, layers: int = 2, seed: int = 0) -> nn.Module:
    if arch == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    else:
        fields = {**tiny_config(arch).to_dict(), "num_hidden_layers": layers}
        fields.pop("layer_types", None)  # rebuilt for the new depth
        config = type(tiny_config(arch))(**fields)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("structure", ["width", "depth"])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt_neox"])
def test_ratio_zero_changes_nothing(arch, structure):
    model = tiny(arch)
    before, logits = state(model), model(IDS).logits
    result = llm.prune_structured(model, CALIB, structure=structure, ratio=0.0, **OPTS)
    assert same_state(model, before)
    assert torch.equal(model(IDS).logits, logits)
    assert result.params_after == result.params_before and result.removed_blocks == []


def test_least_squares_refit_is_the_lstsq_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64) * torch.rand(10, generator=g, dtype=torch.float64) + 0.3
    w, b = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 9])
    stats = InputStats(300, x.pow(2).sum(0), x.T @ x, x.sum(0))  # exact float64 statistics
    y = x @ w.T + b
    z = torch.cat([x[:, keep], torch.ones(300, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(z, y).solution.T  # [out, |K| + 1]
    w1, b1 = refit.least_squares(w, b, keep, stats, intercept=True, percdamp=0.0)
    torch.testing.assert_close(w1, solution[:, :-1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b1, solution[:, -1], rtol=1e-9, atol=1e-9)
    w2, b2 = refit.least_squares(w, None, keep, stats, intercept=False, percdamp=0.0)
    torch.testing.assert_close(w2, torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T, rtol=1e-9, atol=1e-9)
    assert b2 is None
    # FLAP's bias compensation: b + W_R E[x_R]
    removed = torch.tensor([1, 4, 5, 6, 8])
    comp = refit.compensate(w, b, keep, stats)
    torch.testing.assert_close(comp, b + w[:, removed] @ x[:, removed].mean(0))


def test_least_squares_refuses_non_finite():
    stats = InputStats.empty(4, torch.device("cpu"), hessian=True, sums=True)
    stats.add(torch.randn(8, 4))
    stats.xtx[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        refit.least_squares(torch.randn(3, 4), None, torch.tensor([0, 1]), stats, intercept=False)


def test_pipeline_refit_of_the_first_block_is_flap_plus_least_squares():
    """Block 0's down_proj after pruning = the least-squares refit (with intercept, Llama given mlp_bias)
    on the dense block's down_proj inputs, over the channels FLAP's score keeps — both written out here."""
    model = tiny("llama")
    dense = tiny("llama")
    xs = []
    hook = dense.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for row in CALIB:
            dense(row[None])
    hook.remove()
    x = torch.cat(xs).reshape(-1, 64).double()
    w = dense.model.layers[0].mlp.down_proj.weight.detach().double()
    result = llm.prune_structured(model, CALIB, ratio=0.3, score="flap", percdamp=0.0, **OPTS)
    width = result.intermediate[0]
    assert width < 64
    flap = x.var(0, unbiased=False) * w.pow(2).sum(0)
    keep = torch.argsort(flap, stable=True)[64 - width :].sort().values
    z = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(z, x @ w.T).solution.T
    down = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.weight.double(), solution[:, :-1], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(down.bias.double(), solution[:, -1], rtol=2e-3, atol=2e-4)
    gate = dense.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, gate[keep])
    assert model.config.mlp_bias is True


def _expected_params(model, widths, heads, kv, d, hidden, bias_mlp, bias_attn):
    per_block = []
    for i_w, h in zip(widths, heads):
        mlp = 3 * hidden * i_w + (2 * i_w + hidden) * bias_mlp
        attn = 2 * hidden * h * d + 2 * hidden * kv * d + (h * d + 2 * kv * d + hidden) * bias_attn
        per_block.append(mlp + attn + 2 * hidden)
    return per_block


def test_exact_widths_and_parameter_counts_gqa():
    model = tiny("llama", layers=3)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    result = llm.prune_structured(model, CALIB, ratio=0.4, bias=False, **OPTS)
    # 4 query heads in 2 groups of 2: round(0.4 × 2) = 1 query head per group goes (2 × 8 rows of q, columns of o)
    heads_removed = 2 * (8 * 32 + 8 * 32)
    channels = round((0.4 * block - heads_removed) / (3 * 32))
    assert result.heads == [2, 2, 2] and result.intermediate == [64 - channels] * 3
    blocks = _expected_params(model, result.intermediate, result.heads, 2, 8, 32, False, False)
    assert [sum(p.numel() for p in b.parameters()) for b in model.model.layers] == blocks
    assert result.decoder_params_after == sum(blocks)
    assert abs(result.removed_fraction - 0.4) <= 3 * 32 / block
    assert model.config.intermediate_size == 64 - channels and model.config.num_attention_heads == 2
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 8


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
def test_heads_removed_whole_and_the_gqa_rule(arch):
    model, dense = tiny(arch), tiny(arch)
    result = llm.prune_structured(model, CALIB, ratio=0.5, score="wanda", **OPTS)
    attn, ref = model.get_submodule(_attn(arch, 0)), dense.get_submodule(_attn(arch, 0))
    d = 8
    old_q = ref.q_proj.weight.reshape(4, d, 32)
    new_q = attn.q_proj.weight.reshape(-1, d, 32)
    kept = [next(h for h in range(4) if torch.equal(new_q[j], old_q[h])) for j in range(len(new_q))]
    assert result.heads[0] == len(kept) < 4 and kept == sorted(kept)
    if arch == "opt":  # multi-head attention: the same heads' k and v rows go with them
        for name in ("k_proj", "v_proj"):
            old = getattr(ref, name).weight.reshape(4, d, 32)
            assert torch.equal(getattr(attn, name).weight.reshape(-1, d, 32), old[kept])
    else:  # GQA: the same number of query heads kept in each key/value group; k/v untouched
        groups = [h // 2 for h in kept]
        assert groups.count(0) == groups.count(1)
        assert torch.equal(attn.k_proj.weight, ref.k_proj.weight) and torch.equal(attn.v_proj.weight, ref.v_proj.weight)
        assert attn.num_key_value_groups == len(kept) // 2
    if arch == "qwen3":
        assert torch.equal(attn.q_norm.weight, ref.q_norm.weight)
    assert torch.isfinite(model(IDS).logits).all()


def test_gpt_neox_heads_are_interleaved_rows_of_query_key_value():
    """GPT-NeoX, one block, no refit: the pruned model equals the dense one whose removed heads' and
    channels' consumer inputs are replaced by their calibration means (FLAP's bias compensation), and
    each kept head keeps its 3·d contiguous rows (q | k | v) of query_key_value."""
    model, dense = tiny("gpt_neox", layers=1), tiny("gpt_neox", layers=1)
    result = llm.prune_structured(model, CALIB, ratio=0.5, score="flap", reconstruct=False, **OPTS)
    layer, ref = model.gpt_neox.layers[0], dense.gpt_neox.layers[0]
    assert result.heads == [2] and result.intermediate[0] < 64
    consumers = {"attention.dense": 32, "mlp.dense_4h_to_h": 64}
    xs = {n: [] for n in consumers}
    hooks = [
        ref.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: xs[n].append(a[0].detach()))
        for n in consumers
    ]
    with torch.no_grad():
        for row in CALIB:
            dense(row[None], use_cache=False)
    for h in hooks:
        h.remove()
    removed = {}
    for n, width in consumers.items():
        kept_w, full_w = layer.get_submodule(n).weight, ref.get_submodule(n).weight
        kept = [
            next(c for c in range(width) if torch.equal(kept_w[:, j], full_w[:, c])) for j in range(kept_w.shape[1])
        ]
        removed[n] = torch.tensor([c for c in range(width) if c not in kept])
    heads = sorted({int(c) // 8 for c in range(32) if c not in removed["attention.dense"].tolist()})
    rows = torch.cat([torch.arange(h * 24, h * 24 + 24) for h in heads])
    assert torch.equal(layer.attention.query_key_value.weight, ref.attention.query_key_value.weight[rows])
    means = {n: torch.cat(x).reshape(-1, consumers[n]).double().mean(0).float() for n, x in xs.items()}

    def substitute(_m, a, n):
        x = a[0].clone()
        x[..., removed[n]] = means[n][removed[n]]
        return (x,)

    hooks = [ref.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: substitute(m, a, n)) for n in consumers]
    with torch.no_grad():
        expected = dense(IDS, use_cache=False).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(model(IDS, use_cache=False).logits, expected, rtol=1e-4, atol=1e-4)


def _attn(arch: str, i: int) -> str:
    return f"model.decoder.layers.{i}.self_attn" if arch == "opt" else f"model.layers.{i}.self_attn"


@pytest.mark.parametrize("arch", [*ARCHS, "gpt_neox"])
def test_uniform_width_saves_a_standard_model(arch, tmp_path):
    model = tiny(arch)
    result = llm.prune_structured(model, CALIB, ratio=0.3, **OPTS)
    logits = model(IDS).logits
    llm.save_pretrained(model, None, tmp_path / "m")
    if result.standard:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    else:  # OPT and GPT-NeoX with fewer heads: their attention derives head_dim = hidden / heads
        assert arch in ("opt", "gpt_neox")
        loaded, _ = llm.load_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    a = loaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_global_widths_load_with_load_pretrained(arch, tmp_path):
    model = tiny(arch, layers=3)
    result = llm.prune_structured(model, CALIB, ratio=0.3, allocation="global", floor=0.2, **OPTS)
    uniform = tiny(arch, layers=3)
    reference = llm.prune_structured(uniform, CALIB, ratio=0.3, **OPTS)
    assert sum(result.intermediate) == sum(reference.intermediate) and sum(result.heads) == sum(reference.heads)
    assert min(result.intermediate) >= 0.2 * 64
    if len(set(result.intermediate)) == 1:
        pytest.skip("the global threshold happened to give uniform widths")
    assert not result.standard
    logits = model(IDS).logits
    llm.save_pretrained(model, None, tmp_path / "m")
    loaded, tokenizer = llm.load_pretrained(tmp_path / "m")
    assert tokenizer is None
    torch.testing.assert_close(loaded(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # stock: one width for every block
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_depth_removes_the_lowest_influence_blocks(tmp_path):
    model = tiny("qwen3", layers=4)
    model.config.layer_types = ["full_attention"] * 4
    blocks = list(model.model.layers)
    pairs = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        pairs.append((blocks.index(module), x.detach(), y.detach()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    with torch.no_grad():
        for row in CALIB:
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    influence = []
    for i in range(4):
        cos = torch.cat(
            [nn.functional.cosine_similarity(x[0].double(), y[0].double(), dim=-1) for j, x, y in pairs if j == i]
        )
        influence.append(1 - cos.mean().item())
    lowest = sorted(sorted(range(4), key=lambda i: influence[i])[:2])
    result = llm.prune_structured(model, CALIB, structure="depth", ratio=0.5, **OPTS)
    assert result.removed_blocks == lowest
    assert result.influence == pytest.approx(influence, rel=1e-6, abs=1e-9)
    kept = [i for i in range(4) if i not in lowest]
    assert list(model.model.layers) == [blocks[i] for i in kept]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2 and len(model.config.layer_types) == 2
    with_cache = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    no_cache = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, no_cache)
    llm.save_pretrained(model, None, tmp_path / "d")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    assert torch.equal(loaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0), with_cache)


def _without_block(arch: str, i: int, layers: int) -> nn.Module:
    """A fresh tiny model with block i deleted by hand (and the config's depth and layer_types)."""
    model = tiny(arch, layers=layers)
    model.config.layer_types = ["full_attention"] * layers
    kept = [b for j, b in enumerate(model.model.layers) if j != i]
    model.model.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = layers - 1
    model.config.layer_types = ["full_attention"] * (layers - 1)
    return model


def test_depth_by_loss_removes_the_blocks_whose_removal_costs_least():
    layers, windows = 4, CALIB[:8, :32]

    def loss(m):  # transformers' own mean next-token loss, each window the same length
        with torch.no_grad():
            return sum(float(m(row[None], labels=row[None], use_cache=False).loss) for row in windows) / len(windows)

    dense = tiny("qwen3", layers=layers)
    dense.config.layer_types = ["full_attention"] * layers
    increase = [loss(_without_block("qwen3", i, layers)) - loss(dense) for i in range(layers)]
    model = tiny("qwen3", layers=layers)
    model.config.layer_types = ["full_attention"] * layers
    result = llm.prune_structured(model, CALIB, structure="depth", depth_score="loss", ratio=0.25, **OPTS)
    assert result.loss_increase == pytest.approx(increase, rel=1e-4, abs=1e-6)
    assert result.removed_blocks == [min(range(layers), key=lambda i: increase[i])]
    assert result.influence is None and result.depth_score == "loss"
    assert model.config.num_hidden_layers == 3 and len(model.config.layer_types) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    with_cache = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    no_cache = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, no_cache)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio="0.5"), "ratio"),
        (dict(ratio=0.8), "ratio=0.8 leaves no query head"),
        (dict(ratio=0.8, structure="depth"), "ratio=0.8 removes every"),
        (dict(score="hrank"), "score"),
        (dict(structure="depth", depth_score="perplexity"), "depth_score"),
        (dict(allocation="local"), "allocation"),
        (dict(structure="length"), "structure"),
        (dict(floor=1.0), "floor"),
        (dict(normalize="l2"), "normalize"),
        (dict(allocation="global", normalize="lp", p=0), "p must be"),
        (dict(units="mlp", ratio=0.99), "ratio=0.99 leaves no MLP channel in block 0"),
        (dict(units="heads", ratio=0.9), "ratio=0.9 leaves no query head in a key/value group of block 0"),
        (dict(units="all"), "units must be one of"),
        (dict(num_samples=0), "num_samples must be a positive int"),
    ],
)
def test_bad_input_leaves_the_model_unchanged(kwargs, match):
    model = tiny("llama")
    before = state(model)
    with pytest.raises(ValueError, match=match) as error:
        llm.prune_structured(model, CALIB, **{**OPTS, **kwargs})
    assert same_state(model, before)
    if not match.startswith(("normalize", "p ")):  # the channel criteria's own check (a ValueError)
        assert isinstance(error.value, UsageError) and error.value.parameters[0] in kwargs


def test_unknown_architecture_tied_weights_and_uneven_groups_are_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    gpt2 = transformers.AutoModelForCausalLM.from_config(config).eval()
    tied = tiny("llama")
    tied.model.layers[1].mlp.down_proj.weight = tied.model.layers[0].mlp.down_proj.weight
    uneven = tiny("llama")  # 3 query heads of 8 cannot split into 2 key/value groups
    uneven.model.layers[1].self_attn.q_proj = nn.Linear(32, 24, bias=False)
    uneven.model.layers[1].self_attn.o_proj = nn.Linear(24, 32, bias=False)
    cases = [
        (gpt2, "model: architecture gpt2: its attention is not known"),
        (tied, "model: .*shared inside the decoder blocks"),
        (uneven, "model: architecture llama: the query heads of blocks \\[1\\] do not split into its 2 key/value"),
    ]
    for model, match in cases:
        before = state(model)
        with pytest.raises(UsageError, match=match) as error:
            llm.prune_structured(model, CALIB, **OPTS)
        assert error.value.parameters == ("model",) and same_state(model, before)


def test_a_failure_during_the_run_gives_the_model_back(monkeypatch):
    model = tiny("llama", layers=3)
    before, config = state(model), model.config.to_dict()
    calls = []
    original = refit.least_squares

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("the refit's system is not positive definite")
        return original(*args, **kwargs)

    monkeypatch.setattr("pyprune_fast.llm.structured.width.least_squares", failing)
    with pytest.raises(ValueError, match="positive definite"):
        llm.prune_structured(model, CALIB, ratio=0.4, **OPTS)
    assert same_state(model, before) and model.config.to_dict() == config


def test_multiple_rounds_the_kept_mlp_width():
    model = tiny("llama", layers=2)
    result = llm.prune_structured(model, CALIB, ratio=0.3, multiple=16, **OPTS)
    assert all(w % 16 == 0 and 0 < w < 64 for w in result.intermediate)
    with pytest.raises(ValueError, match="multiple"):
        llm.prune_structured(tiny("llama"), CALIB, ratio=0.3, multiple=0, **OPTS)
