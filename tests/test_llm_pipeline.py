"""The block-sequential pipeline on tiny random Llama, Mistral, Qwen2 (GQA), GPT-NeoX and OPT models:
exact sparsity per Linear, valid 2:4 groups, the rest of the model untouched, sequential and dense
propagation equal to a hand-written reference, OWL, block-local criteria, and clear errors with the
model left unchanged."""

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.llm import local, sparsegpt
from tests.test_llm_models import ARCHS, VOCAB, tiny_causal_lm

N_SAMPLES, SEQ_LEN, BATCH = 4, 12, 2


def calibration(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N_SAMPLES * SEQ_LEN,), generator=torch.Generator().manual_seed(seed))


def run(model, method="wanda", sparsity=0.5, **options):
    options = {"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "batch_size": BATCH, "progress": False, **options}
    return llm.prune(model, calibration(), method=method, sparsity=sparsity, **options)


def block_weights(model) -> dict[str, torch.Tensor]:
    prefix, blocks = llm.find_blocks(model)
    return {
        f"{prefix}.{i}.{n}.weight": lin.weight
        for i, block in enumerate(blocks)
        for n, lin in llm.block_linears(block).items()
    }


def assert_rest_unchanged(before, model):
    pruned = set(block_weights(model))
    after = model.state_dict()
    for name, value in before.items():
        if name not in pruned:
            assert torch.equal(after[name], value), name


def expected_zeros(weight, fraction, granularity):
    rows, cols = weight.shape
    return rows * round(fraction * cols) if granularity == "row" else round(fraction * weight.numel())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,granularity", [("magnitude", "layer"), ("wanda", "row"), ("sparsegpt", "layer")])
def test_exact_sparsity_in_every_linear(arch, method, granularity):
    model = tiny_causal_lm(arch)
    before = copy.deepcopy(model.state_dict())
    result = run(model, method, 0.3)
    weights = block_weights(model)
    assert set(result.layer_sparsity) == set(weights)
    assert result.granularity == granularity
    for name, w in weights.items():
        zeros = int((w == 0).sum())
        assert zeros == expected_zeros(w, 0.3, granularity), name
        if granularity == "row":
            assert bool(((w == 0).sum(1) == round(0.3 * w.shape[1])).all()), name
        assert result.layer_sparsity[name] == zeros / w.numel()
    assert_rest_unchanged(before, model)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_2_4_groups_are_valid(arch, method):
    model = tiny_causal_lm(arch)
    before = copy.deepcopy(model.state_dict())
    result = run(model, method, "2:4")
    assert result.sparsity == "2:4" and result.granularity is None
    for name, w in block_weights(model).items():
        nonzero = (w != 0).view(w.shape[0], -1, 4).sum(-1)
        assert bool((nonzero == 2).all()), name
    assert_rest_unchanged(before, model)


@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_granularity_can_be_chosen(granularity):
    model = tiny_causal_lm("qwen2")
    result = run(model, "sparsegpt", 0.6, granularity=granularity)
    assert result.granularity == granularity
    for name, w in block_weights(model).items():
        assert int((w == 0).sum()) == expected_zeros(w, 0.6, granularity), name


# --- the hand-written reference: one full-model forward per block, hooks on that block's Linears ---


def input_stats(model, linears, ids):
    """{name: (n, Σx², XᵀX)} of each Linear's inputs over calibration batches run through the model."""
    stats = {n: [0, 0.0, 0.0] for n in linears}

    def hook(name):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            stats[name][0] += x.shape[0]
            stats[name][1] = stats[name][1] + x.pow(2).sum(0)
            stats[name][2] = stats[name][2] + x.T @ x

        return record

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
    with torch.no_grad():
        for batch in ids.split(BATCH):
            model(batch, use_cache=False)
    for h in handles:
        h.remove()
    return stats


def prune_by_hand(linears, stats, method, fraction):
    with torch.no_grad():
        for name, lin in linears.items():
            n, sumsq, xtx = stats[name]
            w = lin.weight
            if method == "wanda":
                score = w.abs() * sumsq.sqrt().float()
                pruned = torch.argsort(score, dim=1, stable=True)[:, : round(fraction * w.shape[1])]
                w.scatter_(1, pruned, 0.0)
            else:
                factor = sparsegpt.inverse_factor((2.0 * xtx / n).float())
                sparsegpt.prune_(w, factor, llm.parse_sparsity(fraction))


def reference(model, method, fraction, propagate):
    _, blocks = llm.find_blocks(model)
    ids = calibration().view(N_SAMPLES, SEQ_LEN)
    every = [llm.block_linears(b) for b in blocks]
    if propagate == "dense":
        dense = [input_stats(model, linears, ids) for linears in every]
    for i, linears in enumerate(every):
        stats = dense[i] if propagate == "dense" else input_stats(model, linears, ids)
        prune_by_hand(linears, stats, method, fraction)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("propagate", ["pruned", "dense"])
def test_propagation_equals_a_hand_written_two_block_reference(arch, method, propagate):
    model, expected = tiny_causal_lm(arch), tiny_causal_lm(arch)
    run(model, method, 0.5, propagate=propagate)
    reference(expected, method, 0.5, propagate)
    got, want = block_weights(model), block_weights(expected)
    for name in want:
        assert torch.equal(got[name] == 0, want[name] == 0), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_sequential_and_dense_propagation_differ_after_the_first_block():
    seq, dense = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    run(seq, "sparsegpt", 0.5)
    run(dense, "sparsegpt", 0.5, propagate="dense")
    a, b = block_weights(seq), block_weights(dense)
    first = [n for n in a if ".0." in n]
    assert all(torch.equal(a[n], b[n]) for n in first)
    assert not all(torch.equal(a[n], b[n]) for n in a if n not in first)


# --- OWL ---


def test_owl_block_sparsities_formula():
    ratios, sizes = [0.1, 0.3, 0.2], [10, 10, 10]
    out = llm.owl.block_sparsities(ratios, sizes, 0.5, 0.08)
    torch.testing.assert_close(torch.tensor(out), torch.tensor([0.58, 0.42, 0.5]), rtol=0, atol=1e-12)
    weighted = llm.owl.block_sparsities(ratios, [1, 2, 1], 0.5, 0.1)
    assert abs(sum(s * p for s, p in zip(weighted, [1, 2, 1])) / 4 - 0.5) < 1e-12
    assert llm.owl.block_sparsities([0.2, 0.2], [3, 5], 0.4, 0.1) == [0.4, 0.4]
    with pytest.raises(ValueError, match="smaller lam"):
        llm.owl.block_sparsities(ratios, sizes, 0.95, 0.1)
    assert llm.owl.outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0]), torch.tensor([0.0, 0.0])], M=2.0) == 1 / 6
    with pytest.raises(ValueError, match="lam"):
        llm.OWL(lam=0.7)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_gives_exact_non_uniform_sparsity_with_the_target_mean(method):
    model = tiny_causal_lm("llama")
    result = run(model, method, 0.5, owl=llm.OWL(M=3.0, lam=0.1))
    assert result.outlier_ratio is not None and len(result.block_sparsity) == 2
    assert result.block_sparsity[0] != result.block_sparsity[1]
    assert abs(sum(result.block_sparsity) / 2 - 0.5) < 1e-12
    assert {round(abs(s - 0.5), 12) for s in result.block_sparsity} == {0.1}
    prefix, _ = llm.find_blocks(model)
    for name, w in block_weights(model).items():
        block = int(name[len(prefix) + 1 :].split(".")[0])
        assert int((w == 0).sum()) == expected_zeros(w, result.block_sparsity[block], result.granularity), name


