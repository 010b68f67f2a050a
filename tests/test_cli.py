"""The command line end to end on tiny models (`--model tests.cli_factory:...`), its errors, and the
report's numbers recomputed independently from the saved masks."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pyprune_fast
from pyprune_fast import criteria
from pyprune_fast.app import cli, report, runner
from pyprune_fast.app.cli import options
from pyprune_fast.bench import harness, registry
from tests import cli_factory

TINY = "tests.cli_factory:tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def prune(tmp_path, *extra, out="out"):
    out = str(tmp_path / out)
    return cli.main(["prune", "--model", TINY, "--out", out, "--quiet", *extra]), out


def read_report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def leftovers(directory) -> list[str]:
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def dense_reference():
    model = cli_factory.mlp().eval()
    with torch.no_grad():
        return model(cli_factory.held_out_inputs())


def recompute(masks: dict) -> dict:
    """The tiny bundle's metrics written out again: a fresh model, the masks applied by hand, its outputs
    on the held-out inputs against the dense model's."""
    model = cli_factory.mlp().eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))
        out = model(cli_factory.held_out_inputs())
    ref = dense_reference()
    cosine = (out * ref).sum(1) / (out.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-8)
    return {
        "output_cosine": cosine.mean().item(),
        "top1_agreement": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
    }


def test_prune_end_to_end_and_numbers_recomputed_from_the_masks(tmp_path, capsys):
    rc, out = prune(tmp_path, "--criterion", "magnitude", "snip", "afr", "wanda", "--sparsity", "0.8", "0.5")
    assert rc == 0
    doc = read_report(out)
    stdout = capsys.readouterr().out
    names = sorted(os.listdir(out))
    expected_masks = [
        f"masks-{c}-{s}.safetensors" for c in ("magnitude", "snip", "afr", "wanda") for s in ("0.5", "0.8")
    ]
    assert names == sorted(expected_masks + ["layer-sparsity.png", "report.json", "report.md", "retention.png"])
    assert sorted(doc["files"]) == names
    for plot in ("retention.png", "layer-sparsity.png"):
        with open(os.path.join(out, plot), "rb") as f:
            assert f.read(8) == PNG

    scored = sum(torch.Size(s).numel() for s in doc["model"]["scored_tensors"].values())
    assert scored == 6 * 16 + 16 * 16 + 16 * 3 and doc["dense"] == {"output_cosine": 1.0, "top1_agreement": 1.0}
    assert len(doc["results"]) == 8
    for r in doc["results"]:
        path = os.path.join(out, r["files"]["masks"])
        masks = pyprune_fast.load_masks(path, cli_factory.mlp())
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == round(float(r["sparsity"]) * scored)
        assert r["achieved_sparsity"] == pytest.approx(pruned / scored, abs=1e-12)
        again = recompute(masks)
        for metric, value in again.items():
            assert r["metrics"][metric] == pytest.approx(value, abs=1e-6), (r["criterion"], r["sparsity"], metric)
            assert r["retention"][metric] == pytest.approx(value, abs=1e-6)  # dense value 1
        meta = pyprune_fast.mask_metadata(path)
        assert meta["criterion"] == r["criterion"] and json.loads(meta["sparsity"]) == float(r["sparsity"])
        assert meta["granularity"] == "global" and meta["model"] == "tiny-mlp"
        assert meta["pyprune_fast_version"] == pyprune_fast.__version__

    # magnitude's masks, checked by their definition: every pruned |w| <= every kept |w|
    masks = pyprune_fast.load_masks(os.path.join(out, "masks-magnitude-0.8.safetensors"))
    weights = dict(cli_factory.mlp().named_parameters())
    kept = torch.cat([weights[n].detach().abs()[m] for n, m in masks.items()])
    dropped = torch.cat([weights[n].detach().abs()[~m] for n, m in masks.items()])
    assert dropped.max() <= kept.min()

    means = {}
    for r in doc["results"]:
        means.setdefault(r["criterion"], []).append(r["metrics"]["output_cosine"])
    ranking = [entry["criterion"] for entry in doc["ranking"]]
    assert ranking == sorted(means, key=lambda c: -sum(means[c]) / len(means[c]))
    assert doc["ranking"][0]["mean_output_cosine"] == pytest.approx(max(sum(v) / 2 for v in means.values()))
    assert f"ranking by mean output_cosine over sparsities: 1. {ranking[0]}" in stdout
    assert "sparsity  criterion" in stdout and "wrote 12 files" in stdout
    md = open(os.path.join(out, "report.md")).read()
    assert f"| 1 | {ranking[0]} |" in md and "![retention](retention.png)" in md
    assert leftovers(out) == []


