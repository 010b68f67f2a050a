"""Channel permutations for N:M (llm.refine.permute): the swap search against single-swap optimality
and the reference gains, and the permutations applied to tiny random decoders leaving their logits
unchanged, their pruned Linears 2:4 in stored order, saved as a standard from_pretrained directory."""

import copy
import itertools

import pytest
import torch

from pyprune_fast import llm, reference
from pyprune_fast.llm.refine import Gain, Refinement, permute
from tests.test_llm_failures import tiny_mixtral
from tests.test_llm_models import VOCAB, tiny_causal_lm, tiny_config
from tests.test_llm_pipeline import block_weights, run

transformers = pytest.importorskip("transformers")


def is_permutation(perm, count):
    return perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(count))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_search_reaches_a_single_swap_optimum(n, m):
    g = torch.Generator().manual_seed(m + n)
    scores = torch.randn(9, 4 * m, generator=g, dtype=torch.float64).abs()
    perm = permute.nm_permutation(scores, n, m)
    assert is_permutation(perm, 4 * m)
    kept = permute.kept_score(scores, perm, n, m)
    assert kept > permute.kept_score(scores, torch.arange(4 * m), n, m)
    for a, b in itertools.combinations(range(4 * m), 2):  # no swap of two groups' channels gains more
        if a // m != b // m:
            swapped = perm.clone()
            swapped[[a, b]] = perm[[b, a]]
            assert permute.kept_score(scores, swapped, n, m) <= kept + 1e-9


def test_native_and_reference_gains_give_one_permutation_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 4, (30, 64), generator=g).float(), torch.randint(0, 3, (7, 64), generator=g).half()]
    perm = permute.nm_permutation(scores, 2, 4)
    assert torch.equal(perm, permute.nm_permutation(scores, 2, 4, gains=reference.nm_swap_gains))
    assert permute.kept_score(scores, perm) > permute.kept_score(scores, torch.arange(64))
    assert torch.equal(permute.nm_permutation(scores, 2, 4, max_rounds=0), torch.arange(64))


def test_search_keeps_every_infinite_score():
    inf = float("inf")
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 12, generator=g)
    scores[0, :4] = torch.tensor([inf, inf, inf, -inf])  # three kept infs cannot share a 2:4 group
    perm = permute.nm_permutation(scores, 2, 4)
    assert bool((scores[0, perm].view(3, 4) == inf).sum(1).le(2).all())


def test_search_on_sampled_rows():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(40, 32, generator=g) * torch.rand(32, generator=g)
    full = permute.nm_permutation(scores)
    assert torch.equal(permute.nm_permutation(scores, max_rows=40), full)
    sampled = permute.nm_permutation(scores, max_rows=10)  # the search sees rows 0, 4, 9, ..., 39
    assert torch.equal(sampled, permute.nm_permutation(scores[torch.linspace(0, 39, 10).round().long()]))
    assert permute.kept_score(scores, sampled) > permute.kept_score(scores, torch.arange(32))


@pytest.mark.parametrize(
    "scores,error,match",
    [
        (torch.ones(4, 6), ValueError, r"scores\[0\] must be \[rows, C\] .* multiple of m=4"),
        ([torch.ones(4, 8), torch.ones(4, 12)], ValueError, r"scores\[1\] must be \[rows, C\] with one C"),
        (torch.ones(4, 8, dtype=torch.int32), TypeError, r"scores\[0\] must be a floating-point Tensor"),
        (torch.tensor([[1.0, float("nan"), 0, 0]]), ValueError, r"scores\[0\] contains NaN"),
        ([], ValueError, "at least one"),
    ],
)
def test_search_bad_input(scores, error, match):
    with pytest.raises(error, match=match):
        permute.nm_permutation(scores, 2, 4)


def tiny_decoder(arch, tied=False):
    if arch == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        )  # fmt: skip
    else:
        config = tiny_config(arch)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0: a wrong permutation shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False),
                                       ("qwen3", True)])  # fmt: skip
def test_permuted_model_has_the_same_logits(arch, tied):
    model = tiny_decoder(arch, tied)
    dense = logits(model, IDS)
    found = permute.permute_for_nm_(model)
    assert found.hidden is not None and not torch.equal(found.hidden, torch.arange(32))
    assert any(not torch.equal(p, torch.arange(64)) for p in found.mlp.values())
    assert any(not torch.equal(p, torch.arange(8).expand(2, 8)) for p in found.values.values())
    for part, (before, after) in found.kept.items():
        assert after > before, part
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight or not tied
    torch.testing.assert_close(logits(model, IDS), dense, rtol=1e-5, atol=1e-5)