# --- block-local criteria ---


@pytest.mark.parametrize("criterion", ["snip", "refer", "afr", "feature_l1"])
@pytest.mark.parametrize("sparsity", [0.4, "2:4"])
def test_block_local_criteria_prune_exactly(criterion, sparsity):
    model = tiny_causal_lm("mistral")
    before = copy.deepcopy(model.state_dict())
    run(model, criterion, sparsity)
    for name, w in block_weights(model).items():
        if sparsity == "2:4":
            assert bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert int((w == 0).sum()) == round(0.4 * w.numel()), name
    assert_rest_unchanged(before, model)


def block_inputs(model):
    _, blocks = llm.find_blocks(model)
    ids = calibration().view(N_SAMPLES, SEQ_LEN)
    return blocks[0], llm.capture_inputs(model, blocks[0], ids.split(BATCH), torch.device("cpu"))


def autograd_scores(block, inputs, objective, weights=None):
    """|∂objective/∂W ⊙ W| by plain autograd, W (or the given effective weights) in place of the weights."""
    linears = llm.block_linears(block)
    originals = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    grads = {n: torch.zeros_like(w) for n, w in originals.items()}
    outputs = {}
    handles = [
        lin.register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out)) for n, lin in linears.items()
    ]
    for j in range(len(inputs)):
        outputs.clear()
        with torch.enable_grad():
            for n, lin in linears.items():
                lin.weight = torch.nn.Parameter((weights or originals)[n].clone())
            y = inputs.run(block, j)
            value = objective(j, y, outputs)
            for n, g in zip(linears, torch.autograd.grad(value, [lin.weight for lin in linears.values()])):
                grads[n] += g
    for h in handles:
        h.remove()
    for n, lin in linears.items():
        lin.weight = torch.nn.Parameter(originals[n])
    return {n: (grads[n] * originals[n]).abs() for n in linears}