def test_single_criterion_writes_masks_and_pruned_model(tmp_path):
    rc, out = prune(tmp_path, "--criterion", "snip", "--sparsity", "0.7", "--save-model", "--batches", "2")
    assert rc == 0
    assert {"masks.safetensors", "model.safetensors"} <= set(os.listdir(out))
    doc = read_report(out)
    assert doc["calibration_batches"] == 2
    assert doc["results"][0]["files"] == {"masks": "masks.safetensors", "model": "model.safetensors"}
    masks = pyprune_fast.load_masks(os.path.join(out, "masks.safetensors"))
    # the masks are SNIP's on the first 2 batches, computed here through the public API
    dense = cli_factory.mlp()
    scores = criteria.snip(dense, cli_factory.calibration(), num_batches=2)
    expected = pyprune_fast.masks.global_unstructured(scores, 0.7)
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    weights = load_file(os.path.join(out, "model.safetensors"))
    for name, param in dense.named_parameters():
        want = param.detach() * masks[name] if name in masks else param.detach()
        assert torch.equal(weights[name], want), name


@pytest.mark.parametrize("granularity", ["layerwise", "per-row"])
def test_layerwise_and_per_row_counts(tmp_path, granularity):
    rc, out = prune(tmp_path, "--criterion", "magnitude", "--sparsity", "0.4", "--granularity", granularity)
    assert rc == 0
    masks = pyprune_fast.load_masks(os.path.join(out, "masks.safetensors"))
    for m in masks.values():
        groups = [m.reshape(-1)] if granularity == "layerwise" else list(m.reshape(m.shape[0], -1))
        for g in groups:
            assert int((~g).sum()) == round(0.4 * g.numel())
    assert read_report(out)["granularity"] == granularity
    assert pyprune_fast.mask_metadata(os.path.join(out, "masks.safetensors"))["granularity"] == granularity


def test_two_four_skips_weights_whose_rows_do_not_divide_by_4(tmp_path):
    rc, out = prune(tmp_path, "--criterion", "magnitude", "afr", "--granularity", "2:4")
    assert rc == 0
    doc = read_report(out)
    assert list(doc["skipped"]) == ["0.weight"] and "row length 6" in doc["skipped"]["0.weight"]
    assert [r["sparsity"] for r in doc["results"]] == ["2:4", "2:4"]
    for r in doc["results"]:
        assert r["files"]["masks"] == f"masks-{r['criterion']}-2of4.safetensors"
        masks = pyprune_fast.load_masks(os.path.join(out, r["files"]["masks"]))
        assert sorted(masks) == ["2.weight", "4.weight"]
        for m in masks.values():
            assert (m.reshape(-1, 4).sum(1) == 2).all()
        assert r["layer_sparsity"] == {"0.weight": 0.0, "2.weight": 0.5, "4.weight": 0.5}
        assert r["achieved_sparsity"] == pytest.approx((16 * 16 + 3 * 16) / 2 / 400)
        assert r["metrics"] == pytest.approx(recompute(masks), abs=1e-6)
    assert "Weights left dense by 2:4" in open(os.path.join(out, "report.md")).read()


def test_two_four_refuses_a_sparsity(tmp_path, capsys):
    rc, out = prune(tmp_path, "--granularity", "2:4", "--sparsity", "0.7")
    assert rc == 2 and "--sparsity does not apply to --granularity 2:4" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_model_without_evaluation(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["prune", "--model", "tests.cli_factory:unevaluated", "--out", out, "--quiet"]) == 0
    doc = read_report(out)
    assert doc["ranking"] == [] and doc["dense"] == {} and "retention.png" not in os.listdir(out)
    assert "no evaluation" in open(os.path.join(out, "report.md")).read()
    assert len(doc["results"]) == 12


