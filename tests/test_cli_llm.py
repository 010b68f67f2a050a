"""`pyprune-fast prune` on a causal LM (hf:PATH of a tiny random Llama saved here): every method at 50 %
and 2:4 from the same dense weights, perplexities in the report, from_pretrained directories."""

import json
import os

import pytest
import torch

import pyprune_fast
from pyprune_fast import llm
from pyprune_fast.app import cli, zoo

transformers = pytest.importorskip("transformers")
from tests.test_llm_models import tiny_causal_lm, tiny_tokenizer  # noqa: E402

OPTIONS = ["--samples", "2", "--seq-len", "32", "--eval-tokens", "512", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    llm.save_pretrained(tiny_causal_lm("llama"), tiny_tokenizer(), path)
    return str(path)


def linear_weights(model) -> dict[str, torch.Tensor]:
    prefix, blocks = llm.find_blocks(model)
    return {
        f"{prefix}.{i}.{n}.weight": lin.weight.detach()
        for i, block in enumerate(blocks)
        for n, lin in llm.block_linears(block).items()
    }


def test_a_causal_lm_directory_is_detected(model_dir, tmp_path):
    assert zoo.is_llm_spec(f"hf:{model_dir}") and zoo.is_llm_spec("smollm2")
    assert not zoo.is_llm_spec(f"hf:{tmp_path}") and not zoo.is_llm_spec(None)


def test_prune_every_method_at_50_and_2_4_with_saved_models(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = cli.main(["prune", "--model", f"hf:{model_dir}", "--out", out, "--save-model", *OPTIONS])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "peak memory per block" in printed
    with open(os.path.join(out, "report.json")) as f:
        doc = json.load(f)
    names = [r["criterion"] for r in doc["results"]]
    assert names == ["magnitude", "magnitude 2:4", "wanda", "wanda 2:4", "sparsegpt", "sparsegpt 2:4"]
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    evaluation = llm.pydoc_tokens(tiny_tokenizer(), "evaluation")[:512]
    dense_ppl = llm.perplexity(dense_model, evaluation, seq_len=32, progress=False)
    assert doc["dense"]["perplexity"] == pytest.approx(dense_ppl, rel=1e-6)
    for result in doc["results"]:
        method, _, pattern = result["criterion"].partition(" ")
        tag = f"{method}-{'2of4' if pattern else '0.5'}"
        assert result["files"] == {"masks": f"masks-{tag}.safetensors", "model": tag}
        pruned = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, tag))
        weights = linear_weights(pruned)
        for name, w in weights.items():
            assert int((w == 0).sum()) == w.numel() // 2, name
            if pattern:
                assert bool(((w != 0).reshape(-1, 4).sum(1) == 2).all()), name
        masks = pyprune_fast.load_masks(os.path.join(out, result["files"]["masks"]))
        assert all(torch.equal(masks[n], w != 0) for n, w in weights.items())
        # the saved model is the one evaluated: its perplexity is the report's
        ppl = llm.perplexity(pruned, evaluation, seq_len=32, progress=False)
        assert result["metrics"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert pruned.lm_head.weight.count_nonzero() == pruned.lm_head.weight.numel()
    ranking = [r["criterion"] for r in doc["ranking"]]
    means = {r["criterion"]: r["mean_perplexity"] for r in doc["ranking"]}
    assert [means[n] for n in ranking] == sorted(means.values())  # lower perplexity ranks first


def test_save_model_into_a_given_directory_and_one_target(model_dir, tmp_path):
    out, models = str(tmp_path / "out"), str(tmp_path / "models")
    rc = cli.main(
        ["prune", "--model", f"hf:{model_dir}", "--out", out, "--criterion", "wanda", "--granularity", "2:4"]
        + ["--save-model", models, *OPTIONS]
    )
    assert rc == 0
    assert os.listdir(models) == ["wanda-2of4"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(models, "wanda-2of4")))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--granularity", "global"], "--granularity global does not apply to LLMs"),
        (["--criterion", "taylor"], "criteria ['taylor'] do not apply to LLMs"),
        (["--granularity", "2:4", "--sparsity", "0.3"], "--sparsity does not apply to --granularity 2:4"),
        (["--samples", "10000"], "calibration has"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1]"),
    ],
)
def test_bad_llm_options_are_one_clear_line(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert cli.main(["prune", "--model", f"hf:{model_dir}", "--out", str(out), *OPTIONS, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