def test_block_local_feature_l1_and_refer_formulas():
    block, inputs = block_inputs(tiny_causal_lm("llama"))
    linears = llm.block_linears(block)
    l1 = autograd_scores(block, inputs, lambda _j, _y, f: sum(v.abs().sum() for v in f.values()))
    got = local.block_scores("feature_l1", block, inputs, linears, None, None)
    for n in linears:
        torch.testing.assert_close(got[n], l1[n], rtol=1e-4, atol=1e-6)

    def mean_singular_values(_j, _y, f):
        return sum(torch.linalg.svdvals(v.reshape(-1, v.shape[-1]).double()).mean() for v in f.values())

    refer = autograd_scores(block, inputs, mean_singular_values)
    got = local.block_scores("refer", block, inputs, linears, None, None)
    for n in linears:
        torch.testing.assert_close(got[n], refer[n].float(), rtol=1e-3, atol=1e-5)


def test_block_local_snip_is_the_reconstruction_sensitivity_at_the_candidate():
    block, inputs = block_inputs(tiny_causal_lm("llama"))
    linears = llm.block_linears(block)
    with torch.no_grad():
        targets = [inputs.run(block, j) for j in range(len(inputs))]

    def candidate(_name, w):
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[torch.argsort(w.detach().abs().flatten(), stable=True)[: w.numel() // 2]] = False
        return keep.view_as(w)

    masked = {n: lin.weight.detach() * candidate(n, lin.weight) for n, lin in linears.items()}
    expected = autograd_scores(block, inputs, lambda j, y, _f: (y - targets[j]).pow(2).sum(), masked)
    got = local.block_scores("snip", block, inputs, linears, targets, candidate)
    for n in linears:
        assert expected[n].abs().sum() > 0
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)
    afr = local.block_scores("afr", block, inputs, linears, targets, candidate)
    flat = torch.cat([s.flatten() for s in afr.values()])
    assert abs(float(flat.mean())) < 1e-4 and abs(float(flat.std(unbiased=False)) - 2**0.5) < 0.5


# --- the result object ---


def test_result_reports_memory_times_and_layers():
    model = tiny_causal_lm("llama")
    result = run(model, "sparsegpt", 0.5)
    assert len(result.block_seconds) == 2 and result.seconds >= sum(result.block_seconds) > 0
    m = result.memory
    block_bytes = sum(p.numel() * 4 for p in llm.find_blocks(model)[1][0].parameters())
    assert m.block == block_bytes
    assert m.activations == N_SAMPLES * SEQ_LEN * 32 * 4
    assert m.statistics == 4 * (3 * 32 + 32**2 * 3 + 64 + 64**2)  # q/k/v share, gate/up share, o, down
    assert m.workspace > 0 and m.total == m.block + m.activations + m.statistics + m.forward + m.workspace
    assert result.overall_sparsity == 0.5 and result.num_samples == N_SAMPLES and result.seq_len == SEQ_LEN
    text = result.summary()
    assert "sparsegpt 50%" in text and "peak memory" in text and "14 Linear layers in 2 blocks" in text
    magnitude = llm.prune(tiny_causal_lm("llama"), method="magnitude", sparsity=0.5, progress=False)
    assert magnitude.num_samples == 0 and magnitude.memory.activations == 0


def block_errors_by_hand(pruned, dense):
    """‖f_pruned(X_i) − f_dense(X_i)‖ / ‖f_dense(X_i)‖ of each block i over the calibration batches, X_i
    the inputs the pruned model gives block i (hooks on the pruned model, the dense block rerun)."""
    _, blocks = llm.find_blocks(pruned)
    _, dense_blocks = llm.find_blocks(dense)
    sums = [[0.0, 0.0] for _ in blocks]

    def hook(i):
        def compare(_module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            want = dense_blocks[i](*args, **kwargs)
            want = want[0] if isinstance(want, tuple) else want
            sums[i][0] += float((y.double() - want.double()).pow(2).sum())
            sums[i][1] += float(want.double().pow(2).sum())

        return compare

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for batch in calibration().view(N_SAMPLES, SEQ_LEN).split(BATCH):
            pruned(batch, use_cache=False)
    for h in handles:
        h.remove()
    return [(d / n) ** 0.5 for d, n in sums]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "snip"])