def test_opt_permutes_mlp_and_values_and_refuses_the_hidden_dimension():
    model = tiny_causal_lm("opt")
    before, dense = copy.deepcopy(model.state_dict()), logits(model, IDS)
    with pytest.raises(ValueError, match="architecture opt: the hidden-dimension permutation does not follow"):
        permute.permute_for_nm_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    found = permute.permute_for_nm_(model, parts=("mlp", "values"))
    assert found.hidden is None and len(found.mlp) == 2
    torch.testing.assert_close(logits(model, IDS), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch,kwargs,match",
    [
        ("gpt_neox", {}, "architecture gpt_neox: the hidden-dimension permutation does not follow its residual"),
        ("gpt_neox", {"parts": ("values",)}, "architecture gpt_neox: value channels of a packed qkv Linear"),
        ("mixtral", {"parts": ("mlp",)}, "architecture mixtral: its attention is not known"),
        ("llama", {"m": 3, "n": 1}, "permutation hidden: the hidden size 32 is not a multiple of m=3"),
        ("llama", {"m": 16, "parts": ("values",)}, "permutation values: the head_dim 8 is not a multiple of m=16"),
        ("llama", {"parts": ("heads",)}, "parts must be among hidden, mlp, values"),
    ],
)
def test_refusals_leave_the_model_untouched(arch, kwargs, match):
    model = tiny_mixtral() if arch == "mixtral" else tiny_causal_lm(arch)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        permute.permute_for_nm_(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_parameter_on_the_residual_stream_is_refused():
    model = tiny_decoder("llama")
    model.model.layers[0].register_parameter("scale", torch.nn.Parameter(torch.ones(32)))
    with pytest.raises(ValueError, match=r"parameter model.layers.0.scale has a dimension of the hidden size 32"):
        permute.permute_for_nm_(model)


def kept_magnitude(model):
    """Σ |W| of the block Linears' weights: what magnitude 2:4 keeps, after pruning."""
    return sum(
        float(lin.weight.detach().abs().sum()) for b in model.model.layers for lin in llm.block_linears(b).values()
    )


def test_pruned_permuted_model_is_2_4_in_stored_order_and_saves(tmp_path):
    model, plain = tiny_decoder("llama", tied=True), tiny_decoder("llama", tied=True)
    permute.permute_for_nm_(model)
    llm.prune(model, method="magnitude", sparsity="2:4", progress=False)
    llm.prune(plain, method="magnitude", sparsity="2:4", progress=False)
    assert kept_magnitude(model) > kept_magnitude(plain)  # the permutation kept more of |W|
    for b in model.model.layers:
        for name, lin in llm.block_linears(b).items():
            assert bool((lin.weight != 0).view(lin.out_features, -1, 4).sum(-1).le(2).all()), name
    path = llm.save_pretrained(model, None, tmp_path / "permuted")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=0)
    for name, w in loaded.state_dict().items():
        assert torch.equal(w, model.state_dict()[name]), name


# ---- the "permute" refinement of the block pipeline --------------------------------------------------


class RestoreDense(Refinement):
    """After masking, writes the dense weights back: the run's model is then the permuted dense model."""

    name, stage, keeps_dense = "restore_dense", "masked", True

    def refine_(self, step):
        with torch.no_grad():
            for n, lin in step.block.linears.items():
                lin.weight.copy_(step.dense[n])
        return Gain("nothing", 0.0, 0.0)


class FailAtBlock(Refinement):
    name, stage = "fail", "dense"

    def refine_(self, step):
        if step.block.index == 1:
            raise RuntimeError("failed on purpose")
        return Gain("nothing", 0.0, 0.0)


@pytest.mark.parametrize("arch,method", [("qwen2", "wanda"), ("qwen2", "sparsegpt"), ("qwen2", "magnitude"),
                                         ("gpt_neox", "wanda")])  # fmt: skip
def test_refinement_keeps_the_function_of_the_model(arch, method):
    """GPT-NeoX (packed qkv, hidden stream not followed): its MLP channels only."""
    model = tiny_decoder(arch, tied=arch == "qwen2")
    dense = logits(model, IDS)
    result = run(model, method, "2:4", refine=("permute", RestoreDense()))
    (gain,) = result.refinements["permute"]
    assert gain.metric == "N:M-kept score" and gain.after > gain.before and gain.higher_is_better
    torch.testing.assert_close(logits(model, IDS), dense, rtol=1e-5, atol=1e-5)


def test_refinement_prunes_2_4_in_stored_order_and_keeps_more():
    model, plain = tiny_decoder("llama"), tiny_decoder("llama")
    run(model, "magnitude", "2:4", refine="permute")
    by_hand = tiny_decoder("llama")
    permute.permute_for_nm_(by_hand)  # magnitude's scores need no data: the same permutations
    run(by_hand, "magnitude", "2:4")
    run(plain, "magnitude", "2:4")
    for (name, w), w_hand in zip(model.state_dict().items(), by_hand.state_dict().values()):
        assert torch.equal(w, w_hand), name
    for _, w in block_weights(model).items():
        assert bool((w != 0).view(w.shape[0], -1, 4).sum(-1).eq(2).all())
    assert kept_magnitude(model) > kept_magnitude(plain)


def test_failed_run_gives_the_model_back_unpermuted():
    model = tiny_decoder("llama", tied=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run(model, "wanda", "2:4", refine=("permute", FailAtBlock()))
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "arch,sparsity,options,match",
    [
        ("llama", 0.5, {}, "refinement permute: needs an N:M sparsity such as 2:4, got 50%"),
        ("mixtral", "2:4", {}, "architecture mixtral: its attention is not known"),
    ],
)
def test_refinement_refusals_leave_the_model_untouched(arch, sparsity, options, match):
    model = tiny_mixtral() if arch == "mixtral" else tiny_causal_lm(arch)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        run(model, "wanda", sparsity, refine="permute", **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
