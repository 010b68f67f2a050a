"""pyprune_fast/_build.py without compiling: the CUDA include folders (the toolkit's own first, then only
the `nvidia` wheel folders that add headers it lacks) and the C++ standard given to both compilers."""

import os

import pytest

from pyprune_fast import _build


def make_headers(root, names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("#pragma once\n")
    return str(root)


def test_wheel_headers_come_after_the_toolkit_and_only_where_it_lacks_them(tmp_path, monkeypatch):
    """The build put every wheel include folder ahead of nvcc's own (torch's builder appends the toolkit's
    folder after the caller's), so a wheel's cuda_runtime.h of another CUDA version shadowed nvcc's."""
    home = tmp_path / "cuda"
    own = make_headers(home / "include", ["cuda_runtime.h", "crt/host_config.h", "cublas_v2.h"])
    runtime_copy = make_headers(tmp_path / "wheel_runtime" / "include", ["cuda_runtime.h", "crt/host_config.h"])
    solver = make_headers(tmp_path / "wheel_solver" / "include", ["cusolverDn.h", "cuda_runtime.h"])
    nested = make_headers(tmp_path / "wheel_nested" / "include", ["crt/only_here.h"])
    monkeypatch.setattr(_build, "nvidia_wheel_dirs", lambda: ([runtime_copy, solver, nested], []))
    assert _build.cuda_include_dirs(str(home)) == [own, solver, nested]


def test_no_wheels_gives_the_toolkit_alone(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    own = make_headers(home / "include", ["cuda_runtime.h"])
    monkeypatch.setattr(_build, "nvidia_wheel_dirs", lambda: ([], []))
    assert _build.cuda_include_dirs(str(home)) == [own]


def test_both_compilers_get_cxx20():
    """The selection kernels use template lambdas ([&]<typename Fmt>(), C++20): the standard is passed
    explicitly to g++ and nvcc rather than left to torch's builder, whose default has changed."""
    assert "-std=c++20" in _build.CXX_FLAGS and "-std=c++20" in _build.NVCC_FLAGS
    assert sum(f.startswith("-std=") for f in _build.CXX_FLAGS + _build.NVCC_FLAGS) == 2


def test_build_config_orders_the_toolkit_include_before_the_wheels(monkeypatch):
    pytest.importorskip("torch")
    if _build.find_cuda_home() is None:
        pytest.skip("nvcc not found")
    # build_config sets both; monkeypatch gives them back as they were (unset included) afterwards
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_ARCHS))
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", _build.find_cuda_home()))
    config = _build.build_config()
    if not config["with_cuda"]:
        pytest.skip(config["cuda_reason"])
    includes = config["include_dirs"]
    own = os.path.join(_build.find_cuda_home(), "include")
    wheels = [d for d in includes if d in _build.nvidia_wheel_dirs()[0]]
    assert own in includes and all(includes.index(own) < includes.index(d) for d in wheels)
    assert "-std=c++20" in config["cxx_flags"] and "-std=c++20" in config["nvcc_flags"]
