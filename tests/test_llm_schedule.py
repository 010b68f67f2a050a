"""`pyprune-fast prune` on a causal LM with --finetune (the pruned model trained with its masks kept,
perplexity before and after) and --schedule iterative (rounds of the block pipeline at growing
sparsity, nested masks, exact final counts), on a tiny random Llama saved here."""

import functools
import json
import os

import pytest
import torch

import pyprune_fast
from pyprune_fast import llm
from pyprune_fast.app import cli, llm_runner
from pyprune_fast.app.bundle import text_bundle

transformers = pytest.importorskip("transformers")
from tests.test_llm_models import linear_weights, save_tiny_llama, tiny_causal_lm, tiny_tokenizer  # noqa: E402

OPTIONS = ["--samples", "4", "--seq-len", "32", "--eval-tokens", "256", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llm"))


@functools.cache
def calibration():
    return llm.pydoc_tokens(tiny_tokenizer(), "calibration")


def training_loss(model) -> float:
    """Next-token cross-entropy over the 4 calibration sequences of 32 tokens, written out."""
    ids = calibration()[: 4 * 32].view(4, 32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return float(
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    )


def report(out) -> dict:
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_finetune_lowers_the_loss_keeps_the_zeros_and_saves_the_finetuned_model(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["prune", "--model", f"hf:{model_dir}", "--criterion", "wanda", "--sparsity", "0.5", "--out", out]
    args += ["--finetune", "12", "--finetune-lr", "3e-3", "--batch-size", "2", "--save-model", *OPTIONS]
    assert cli.main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "fine-tuned perp" in printed and "fine-tuned 12 steps" in printed
    doc = report(out)
    assert doc["finetune"]["steps"] == 12 and "calibration sequences" in doc["finetune"]["data"]
    (result,) = doc["results"]
    before, after = result["metrics"]["perplexity"], result["finetuned"]["metrics"]["perplexity"]
    assert after < before  # the random tiny model learns the calibration text's token statistics
    assert result["finetuned"]["last_loss"] < result["finetuned"]["first_loss"]
    with open(os.path.join(out, "report.md")) as f:
        assert "perplexity after fine-tuning" in f.read()

    # the one-shot model: the same pruning without fine-tuning
    one_shot = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    llm.prune(one_shot, calibration(), method="wanda", sparsity=0.5, num_samples=4, seq_len=32, progress=False)
    saved = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "wanda-0.5"))
    masks = pyprune_fast.load_masks(os.path.join(out, result["files"]["masks"]))
    tuned, pruned = linear_weights(saved), linear_weights(one_shot)
    for name, w in tuned.items():
        assert torch.equal(w != 0, pruned[name] != 0), name  # the same masks ...
        assert torch.equal(masks[name], w != 0), name
        assert int((w == 0).sum()) == w.numel() // 2, name  # the pruned weights exactly zero after training
        assert not torch.equal(w, pruned[name]), name  # ... and other kept weights
    assert training_loss(saved) < training_loss(one_shot)
    evaluation = llm.pydoc_tokens(tiny_tokenizer(), "evaluation")[:256]
    assert llm.perplexity(saved, evaluation, seq_len=32, progress=False) == pytest.approx(after, rel=1e-5)
    assert llm.perplexity(one_shot, evaluation, seq_len=32, progress=False) == pytest.approx(before, rel=1e-5)


@pytest.mark.parametrize("method, granularity", [("sparsegpt", "layer"), ("magnitude", "global")])
def test_nested_pruning_keeps_every_earlier_zero_and_exact_counts(method, granularity):
    model = tiny_causal_lm("llama")
    zeros = None
    for sparsity in (0.3, 0.5, 0.7):  # SparseGPT in column blocks of 8: its OBS updates reach earlier zeros
        llm.prune(model, calibration(), method=method, sparsity=sparsity, granularity=granularity, num_samples=4,
                  seq_len=32, blocksize=8, progress=False, nested=zeros is not None)  # fmt: skip
        now = {n: w == 0 for n, w in linear_weights(model).items()}
        if granularity == "global":
            assert sum(int(z.sum()) for z in now.values()) == round(sparsity * sum(z.numel() for z in now.values()))
        else:
            assert all(int(z.sum()) == round(sparsity * z.numel()) for z in now.values())
        if zeros is not None:
            for name, z in now.items():
                assert not bool((zeros[name] & ~z).any()), f"{name}: a weight pruned earlier revived"
        zeros = now


def test_sparsegpt_revives_earlier_zeros_unless_nested():
    model = tiny_causal_lm("llama")
    options = {"method": "sparsegpt", "num_samples": 4, "seq_len": 32, "blocksize": 8, "progress": False}
    llm.prune(model, calibration(), sparsity=0.3, **options)
    zeros = {n: w == 0 for n, w in linear_weights(model).items()}
    llm.prune(model, calibration(), sparsity=0.5, **options)
    revived = sum(int((zeros[n] & (w != 0)).sum()) for n, w in linear_weights(model).items())
    assert revived > 0  # what nested=True prevents: the OBS updates refill earlier-pruned weights


def test_iterative_rounds_follow_the_schedule_to_the_exact_target(model_dir, tmp_path, capsys, monkeypatch):
    calls = []
    prune = llm.prune

    def recorded(model, *args, **kwargs):
        result = prune(model, *args, **kwargs)
        calls.append((kwargs["method"], kwargs["nested"], {n: w == 0 for n, w in linear_weights(model).items()}))
        return result

    monkeypatch.setattr(llm, "prune", recorded)
    out = str(tmp_path / "out")
    args = ["prune", "--model", f"hf:{model_dir}", "--criterion", "wanda", "sparsegpt", "--sparsity", "0.6"]
    args += ["--schedule", "iterative", "--rounds", "3", "--out", out, "--finetune", "2", *OPTIONS]
    assert cli.main(args) == 0, capsys.readouterr().err
    doc = report(out)
    assert doc["schedule"] == "iterative, 3 rounds (exponential)"
    for result in doc["results"]:
        targets = [r["target"] for r in result["rounds"]]
        assert targets == pytest.approx([1 - 0.4 ** (1 / 3), 1 - 0.4 ** (2 / 3), 0.6], abs=1e-12)
        for r in result["rounds"]:
            assert r["achieved"] == pytest.approx(r["target"], abs=1 / 32)  # rows of 32 or 64 weights
        assert result["rounds"][-1]["achieved"] == result["achieved_sparsity"]
        assert "finetuned" in result  # fine-tuned after the last round
    assert [(m, nested) for m, nested, _ in calls] == [(m, r > 0) for m in ("wanda", "sparsegpt") for r in range(3)]
    for method in ("wanda", "sparsegpt"):
        rounds = [z for m, _, z in calls if m == method]
        for earlier, later in zip(rounds, rounds[1:]):
            assert all(not bool((earlier[n] & ~later[n]).any()) for n in later), method
        for name, z in rounds[-1].items():
            if method == "wanda":  # per row, each row exactly round(0.6 × 32 or 64)
                assert bool((z.sum(1) == round(0.6 * z.shape[1])).all()), name
            else:
                assert int(z.sum()) == round(0.6 * z.numel()), name
    with open(os.path.join(out, "report.md")) as f:
        assert "## Rounds" in f.read()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--offload", "disk", "--finetune", "5"], "--finetune trains the whole model"),
        (["--offload", "disk", "--schedule", "iterative"], "--schedule iterative prunes the model in memory"),
        (["--schedule", "iterative", "--granularity", "2:4"], "2:4 is one fixed pattern"),
        (["--finetune", "-1"], "--finetune must be >= 0"),
        (["--schedule", "iterative", "--rounds", "0"], "--rounds must be >= 1"),
        (["--finetune", "2", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_refusals_are_one_clear_line(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert cli.main(["prune", "--model", f"hf:{model_dir}", "--out", str(out), *OPTIONS, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_nested_refuses_n_m_patterns_and_the_runner_refuses_iterative_2_4():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="nested=True grows an unstructured sparsity"):
        llm.prune(model, calibration(), method="wanda", sparsity="2:4", num_samples=4, seq_len=32, nested=True)
    bundle = text_bundle("tiny", model, tiny_tokenizer())
    with pytest.raises(ValueError, match="2:4 is one fixed pattern"):
        llm_runner.prune(bundle, ["wanda"], ["2:4"], samples=4, seq_len=32, schedule="iterative", rounds=2)


def test_torchrun_prunes_rounds_on_every_rank_and_rank_0_finetunes(model_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "pyprune_fast", "prune", "--model", f"hf:{model_dir}", "--criterion", "wanda", "--device", "cpu"]
    command += ["--schedule", "iterative", "--rounds", "2", "--finetune", "2", "--out", str(out), *OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 fine-tunes and reports, the other rank prunes along
    (result,) = report(out)["results"]
    assert [r["target"] for r in result["rounds"]] == pytest.approx([1 - 0.5**0.5, 0.5], abs=1e-12)
    assert result["achieved_sparsity"] == 0.5  # every row of 32 or 64 weights exactly half pruned
    assert len(result["finetuned"]["metrics"]) == 1