@pytest.mark.parametrize(
    "model, message",
    [
        ("nosuchmodel", "expected smollm2, torchvision:NAME, timm:NAME, hf:PATH or package.module:factory"),
        ("torchvision:no_such_net", "torchvision has no model 'no_such_net'"),
        ("tests.cli_factory:no_such_factory", "cannot import 'no_such_factory'"),
        ("no_such_package.models:factory", "cannot import 'factory' from module 'no_such_package.models'"),
        ("hf:/no/such/dir", "is not a local model directory"),
    ],
)
def test_bad_model_name(tmp_path, capsys, model, message):
    out = tmp_path / "new" / "out"
    assert cli.main(["prune", "--model", model, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyprune-fast: error: ") and message in err
    assert not (tmp_path / "new").exists()  # the directories it made for --out are gone again


def test_criterion_that_needs_data_the_model_lacks(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        ["prune", "--model", "tests.cli_factory:bare", "--criterion", "magnitude", "snip", "refer", "--out", str(out)]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "criterion 'snip' needs calibration data and a loss" in err
    assert "criterion 'refer' needs calibration data" in err
    assert "criteria it can run: magnitude" in err
    assert not out.exists()
    assert cli.main(["score", "--model", "tests.cli_factory:bare", "--criterion", "wanda", "--out", str(out)]) == 2
    assert "criterion 'wanda' needs calibration data" in capsys.readouterr().err and not out.exists()


def test_the_runner_reads_what_criteria_need_from_the_registry():
    assert not hasattr(runner, "NEEDS")
    assert criteria.CRITERIA["snip"].needs == {"data", "loss"} and criteria.CRITERIA["magnitude"].needs == set()
    assert criteria.CRITERIA["synflow"].needs == {"input"} and criteria.CRITERIA["taylor"].needs == {"data", "loss"}


@pytest.mark.parametrize("granularity", ["channel", "channel-layerwise"])
def test_channel_granularity_zeroes_whole_output_channels(tmp_path, granularity):
    rc, out = prune(
        tmp_path, "--criterion", "taylor", "--sparsity", "0.25", "--granularity", granularity, "--save-model"
    )
    assert rc == 0
    masks = pyprune_fast.load_masks(os.path.join(out, "masks.safetensors"))
    dense = cli_factory.mlp()
    scores = pyprune_fast.score(dense, "taylor", cli_factory.calibration(), num_batches=4)
    expected = pyprune_fast.masks.channels(scores, 0.25, scope="global" if granularity == "channel" else "layer")
    assert list(masks) == ["0", "2", "4"] and all(torch.equal(masks[n], expected[n]) for n in expected)
    total = sum(m.numel() for m in masks.values())
    if granularity == "channel":
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.25 * total)
    else:
        assert all(int((~m).sum()) == round(0.25 * m.numel()) for m in masks.values())
    weights = load_file(os.path.join(out, "model.safetensors"))
    for layer, keep in masks.items():
        assert torch.equal(weights[f"{layer}.weight"], dense.get_parameter(f"{layer}.weight").detach() * keep[:, None])
        assert torch.equal(weights[f"{layer}.bias"], dense.get_parameter(f"{layer}.bias").detach() * keep)
    doc = read_report(out)
    assert doc["granularity"] == granularity
    assert doc["results"][0]["achieved_sparsity"] == sum(int((~m).sum()) for m in masks.values()) / total
    ref = recompute(
        {f"{n}.{p}": (k[:, None] if p == "weight" else k) for n, k in masks.items() for p in ("weight", "bias")}
    )
    assert doc["results"][0]["metrics"] == pytest.approx(ref)


def test_remove_channels_physically_with_torch_pruning(tmp_path):
    pytest.importorskip("torch_pruning")
    rc, out = prune(
        tmp_path, "--criterion", "l1", "--sparsity", "0.5", "--granularity", "channel-layerwise", "--remove-channels"
    )
    assert rc == 0
    result = read_report(out)["results"][0]
    # hidden layers 16 -> 8 -> 8 channels, the head's 3 outputs kept: 6*8+8 + 8*8+8 + 8*3+3
    assert result["parameters"] == 6 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3
    masks = pyprune_fast.load_masks(os.path.join(out, "masks.safetensors"))
    # the removed model computes what the zeroed one does (a ReLU of a zero channel is zero)
    zeroed = {
        f"{n}.{p}": (k[:, None] if p == "weight" else k)
        for n, k in masks.items()
        if n != "4"
        for p in ("weight", "bias")
    }
    assert result["metrics"] == pytest.approx(recompute(zeroed), abs=1e-6)


def test_channel_and_weight_criteria_do_not_mix(tmp_path, capsys):
    assert prune(tmp_path, "--criterion", "taylor")[0] == 2
    assert "criteria ['taylor'] score channels: use a channel granularity" in capsys.readouterr().err
    assert prune(tmp_path, "--criterion", "snip", "--granularity", "channel")[0] == 2
    assert "criteria ['snip'] score weights" in capsys.readouterr().err
    assert prune(tmp_path, "--criterion", "snip", "--remove-channels")[0] == 2
    assert "--remove-channels applies to --granularity channel" in capsys.readouterr().err


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["prune", "--model", TINY, "--out", str(blocker / "sub")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert cli.main(["prune", "--model", TINY, "--out", str(blocker)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "x" and os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ValueError])
def test_a_run_that_fails_late_replaces_nothing(tmp_path, monkeypatch, capsys, failure):
    """A first run writes its files; a second run into the same directory dies after all masks were
    made (while drawing a plot): every file of the first run is unchanged and no temporary is left."""
    rc, out = prune(tmp_path, "--criterion", "magnitude", "--sparsity", "0.5")
    assert rc == 0
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}

    def dies(*args):
        raise failure("plot failed")

    monkeypatch.setattr(report, "layers_plot", dies)
    rc, _ = prune(tmp_path, "--criterion", "magnitude", "snip", "--sparsity", "0.5", "0.9")
    assert rc == (130 if failure is KeyboardInterrupt else 1)  # a ValueError of our own code is a bug: status 1
    assert "interrupted" in capsys.readouterr().err or failure is ValueError
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert leftovers(out) == []


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pyprune_fast", "prune", "--model", "tests.cli_factory:terminated", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 130, done.stderr
    assert "interrupted; no file was written or replaced" in done.stderr
    assert not out.exists()


def test_a_fresh_run_that_fails_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "layers_plot", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc, out = prune(tmp_path, "--criterion", "magnitude", out="a/b")
    assert rc == 130 and not (tmp_path / "a").exists()


def test_bad_options(tmp_path, capsys):
    assert prune(tmp_path, "--sparsity", "1.5")[0] == 2
    assert "--sparsity must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert prune(tmp_path, "--batches", "0")[0] == 2
    assert "--batches must be >= 1, got 0" in capsys.readouterr().err
    assert prune(tmp_path, "--device", "tpu9")[0] == 2
    assert "--device 'tpu9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prune(tmp_path, "--criterion", "nosuch")
    assert not (tmp_path / "out").exists()


def test_score_writes_each_criterions_scores(tmp_path, capsys):
    out = tmp_path / "scores"
    rc = cli.main(
        ["score", "--model", TINY, "--criterion", "snip", "wanda", "--batches", "3", "--out", str(out), "--quiet"]
    )
    assert rc == 0
    assert sorted(os.listdir(out)) == ["scores-snip.safetensors", "scores-wanda.safetensors"]
    for name in ("snip", "wanda"):
        saved = load_file(str(out / f"scores-{name}.safetensors"))
        expected = criteria.CRITERIA[name](cli_factory.mlp(), cli_factory.calibration(), num_batches=3)
        assert saved.keys() == expected.keys()
        assert all(torch.allclose(saved[n], expected[n]) for n in expected)
    assert "scores-wanda.safetensors" in capsys.readouterr().out


def test_bench_calls_each_workload_with_the_device_and_scale(capsys, monkeypatch):
    calls = []

    def toy(device="cpu", scale=1.0):
        x = torch.randn(int(1000 * scale) + 1)
        calls.append((device, scale))
        return harness.Case(group="toy", ours=lambda: x.sum(), baselines={"python sum": lambda: sum(x.tolist())})

    monkeypatch.setitem(registry.WORKLOADS, "toy sum", toy)
    assert cli.main(["bench", "--only", "toy sum", "--scale", "0.01", "--repeats", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert calls == [("cpu", 0.01)]
    assert any("python sum" in line and line.rstrip().endswith("x") for line in lines)
    # every registered workload end to end: tests/test_bench_quick.py


def test_bench_memory_column_shows_each_implementations_peak(capsys, monkeypatch):
    def toy(device="cpu", scale=1.0):
        # ours touches 64 MiB (pages written, so resident), the baseline nothing
        return harness.Case(group="toy", ours=lambda: torch.ones(16 * 2**20), baselines={"nothing": lambda: None})

    monkeypatch.setitem(registry.WORKLOADS, "toy memory", toy)
    assert cli.main(["bench", "--only", "toy memory", "--repeats", "1", "--device", "cpu", "--memory"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].rstrip().endswith("peak extra MiB")
    ours = next(line for line in lines if line.startswith("toy memory") and " ours " in line)
    base = next(line for line in lines if line.startswith("toy memory") and " nothing " in line)
    assert 60 <= int(ours.split()[-1]) <= 80 and int(base.split()[-1]) < 8
    monkeypatch.setattr(options, "resolve_device", lambda name: "cuda")  # as on a machine with a GPU
    args = cli.build_parser().parse_args(["bench", "--only", "toy memory", "--device", "cuda", "--memory"])
    with pytest.raises(cli.UsageError) as refused:
        options.BenchOptions.from_args(args, [])
    assert refused.value.spelled(options.spell).startswith("--memory measures this process's resident memory: CPU only")


def test_time_case_times_ours_and_each_baseline():
    case = harness.Case(group="g", ours=lambda: 1, baselines={"a": lambda: 2, "b": lambda: 3})
    timings = harness.time_case(case, repeats=3)
    assert [t.impl for t in timings] == ["ours", "a", "b"]
    assert all(0 <= t.best <= t.median for t in timings)


def test_time_case_alternates_the_order_of_each_round():
    calls = []
    case = harness.Case(group="g", ours=lambda: calls.append("ours"), baselines={"a": lambda: calls.append("a")})
    harness.time_case(case, repeats=4, warmup=1)
    assert calls == ["ours", "a", "ours", "a", "a", "ours", "ours", "a", "a", "ours"]


def test_info_prints_the_backend(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] in ("native", "reference") and "cuda_archs" in info


def test_module_entry_point(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyprune_fast",
            "prune",
            "--model",
            TINY,
            "--criterion",
            "magnitude",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "ranking by mean output_cosine" in done.stdout and done.stderr.count("\r") == 0  # no bars when not a TTY


def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            written.append(text)

        def flush(self):
            pass

    written = []
    monkeypatch.setattr("sys.stderr", Terminal())
    assert cli.main(["prune", "--model", TINY, "--criterion", "magnitude", "--out", str(tmp_path / "a")]) == 0
    assert any("scoring" in w for w in written) and any("evaluating" in w for w in written)
    written.clear()
    assert (
        cli.main(["prune", "--model", TINY, "--criterion", "magnitude", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    )
    assert written == []


@pytest.mark.cuda
def test_prune_on_cuda(tmp_path):
    rc, out = prune(tmp_path, "--criterion", "magnitude", "snip", "wanda", "--device", "cuda", "--granularity", "2:4")
    assert rc == 0
    doc = read_report(out)
    assert doc["device"].startswith("cuda")
    for r in doc["results"]:
        masks = pyprune_fast.load_masks(os.path.join(out, r["files"]["masks"]))
        assert r["metrics"] == pytest.approx(recompute(masks), abs=1e-5)


@pytest.mark.large
def test_the_readme_command_on_the_default_model(tmp_path, capsys):
    """The bare `pyprune-fast prune` (the default model, criteria and sparsities), then the numbers of
    one result recomputed from its saved masks on a freshly loaded model."""
    from pyprune_fast.app import zoo

    out = tmp_path / "out"
    assert cli.main(["prune", "--out", str(out), "--quiet"]) == 0
    doc = read_report(str(out))
    assert doc["model"]["name"] == "all-MiniLM-L6-v2" and doc["granularity"] == "global"
    assert [(r["criterion"], r["sparsity"]) for r in doc["results"]] == [
        (c, s) for c in cli.DEFAULT_CRITERIA for s in cli.DEFAULT_SPARSITIES
    ]
    assert {e["criterion"] for e in doc["ranking"]} == set(cli.DEFAULT_CRITERIA)
    result = next(r for r in doc["results"] if r["criterion"] == "afr" and r["sparsity"] == 0.8)
    fresh = zoo.load(None, calibration_batches=1)
    masks = pyprune_fast.load_masks(out / result["files"]["masks"], fresh.model)
    pyprune_fast.apply_masks(fresh.model, masks)
    assert fresh.evaluate(fresh.model) == pytest.approx(result["metrics"], abs=1e-5)
    assert "ranking by mean feature_cosine" in capsys.readouterr().out


def snapshot(directory) -> dict:
    """Every file under `directory` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, directory)] = handle.read()
    return out


def test_a_rerun_replaces_the_previous_output_as_a_whole(tmp_path):
    """Run 1 writes four mask files; run 2 (one criterion, one sparsity) leaves exactly its own files:
    none of run 1's masks beside the new report, and nothing else beside --out."""
    rc, out = prune(tmp_path, "--criterion", "magnitude", "snip", "--sparsity", "0.5", "0.9")
    assert rc == 0 and len([f for f in os.listdir(out) if f.startswith("masks-")]) == 4
    rc, _ = prune(tmp_path, "--criterion", "magnitude", "--sparsity", "0.5")
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted(read_report(out)["files"])
    assert "masks.safetensors" in os.listdir(out) and os.listdir(tmp_path) == ["out"]
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o700)  # not the staging directory's mode
    # a file the report does not list (here `score`'s) is not replaced: the run is refused
    assert cli.main(["score", "--model", TINY, "--criterion", "magnitude", "--out", out, "--quiet"]) == 0
    before = snapshot(out)
    assert prune(tmp_path, "--criterion", "magnitude", "--sparsity", "0.5")[0] == 2
    assert snapshot(out) == before


def failing_call(monkeypatch, module, name, failure, on_call):
    """Makes module.name raise `failure` on its `on_call`-th call (the earlier calls go through)."""
    real, calls = getattr(module, name), []

    def fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise failure("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fails)


@pytest.mark.parametrize(
    "where, failure",
    [
        ("second mask file", OSError),
        ("between the final renames", KeyboardInterrupt),
        ("switching --out in", OSError),
    ],
)
def test_a_run_that_fails_anywhere_leaves_the_previous_output_whole(tmp_path, monkeypatch, capsys, failure, where):
    """A second run into the same --out fails while writing, while renaming its staged files into place
    (before: the first masks were then new, the report old) or in the final switch: the first run's
    output is whole and nothing is left beside it."""
    rc, out = prune(tmp_path, "--criterion", "magnitude", "snip", "--sparsity", "0.5")
    assert rc == 0
    before = snapshot(out)
    if where == "second mask file":
        failing_call(monkeypatch, pyprune_fast.io, "save_masks", failure, 2)
    elif where == "between the final renames":  # io.commit: 2 mask writes, then the staged files' renames
        failing_call(monkeypatch, pyprune_fast.io, "commit", failure, 2 + 3)
    else:  # the rename of the staged directory onto --out, after the old one was moved aside
        real_replace, failed = os.replace, []

        def replace(src, dst):
            if os.path.abspath(dst) == out and not failed:  # the staging's rename; putting the old back works
                assert not os.path.exists(out)  # the old output is aside: it must come back
                failed.append(src)
                raise failure("injected failure")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    rc, _ = prune(tmp_path, "--criterion", "magnitude", "--sparsity", "0.5", "0.9")
    assert rc == (130 if failure is KeyboardInterrupt else 2)
    assert ("interrupted" if failure is KeyboardInterrupt else "injected failure") in capsys.readouterr().err
    monkeypatch.undo()
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]  # no staging directory, no old output moved aside


def test_an_out_holding_other_files_is_refused(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(["prune", "--model", TINY, "--out", str(mine), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds files that are not the output of an earlier pyprune-fast prune (notes.txt)" in err
    assert "choose a new or empty directory" in err
    assert os.listdir(mine) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["mine"]
    monkeypatch.chdir(mine)
    assert cli.main(["prune", "--model", TINY, "--out", ".", "--quiet"]) == 2
    assert "is the working directory or holds it" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty, target_is_directory=True)
    assert cli.main(["prune", "--model", TINY, "--criterion", "magnitude", "--out", str(link), "--quiet"]) == 0
    assert link.is_symlink() and "report.json" in os.listdir(empty)  # a symlinked --out: its target replaced


def test_a_factory_that_raises_is_one_error_line(tmp_path, capsys):
    rc = cli.main(["prune", "--model", "tests.cli_factory:broken", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err == (
        "pyprune-fast: error: --model 'tests.cli_factory:broken': the factory tests.cli_factory.broken() raised "
        "RuntimeError: weights file tiny.pt is missing\n"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", [[], ["prune"], ["score"], ["bench"], ["sensitivity"], ["info"]])
def test_every_help_prints(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyprune-fast")
    if command == ["bench"]:
        assert "SparseGPT 50% q_proj 4096x4096" in out  # a workload name with a percent sign