def test_block_error_is_the_relative_output_error_of_each_pruned_block(method):
    model, dense = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    assert run(tiny_causal_lm("llama"), method, 0.5).block_error == []  # measured only when asked
    result = run(model, method, 0.5, block_errors=True)
    want = block_errors_by_hand(model, dense)
    assert len(result.block_error) == 2 and all(e > 0 for e in result.block_error)
    assert result.block_error == pytest.approx(want, rel=1e-4)
    assert run(tiny_causal_lm("llama"), method, 0.5, propagate="dense").block_error == []
    assert run(tiny_causal_lm("llama"), "magnitude", 0.5).block_error == []


# --- bad input: clear errors, the model unchanged ---


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sparsity": 1.5}, ValueError, r"sparsity must be in \[0, 1\]"),
        ({"sparsity": -0.1}, ValueError, r"sparsity must be in \[0, 1\]"),
        ({"sparsity": "3:2"}, ValueError, "0 < n <= m"),
        ({"sparsity": "half"}, ValueError, "N:M pattern"),
        ({"sparsity": "2:3", "method": "wanda"}, ValueError, "not divisible by m=3"),
        ({"method": "obs"}, ValueError, "unknown method 'obs'; valid methods: magnitude, wanda, sparsegpt"),
        ({"num_samples": 5}, ValueError, "fewer than num_samples × seq_len"),
        ({"seq_len": 100}, ValueError, "fewer than num_samples × seq_len"),
        ({"sparsity": "2:4", "owl": llm.OWL()}, ValueError, "does not apply to the 2:4"),
        ({"granularity": "column"}, ValueError, "granularity must be one of"),
        ({"propagate": "both"}, ValueError, "propagate must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        ({"percdamp": -1.0}, ValueError, "percdamp"),
        ({"sparsity": "2:4", "blocksize": 6}, ValueError, "multiple of m=4"),
        ({"owl": 5}, TypeError, "llm.OWL"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, match):
    model = tiny_causal_lm("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        run(model, **{"method": "sparsegpt", **kwargs})
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_missing_calibration_and_missing_blocks():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="needs calibration token ids"):
        llm.prune(model, method="wanda")
    with pytest.raises(ValueError, match="with OWL needs calibration"):
        llm.prune(model, method="magnitude", owl=llm.OWL())
    flat = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    before = copy.deepcopy(flat.state_dict())
    with pytest.raises(ValueError, match="found no decoder blocks"):
        llm.prune(flat, torch.zeros(100, dtype=torch.long), method="wanda", num_samples=1, seq_len=8)
    assert all(torch.equal(flat.state_dict()[k], v) for k, v in before.items())


def test_training_flags_are_restored():
    model = tiny_causal_lm("opt").train()
    run(model, "snip", 0.5)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("method,sparsity", [("wanda", 0.5), ("sparsegpt", "2:4"), ("snip", 0.5)])
def test_blocks_computed_on_cuda_match_cpu(method, sparsity):
    """The model stays on the CPU; each block is moved to the GPU, pruned there and moved back."""
    on_cpu, on_gpu = tiny_causal_lm("qwen2"), tiny_causal_lm("qwen2")
    run(on_cpu, method, sparsity, device="cpu")
    result = run(on_gpu, method, sparsity, device="cuda")
    assert result.device.startswith("cuda") and result.peak_device_bytes > 0
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    cpu, gpu = block_weights(on_cpu), block_weights(on_gpu)
    for name in cpu:
        assert int((gpu[name] == 0).sum()) == int((cpu[name] == 0).sum()), name
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bfloat16_models_are_pruned_exactly_in_their_dtype(method):
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    run(model, method, 0.3)
    for name, w in block_weights(model).items():
        assert w.dtype == torch.bfloat16
        assert int((w == 0).sum()) == expected_zeros(w, 0.3, "row" if method == "wanda" else "layer"), name
