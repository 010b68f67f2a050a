"""CUDA sources that must compile for targets the default build does not cover (nvcc needed, no GPU).

- sparse24_linear.cu for sm_75: container images often put 7.x in TORCH_CUDA_ARCH_LIST, and the sm_80-only
  PTX of mma_sp.cuh (cp.async, ldmatrix, mma.sp) must not break such a build (the op refuses those devices
  at run time instead).
- svd_mean.cu without cusolverDnXsyevBatched (the per-matrix path of cuSOLVER < 11.7.1).

Each file is compiled alone (-c, one target): about 80 s of CPU for both together, run in parallel.
"""

import os
import subprocess
import sysconfig

import pytest
import torch

from pyprune_fast import _build

CUDA_HOME = _build.find_cuda_home()
pytestmark = pytest.mark.skipif(
    CUDA_HOME is None or torch.version.cuda is None, reason="needs nvcc and a CUDA build of torch"
)


def nvcc_command(source: str, target: str, output: str, defines: tuple[str, ...] = ()) -> list[str]:
    from torch.utils import cpp_extension

    includes = [os.path.join(_build.csrc_dir(), "include")]
    includes += cpp_extension.include_paths()
    includes += _build.nvidia_wheel_dirs()[0]
    includes.append(sysconfig.get_paths()["include"])
    return [
        os.path.join(CUDA_HOME, "bin", "nvcc"),
        "-c",
        "-std=c++20",
        "-Xcompiler",
        "-fPIC",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *_build.NVCC_FLAGS,
        f"-gencode=arch=compute_{target},code=sm_{target}",
        *(f"-D{d}" for d in defines),
        *(f"-I{d}" for d in includes),
        os.path.join(_build.csrc_dir(), "cuda", source),
        "-o",
        output,
    ]


def test_sources_compile_for_sm75_and_without_xsyev_batched(tmp_path):
    jobs = {
        "sparse24_linear.cu for sm_75": nvcc_command("sparse24_linear.cu", "75", str(tmp_path / "linear.o")),
        "svd_mean.cu without XsyevBatched": nvcc_command(
            "svd_mean.cu", "80", str(tmp_path / "svd.o"), ("PYPRUNE_FAST_NO_XSYEV_BATCHED",)
        ),
    }
    running = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in jobs.items()
    }
    failures = []
    for name, proc in running.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(f"{name} failed:\n{out[-4000:]}")
    assert not failures, "\n".join(failures)
    assert (tmp_path / "linear.o").stat().st_size > 0 and (tmp_path / "svd.o").stat().st_size > 0
