"""`pyprune-fast prune --refine` on a causal LM (hf:PATH of a tiny random Llama saved here): refined
models saved as from_pretrained directories with exact patterns, each refinement's gain in the report,
and usage errors (exit 2) before anything runs."""

import json
import os
import re

import pytest

from pyprune_fast import llm
from pyprune_fast.app import cli

transformers = pytest.importorskip("transformers")
from tests.test_llm_models import linear_weights, save_tiny_llama, tiny_tokenizer  # noqa: E402

OPTIONS = ["--samples", "2", "--seq-len", "32", "--eval-tokens", "512", "--quiet"]


def exit_status(argv):
    """The command's exit status: argparse's refusals exit, the options' UsageErrors return 2."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llm"))


@pytest.mark.parametrize("reconstruct", ["reconstruct", "sequential"])
def test_refined_models_are_saved_and_each_gain_is_reported(model_dir, tmp_path, capsys, reconstruct):
    out = str(tmp_path / "out")
    argv = ["prune", "--model", f"hf:{model_dir}", "--out", out, "--criterion", "wanda", "sparsegpt"]
    rc = cli.main([*argv, "--granularity", "2:4", "--refine", reconstruct, "swap", "--save-model", *OPTIONS])
    assert rc == 0, capsys.readouterr().err
    with open(os.path.join(out, "report.json")) as f:
        doc = json.load(f)
    assert [r["criterion"] for r in doc["results"]] == ["wanda 2:4", "sparsegpt 2:4"]
    evaluation = llm.pydoc_tokens(tiny_tokenizer(), "evaluation")[:512]
    for result in doc["results"]:
        for refinement, metric in (("swap", "layer error"), (reconstruct, "layer error")):
            note = doc["model"][f"{result['criterion']}: refine {refinement}"]
            assert note.startswith(metric) and "→" in note
        pruned = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, result["files"]["model"]))
        for name, w in linear_weights(pruned).items():
            assert bool(((w != 0).reshape(-1, 4).sum(1) <= 2).all()), name
        ppl = llm.perplexity(pruned, evaluation, seq_len=32, progress=False)
        assert result["metrics"]["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_refining_lowers_the_block_errors_of_wanda_at_2_4(model_dir, tmp_path, capsys):
    errors = {}
    for refine in ([], ["swap", "reconstruct"]):
        out = str(tmp_path / f"out{len(refine)}")
        argv = ["prune", "--model", f"hf:{model_dir}", "--out", out, "--criterion", "wanda", "--granularity", "2:4"]
        assert cli.main([*argv, *(["--refine", *refine] if refine else []), *OPTIONS]) == 0, capsys.readouterr().err
        with open(os.path.join(out, "report.json")) as f:
            errors[len(refine)] = json.load(f)["results"][0]["block_error"]
    assert errors[2][0] < errors[0][0] and sum(errors[2]) < sum(errors[0])
    with open(os.path.join(tmp_path / "out2", "report.md")) as f:
        assert "wanda 2:4: refine swap: layer error" in f.read()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--refine", "nonesuch"], "invalid choice: 'nonesuch'"),
        (["--refine", "swap", "swap"], "names each refinement once"),
        (["--refine", "swap", "--granularity", "global"], "block-sequential run"),
        (["--refine", "swap", "--schedule", "iterative", "--sparsity", "0.5"], "may revive weights"),
    ],
)
def test_bad_refine_options_exit_2_before_anything_runs(model_dir, tmp_path, capsys, extra, match):
    out = str(tmp_path / "out")
    assert exit_status(["prune", "--model", f"hf:{model_dir}", "--out", out, *extra, *OPTIONS]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(out)


def test_refine_is_refused_for_channel_granularities_and_other_criteria(tmp_path, capsys):
    argv = ["prune", "--out", str(tmp_path / "o"), "--refine", "swap", "--quiet"]
    assert exit_status([*argv, "--granularity", "channel"]) == 2
    assert "not the channel granularities" in capsys.readouterr().err
    assert exit_status([*argv, "--criterion", "obd", "--granularity", "2:4"]) == 2
    assert "obd is not one" in capsys.readouterr().err


def test_the_encoder_is_refined_block_by_block_with_each_gain_reported(tmp_path, capsys):
    out = str(tmp_path / "enc")
    argv = ["prune", "--criterion", "wanda", "sparsegpt", "--granularity", "2:4", "--batches", "2", "--out", out]
    assert cli.main([*argv, "--refine", "swap", "reconstruct", "--quiet"]) == 0, capsys.readouterr().err
    with open(os.path.join(out, "report.json")) as f:
        doc = json.load(f)
    assert [r["criterion"] for r in doc["results"]] == ["wanda", "sparsegpt"]
    for name in ("wanda", "sparsegpt"):
        for refinement in ("swap", "reconstruct"):
            assert doc["model"][f"{name} 2:4: refine {refinement}"].startswith("layer error")
    for result in doc["results"]:
        assert result["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_the_encoder_takes_the_sequential_refit_and_its_layer_error_falls(tmp_path, capsys):
    out = str(tmp_path / "enc")
    argv = ["prune", "--criterion", "wanda", "--granularity", "2:4", "--batches", "2", "--out", out, "--quiet"]
    assert cli.main([*argv, "--refine", "sequential"]) == 0, capsys.readouterr().err
    with open(os.path.join(out, "report.json")) as f:
        doc = json.load(f)
    gain = re.match(r"layer error (\S+) → (\S+) \(mean of (\d+) blocks\)", doc["model"]["wanda 2:4: refine sequential"])
    assert gain is not None, doc["model"]
    before, after, blocks = float(gain[1]), float(gain[2]), int(gain[3])
    assert blocks == 6 and after < before
    assert doc["results"][0]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
