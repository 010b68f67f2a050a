"""benchmarks/gpu_check.sh without a GPU: valid bash, and its dry run lists every step and writes the
summary (the device fields then say why they are missing)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")


def test_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    subprocess.run(["shellcheck", SCRIPT], check=True)


STEPS = ["build", "backend", "cuda-tests", "memcheck", "racecheck", "timing", "summary", "done"]


def dry_run(env=None, out=None):
    env = {**os.environ, "PYTHON": sys.executable} if env is None else env
    if out is not None:
        env = {**env, "OUT": str(out)}
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dry_run_lists_every_step_and_writes_the_summary(tmp_path):
    stdout = dry_run(out=tmp_path / "out")
    steps = re.findall(r"^== \[\d+s\] ([\w-]+)", stdout, flags=re.M)
    assert steps == STEPS
    assert "pytest tests -m cuda" in stdout
    assert re.search(
        r"memcheck \(at most \d+s\): env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \S*compute-sanitizer --tool memcheck", stdout
    )
    assert re.search(r"racecheck \(at most \d+s\): \S*compute-sanitizer --tool racecheck", stdout)
    assert re.search(r"timing \(at most \d+s\): \S+ \S+/timing.py", stdout)
    path = re.search(r"done: (\S+\.json)", stdout).group(1)
    with open(path) as f:
        doc = json.load(f)
    assert [s["name"] for s in doc["steps"]] == STEPS[:6] and all(s["rc"] == 0 for s in doc["steps"])
    assert doc["timings"] == [] and "error" in doc["device"]
    # $OUT gets the results and the log (the device tool returns only $OUT)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [os.path.basename(path), os.path.basename(path)[:-5] + ".log"]
    )
    shutil.rmtree(os.path.dirname(path))
    assert subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True).returncode == 2


def test_every_step_fits_the_8_minute_budget():
    """The step limits are clipped to the budget (470 s of steps, the summary's 30 s within 8 minutes)."""
    stdout = dry_run()
    limits = [int(x) for x in re.findall(r"\(at most (\d+)s\)", stdout)]
    assert len(limits) == 6 and all(0 < t <= 470 for t in limits)
    with open(SCRIPT) as f:
        text = f.read()
    assert "GPU_CHECK_BUDGET_S:-470" in text and "timeout 30" in text


def test_python3_is_used_when_python_is_missing(tmp_path):
    """Fresh machines often have python3 only: the script must not call `python`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    for tool in (
        "bash",
        "date",
        "mktemp",
        "tr",
        "tee",
        "awk",
        "head",
        "cat",
        "basename",
        "dirname",
        "timeout",
        "nproc",
        "mkdir",
        "cp",
        "printf",
    ):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = str(bin_dir)
    stdout = dry_run(env=env)
    assert re.search(r"build \(at most \d+s\): python3 setup.py build_ext --inplace", stdout)
    assert "timing.py" in stdout and re.findall(r"^== \[\d+s\] ([\w-]+)", stdout, flags=re.M) == STEPS


def test_timing_and_sanitizer_scripts_call_what_exists():
    """The Python run on the GPU is only compiled by the dry run: check here that the bench case builders
    and ops it names exist, so the one GPU run does not die on a typo."""
    import importlib

    with open(SCRIPT) as f:
        text = f.read()
    for module, name in set(re.findall(r"\b(select|saliency|nm_mask|sparse24|svd_mean)\.(\w+_case)\(", text)):
        assert callable(getattr(importlib.import_module(f"pyprune_fast.bench.{module}"), name)), (module, name)
    from pyprune_fast.bench import nm_mask, sparse24

    models = {
        "n_m_case": {**nm_mask.VIT_B16_LINEARS, **nm_mask.LLAMA7B_LAYER},
        "compress_case": sparse24.SPARSE24_SHAPES,
    }
    for builder, model in re.findall(r"\b(n_m_case|compress_case)\(\"(\w+)\"", text):
        assert model in models[builder], (builder, model)  # a wrong workload name was a KeyError on the GPU
    from pyprune_fast import masks, ops

    for module, name in set(re.findall(r"\b(ops|masks)\.(\w+)\(", text)):
        assert callable(getattr({"ops": ops, "masks": masks}[module], name)), (module, name)
