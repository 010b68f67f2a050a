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


def test_dry_run_lists_every_step_and_writes_the_summary():
    done = subprocess.run(
        ["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = re.findall(r"^== \[\d+s\] ([\w-]+)", done.stdout, flags=re.M)
    assert steps == [
        "build",
        "backend",
        "cuda-tests",
        "bench-saliency-select-nm-compress",
        "bench-svd_mean",
        "bench-sparse24_linear",
        "summary",
        "done",
    ]
    assert "pytest tests -m cuda" in done.stdout
    path = re.search(r"done: (\S+\.json)", done.stdout).group(1)
    with open(path) as f:
        doc = json.load(f)
    assert [s["name"] for s in doc["steps"]] == steps[:6] and all(s["rc"] == 0 for s in doc["steps"])
    assert doc["benchmarks"] == [] and "error" in doc["device"]
    shutil.rmtree(os.path.dirname(path))
    assert subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True).returncode == 2
