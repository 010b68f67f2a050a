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
from tests.test_llm_models import linear_weights, save_tiny_llama, tiny_tokenizer  # noqa: E402

OPTIONS = ["--samples", "2", "--seq-len", "32", "--eval-tokens", "512", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llm"))


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


def test_the_llm_report_shows_perplexity_time_memory_and_block_errors(model_dir, tmp_path):
    out = str(tmp_path / "out")
    rc = cli.main(["prune", "--model", f"hf:{model_dir}", "--out", out, "--criterion", "magnitude", "wanda", *OPTIONS])
    assert rc == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["block-error.png", "perplexity.png"]
    with open(os.path.join(out, "report.json")) as f:
        doc = json.load(f)
    assert doc["peak_measure"] == "the process's peak resident memory (RSS) so far"
    blocks = len(llm.find_blocks(transformers.AutoModelForCausalLM.from_pretrained(model_dir))[1])
    for result in doc["results"]:
        assert result["peak_bytes"] > 0
        measured = result["criterion"].startswith("wanda")
        assert len(result["block_error"]) == (blocks if measured else 0)
        assert all(e > 0 for e in result["block_error"])
    assert "_peak_bytes" not in doc["model"] and not any(k.startswith("_") for k in doc["model"])
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "targets 50 %, 2:4 (granularity each method's own groups)" in md and "granularity 0.5" not in md
    assert "| method | target | perplexity | × dense | achieved | time to prune | peak memory |" in md
    assert "| wanda | 2:4 |" in md and "| magnitude | 50 % |" in md and "not measured" in md
    assert "![perplexity](perplexity.png)" in md and "![block-error](block-error.png)" in md


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
        (["--granularity", "channel"], "--granularity channel does not apply to LLMs"),
        (["--granularity", "global", "--criterion", "sparsegpt"], "sparsegpt chooses its masks inside its solve"),
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


# --- beyond memory and beyond one process -------------------------------------------------------------


def test_offload_disk_writes_checkpoints_equal_to_in_memory_pruning(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["prune", "--model", f"hf:{model_dir}", "--criterion", "wanda", "sparsegpt", "--sparsity", "0.5", *OPTIONS]
    assert cli.main([*args, "--out", out, "--offload", "disk"]) == 0, capsys.readouterr().err
    assert "peak host memory" in capsys.readouterr().out
    memory = str(tmp_path / "memory")
    assert cli.main([*args, "--out", memory, "--save-model"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        streamed = json.load(f)
    with open(os.path.join(memory, "report.json")) as f:
        loaded = json.load(f)
    assert streamed["dense"]["perplexity"] == loaded["dense"]["perplexity"]  # the streamed forward is the same
    for a, b in zip(streamed["results"], loaded["results"]):
        assert a["metrics"]["perplexity"] == b["metrics"]["perplexity"], a["criterion"]
        got = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, a["criterion"] + "-0.5"))
        want = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(memory, b["criterion"] + "-0.5"))
        assert all(torch.equal(w, linear_weights(want)[n]) for n, w in linear_weights(got).items())
    # a rerun continues with --resume (everything is found finished) and is refused without it
    assert cli.main([*args, "--out", out, "--offload", "disk", "--resume"]) == 0
    assert cli.main([*args, "--out", out, "--offload", "disk"]) == 2
    assert "resume" in capsys.readouterr().err


def test_resume_needs_offload_and_global_granularity_applies(model_dir, tmp_path, capsys):
    base = ["prune", "--model", f"hf:{model_dir}", "--out", str(tmp_path / "o"), *OPTIONS]
    assert cli.main([*base, "--resume"]) == 2
    assert "--offload disk" in capsys.readouterr().err
    assert cli.main([*base, "--criterion", "wanda", "--granularity", "global", "--sparsity", "0.6"]) == 0
    with open(tmp_path / "o" / "report.json") as f:
        result = json.load(f)["results"][0]
    assert result["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len({round(v, 6) for v in result["layer_sparsity"].values()}) > 1  # not the same in every layer


def test_torchrun_over_two_processes_writes_one_result(model_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "pyprune_fast", "prune", "--model", f"hf:{model_dir}", "--criterion", "sparsegpt"]
    command += ["--sparsity", "0.5", "--out", str(out), "--device", "cpu", *OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 reports, the other rank prunes along
    with open(out / "report.json") as f:
        doc = json.load(f)
    assert [r["criterion"] for r in doc["results"]] == ["sparsegpt"]
    assert doc["results"][0]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_a_resume_that_does_not_match_the_earlier_run_is_a_user_error(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["prune", "--model", f"hf:{model_dir}", "--criterion", "wanda", "--sparsity", "0.5", *OPTIONS]
    assert cli.main([*args, "--out", out, "--offload", "disk"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--samples", "3", "--out", out, "--offload", "disk", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot resume" in err


# --- what a run may replace: never its input, never the user's files ----------------------------------


def prune_args(model: str, out, *extra: str) -> list[str]:
    return ["prune", "--model", f"hf:{model}", "--out", str(out), "--criterion", "magnitude", "--sparsity", "0.5",
            *OPTIONS, *extra]  # fmt: skip


def test_a_model_inside_out_is_refused_before_it_is_replaced(model_dir, tmp_path, capsys):
    chain = tmp_path / "chain"
    assert cli.main(prune_args(model_dir, chain, "--save-model")) == 0
    saved = chain / "magnitude-0.5"
    before = sorted(os.listdir(saved))
    assert cli.main(prune_args(saved, chain)) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "lies inside --out" in err and "Traceback" not in err
    assert sorted(os.listdir(saved)) == before
    text = tmp_path / "chain" / "calibration.txt"
    text.write_text("some text " * 200)
    assert cli.main(prune_args(model_dir, chain, "--data", str(text))) == 2
    assert "--data" in capsys.readouterr().err and text.read_text().startswith("some text")


@pytest.mark.parametrize("where", ["model", "model/sub", "."])
def test_a_save_model_that_is_holds_or_lies_in_the_input_is_refused(model_dir, tmp_path, capsys, where):
    model = tmp_path / "m" / "model"
    model.mkdir(parents=True)
    for name in os.listdir(model_dir):
        (model / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    before = {name: (model / name).read_bytes() for name in os.listdir(model)}
    target = os.path.normpath(os.path.join(tmp_path / "m", where))
    out = tmp_path / "deep" / "out"
    assert cli.main(prune_args(model, out, "--save-model", target)) == 2
    err = capsys.readouterr().err
    assert "--save-model" in err and "input model" in err and "Traceback" not in err
    assert {name: (model / name).read_bytes() for name in os.listdir(model)} == before
    assert not (tmp_path / "deep").exists()


def test_save_model_never_replaces_a_directory_we_did_not_write(model_dir, tmp_path, capsys):
    models = tmp_path / "mydir"
    (models / "magnitude-0.5").mkdir(parents=True)
    (models / "magnitude-0.5" / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, out, "--save-model", str(models))) == 2
    err = capsys.readouterr().err
    assert "--save-model" in err and "notes.txt" in err and "Traceback" not in err
    assert os.listdir(models / "magnitude-0.5") == ["notes.txt"] and not out.exists()
    (models / "magnitude-0.5" / "notes.txt").unlink()  # an empty directory holds nothing of the user's
    assert cli.main(prune_args(model_dir, out, "--save-model", str(models))) == 0
    assert "pyprune_model.json" in os.listdir(models / "magnitude-0.5")
    assert cli.main(prune_args(model_dir, out, "--save-model", str(models))) == 0  # ours: replaced


def test_offload_disk_refuses_an_out_holding_the_users_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    assert cli.main(prune_args(model_dir, out, "--offload", "disk")) == 2
    err = capsys.readouterr().err
    assert "holds files that are not the output of an earlier pyprune-fast prune (report.md)" in err
    assert os.listdir(out) == ["report.md"] and (out / "report.md").read_text() == "my own report"


def test_an_option_error_creates_nothing(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "deep" / "x" / "y"
    assert cli.main(prune_args(model_dir, out, "--save-model", str(blocker))) == 2
    err = capsys.readouterr().err
    assert "--save-model" in err and "not a directory" in err
    assert sorted(os.listdir(tmp_path)) == ["file"] and blocker.read_text() == "x"


def test_weights_left_dense_are_named_in_the_output_and_the_report(tmp_path, capsys):
    from tests.test_llm_failures import tiny_mixtral

    directory = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    out = str(tmp_path / "out")
    args = ["prune", "--model", f"hf:{directory}", "--criterion", "wanda", "--sparsity", "0.5", "--out", out]
    assert cli.main([*args, *OPTIONS]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    # the routers; the fused experts are pruned through their Linear views (llm.moe)
    assert "left dense: 2 block weights that are not nn.Linear" in printed and "mlp.gate.weight" in printed
    with open(os.path.join(out, "report.md")) as f:
        assert "left dense" in f.read()


def test_windows_longer_than_the_model_takes_are_a_user_error(model_dir, tmp_path, capsys):
    args = ["prune", "--model", f"hf:{model_dir}", "--criterion", "magnitude", "--sparsity", "0.5"]
    options = ["--samples", "2", "--seq-len", "128", "--eval-tokens", "512", "--quiet"]  # the model takes 64
    assert cli.main([*args, *options, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "max_position_embeddings" in err


def test_offload_disk_with_eval_tokens_0_only_writes_the_pruned_checkpoint(model_dir, tmp_path, capsys, monkeypatch):
    evaluated = []
    monkeypatch.setattr(llm, "perplexity", lambda *a, **k: evaluated.append(a))
    out = tmp_path / "out"
    args = prune_args(model_dir, out, "--offload", "disk")
    args[args.index("--eval-tokens") + 1] = "0"
    assert cli.main(args) == 0, capsys.readouterr().err
    assert evaluated == []
    report = json.loads((out / "report.json").read_text())
    assert report["dense"] == {} and report["results"][0]["metrics"] == {}
    markdown = (out / "report.md").read_text()
    assert "- evaluation: skipped" in markdown and "| magnitude | 50 % | skipped |" in markdown
    assert (out / "magnitude-0.5" / "model.safetensors.index.json").is_file()
    memory = prune_args(model_dir, tmp_path / "memory")
    memory[memory.index("--eval-tokens") + 1] = "0"
    assert cli.main(memory) == 2  # in memory, the evaluation is what the report compares
    assert "--eval-tokens must be >= 1, got 0" in capsys.readouterr().err
