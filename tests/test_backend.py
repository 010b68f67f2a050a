"""What is loaded, and the switch to the reference path."""

import os
import subprocess
import sys

import pyprune_fast


def test_native_library_is_loaded_unless_reference_is_forced():
    info = pyprune_fast.backend_info()
    if os.environ.get("PYPRUNE_FAST_BACKEND") == "reference":
        assert info["backend"] == "reference"
        return
    assert info["backend"] == "native", info.get("reason")
    assert info["cpu_ops"] is True
    assert info["build"] in ("ahead-of-time (setup.py)", "just-in-time (torch.utils.cpp_extension.load)")
    if info["cuda_ops"]:
        assert info["cuda_archs"]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )


def test_reference_backend_is_forced_by_environment():
    done = run_python(
        "import torch, pyprune_fast as p; from pyprune_fast import ops; i = p.backend_info(); "
        "s, st = ops.saliency([torch.ones(3)], [torch.full((3,), -2.0)]); "
        "print(i['backend'], i['reason'], s[0].tolist(), st.sum.item())",
        PYPRUNE_FAST_BACKEND="reference",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "reference PYPRUNE_FAST_BACKEND=reference [2.0, 2.0, 2.0] 6.0"


def test_bad_backend_value_is_an_error():
    done = run_python("import pyprune_fast as p; p.backend_info()", PYPRUNE_FAST_BACKEND="fastest")
    assert done.returncode != 0
    assert "PYPRUNE_FAST_BACKEND must be 'auto', 'native' or 'reference', got 'fastest'" in done.stderr
