"""What is loaded, and the switch to the reference path."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import pyprune_fast
from pyprune_fast import _build, _extension
from pyprune_fast.ops import dispatch


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


@pytest.mark.parametrize(
    "capability,archs,image",
    [
        ((8, 0), "8.0;9.0+PTX", "sm_80"),
        ((8, 6), "8.0;9.0+PTX", "sm_80"),  # a binary runs on later minors of its major version
        ((8, 9), "7.5;8.0;8.6", "sm_86"),
        ((9, 0), "8.0;9.0+PTX", "sm_90"),
        ((10, 0), "8.0;9.0+PTX", "compute_90"),  # Blackwell JIT-compiles the PTX of 9.0
        ((12, 0), "8.0 9.0+PTX", "compute_90"),
        ((10, 0), "8.0;9.0", None),  # a library built without PTX
        ((7, 5), "8.0;9.0+PTX", None),  # PTX never runs on an older GPU
        ((7, 5), "7.5;8.0;9.0+PTX", "sm_75"),
        ((9, 0), "9.0a", "sm_90"),
        ((10, 0), "9.0a+PTX", None),  # arch-specific PTX: 9.0 only
        ((9, 0), "8.0+PTX;9.0a", "sm_90"),  # the default build
        ((8, 6), "8.0+PTX;9.0a", "sm_80"),
        ((10, 0), "8.0+PTX;9.0a", "compute_80"),
        ((8, 0), "Ampere", "unknown"),
        ((8, 0), None, None),
    ],
)
def test_kernel_image_for_a_compute_capability(capability, archs, image):
    assert _extension.kernel_image(capability, archs) == image


def fake_gpu(monkeypatch, capability, archs):
    """A native library with CUDA kernels built for `archs`, and a GPU 0 of this compute capability."""
    native = {op: {"cpu": True, "cuda": True} for op in ("saliency", "sparse24_linear")}
    monkeypatch.setattr(_extension, "_state", {"backend": "native", "ops": native, "cuda_archs": archs})
    monkeypatch.setattr(_extension, "_cuda_fits", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")


@pytest.mark.parametrize(
    "capability,archs,saliency,sparse24",
    [
        ((9, 0), "8.0;9.0+PTX", True, True),
        ((12, 0), "8.0;9.0+PTX", True, True),  # by PTX
        ((7, 5), "7.5;8.0;9.0+PTX", True, False),  # an image, but no sparse tensor cores
        ((7, 0), "8.0;9.0+PTX", False, False),
        ((10, 0), "8.0;9.0", False, False),
    ],
)
def test_dispatch_by_compute_capability(monkeypatch, capability, archs, saliency, sparse24):
    fake_gpu(monkeypatch, capability, archs)
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # decided once per device and op: one warning at most for each reason
            assert _extension.cuda_kernel_fits("saliency", cuda) is saliency
            assert _extension.cuda_kernel_fits("sparse24_linear", cuda) is sparse24
    messages = [str(w.message) for w in caught]
    assert len(messages) == (not saliency) + (saliency and not sparse24)
    if not saliency:
        assert "no kernel image for Fake GPU (cuda:0, compute capability" in messages[0]
        assert f"CUDA archs {archs}" in messages[0] and "reference path" in messages[0]
    elif not sparse24:
        assert messages[0].startswith("pyprune_fast: sparse24_linear needs compute capability 8.0, Fake GPU")


def test_cpu_dispatch_does_not_ask_for_a_gpu(monkeypatch):
    fake_gpu(monkeypatch, (7, 0), "8.0;9.0+PTX")
    monkeypatch.setattr(torch.cuda, "get_device_capability", None)  # any call would raise
    assert dispatch.native("saliency", [torch.ones(2)]) is True
    assert dispatch.native("saliency", []) is False


@pytest.mark.parametrize(
    "given,built",
    [
        (None, "8.0+PTX;9.0a"),  # the default: 9.0a's PTX would serve 9.0 only
        ("7.5;8.0", "7.5;8.0+PTX"),
        ("7.5 8.6", "7.5;8.6+PTX"),
        ("9.0;8.0", "9.0+PTX;8.0"),
        ("8.0+PTX;9.0", "8.0+PTX;9.0"),  # PTX asked for: kept as given
        ("9.0a", "9.0a"),
    ],
)
def test_build_embeds_ptx_of_the_highest_arch(monkeypatch, given, built):
    if given is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    assert _build.cuda_archs() == built
