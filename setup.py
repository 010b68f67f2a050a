"""Ahead-of-time build of pyprune_fast's operator library (`pyprune_fast/_C*.so`).

With torch importable at build time (`pip install --no-build-isolation .`), the C++ kernels are built
here, plus the CUDA kernels when torch has CUDA and nvcc is found (for TORCH_CUDA_ARCH_LIST, default
8.0;9.0a: 9.0a holds the Hopper wgmma.sp kernel). Without torch (an isolated build) or with
PYPRUNE_FAST_BUILD_EXT=0, the package is pure Python and carries the sources, which are built just in
time on first use. Both paths use the same sources and flags, from pyprune_fast/_build.py.
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "_pyprune_fast_build", os.path.join(HERE, "pyprune_fast", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (pyprune_fast/_csrc) so that an install without the AOT
    library can still build it just in time."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "pyprune_fast", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target)


def _extensions():
    if os.environ.get("PYPRUNE_FAST_BUILD_EXT", "1") == "0":
        print("pyprune_fast: PYPRUNE_FAST_BUILD_EXT=0, the library will be built just in time on first use")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "pyprune_fast: torch is not importable in this build environment (use "
            "`pip install --no-build-isolation`); the library will be built just in time on first use"
        )
        return [], {}
    build = _build_module()
    config = build.build_config()
    print(f"pyprune_fast: CUDA kernels {'on' if config['with_cuda'] else 'off'} ({config['cuda_reason']})")
    sources = [os.path.relpath(s, HERE) for s in config["sources"]]
    kind = CUDAExtension if config["with_cuda"] else CppExtension
    ext = kind(
        name=f"pyprune_fast.{build.LIBRARY_NAME}",
        sources=sources,
        include_dirs=config["include_dirs"],
        extra_compile_args={"cxx": config["cxx_flags"], "nvcc": config["nvcc_flags"]},
        extra_link_args=config["ldflags"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
