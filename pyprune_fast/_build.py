"""How the C++/CUDA library is built: one definition for setup.py (AOT) and _extension.py (JIT).

Importable without torch (setup.py may run in an isolated build environment); the functions that need
torch import it themselves.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_CSRC = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
PACKAGED_CSRC = os.path.join(PACKAGE_DIR, "_csrc")  # sources copied into wheels for JIT builds
DEFAULT_ARCHS = "8.0;9.0a"  # 9.0a: the wgmma.sp kernel (sparse24_linear_sm90.cu) exists for sm_90a only
LIBRARY_NAME = "_C"

# -std=c++20 for both compilers: the selection kernels use template lambdas ([&]<typename Fmt>(), a
# C++20 feature) and torch's headers need C++20; torch's extension builder adds its own -std only when none
# is given, and its default has changed across versions.
CXX_STD = "-std=c++20"
# -fno-trapping-math: lets GCC vectorize float compares (we never read FP exception flags).
# -fopenmp: at::parallel_for is OpenMP in torch's builds; without it the CPU kernels run on one thread.
# The library then needs libgomp.so.1, which torch itself has already loaded.
CXX_FLAGS = [CXX_STD, "-O3", "-fno-trapping-math", "-fvisibility=hidden"] + (
    ["-fopenmp"] if sys.platform.startswith("linux") else []
)
LINK_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
NVCC_FLAGS = [CXX_STD, "-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def csrc_dir() -> str:
    """The C++/CUDA sources: the repository's csrc/ in a checkout, the packaged copy in a wheel."""
    for candidate in (REPO_CSRC, PACKAGED_CSRC):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    raise FileNotFoundError(f"pyprune_fast C++ sources not found in {REPO_CSRC} or {PACKAGED_CSRC}")


def find_cuda_home() -> str | None:
    """The CUDA toolkit that holds nvcc: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (
            home
            and os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return home
    return None


def nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Include and library directories of the CUDA libraries that ship in torch's `nvidia` wheels."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return [], []
    includes, libs = [], []
    for root in spec.submodule_search_locations:
        for sub in sorted(glob.glob(os.path.join(root, "*"))):
            if os.path.isdir(os.path.join(sub, "include")):
                includes.append(os.path.join(sub, "include"))
            if os.path.isdir(os.path.join(sub, "lib")):
                libs.append(os.path.join(sub, "lib"))
    return includes, libs


def _headers(root: str) -> set[str]:
    """The header files under an include folder, as paths relative to it."""
    found = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith((".h", ".hpp", ".cuh", ".hxx")) or "." not in name:
                found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def cuda_include_dirs(home: str) -> list[str]:
    """The CUDA include folders of the build, in search order: the toolkit's own, then each include folder
    of torch's `nvidia` wheels that holds a header the toolkit lacks (cuSOLVER's, for a toolkit installed
    without it). The wheels' copies of the toolkit's own headers (cuda_runtime.h, crt/, ...) then never
    shadow nvcc's, whose CUDA version may differ from the wheels'. The toolkit's folder is named first
    explicitly: torch's extension builds append it after the caller's folders."""
    own = os.path.join(home, "include")
    have = _headers(own)
    wheel_includes, _ = nvidia_wheel_dirs()
    return [own] + [d for d in wheel_includes if not _headers(d) <= have]


def cuda_link_flags() -> list[str]:
    """Linker flags for the CUDA libraries that the kernels call directly, each with an rpath (neither is
    loaded by `import torch`): cuSOLVER, from torch's `nvidia` wheel (which ships only
    libcusolver.so.<major>, no unversioned link) or else the toolkit's, and torch's lazily loaded
    libtorch_cuda_linalg, which holds ATen's cuSOLVER handles (in builds without it they are in
    libtorch_cuda)."""
    import torch

    _, wheel_libs = nvidia_wheel_dirs()
    found = sorted(p for d in wheel_libs for p in glob.glob(os.path.join(d, "libcusolver.so.*")))
    if found:
        lib_dir, name = os.path.split(found[0])
        flags = [f"-L{lib_dir}", f"-l:{name}", f"-Wl,-rpath,{lib_dir}"]
    else:
        lib_dir = os.path.join(find_cuda_home() or "/usr/local/cuda", "lib64")
        flags = [f"-L{lib_dir}", "-lcusolver", f"-Wl,-rpath,{lib_dir}"]
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if glob.glob(os.path.join(torch_lib, "libtorch_cuda_linalg.*")):
        flags += [f"-L{torch_lib}", "-ltorch_cuda_linalg", f"-Wl,-rpath,{torch_lib}"]
    return flags


def cuda_decision() -> tuple[bool, str]:
    """Whether to build the CUDA part, and why (or why not)."""
    import torch

    wanted = os.environ.get("PYPRUNE_FAST_BUILD_CUDA", "auto").lower()
    if wanted in ("0", "no", "false", "off"):
        return False, "PYPRUNE_FAST_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    home = find_cuda_home()
    if home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc in {home}"


def with_ptx(archs: str) -> str:
    """The arch list (TORCH_CUDA_ARCH_LIST syntax) with PTX embedded for its highest numeric entry, unless
    an entry already asks for PTX: "8.0;9.0" -> "8.0;9.0+PTX". GPUs newer than every listed arch (Blackwell:
    10.x, 12.x) then JIT-compile that PTX instead of finding no kernel image. Arch-specific entries (9.0a,
    whose PTX runs on 9.0 only) and named ones (Ampere) are left as they are."""
    entries = [e for e in re.split(r"[;\s]+", archs.strip()) if e]
    plain = [(tuple(int(p) for p in e.split(".")), i) for i, e in enumerate(entries) if re.fullmatch(r"\d+\.\d+", e)]
    if plain and not any(e.endswith("+PTX") for e in entries):
        entries[max(plain)[1]] += "+PTX"
    return ";".join(entries)


def cuda_archs() -> str:
    """The CUDA targets of the build: TORCH_CUDA_ARCH_LIST (default 8.0;9.0a) with PTX for the highest
    numeric entry (8.0+PTX;9.0a: 9.0a's PTX would run on 9.0 only)."""
    return with_ptx(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)


def build_config() -> dict:
    """Sources and flags shared by the AOT (setup.py) and JIT (_extension.py) builds."""
    src = csrc_dir()
    with_cuda, why = cuda_decision()
    sources = [os.path.join(src, "ops.cpp")] + sorted(glob.glob(os.path.join(src, "cpu", "*.cpp")))
    includes = [os.path.join(src, "include")]
    cxx = list(CXX_FLAGS)
    nvcc = list(NVCC_FLAGS)
    ldflags = list(LINK_FLAGS)
    if with_cuda:
        home = find_cuda_home()
        os.environ.setdefault("CUDA_HOME", home)
        import torch.utils.cpp_extension as cpp_extension

        cpp_extension.CUDA_HOME = home
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs()
        sources += sorted(glob.glob(os.path.join(src, "cuda", "*.cu")))
        includes += cuda_include_dirs(home)
        # The arch list is baked into the library (reported by backend_info); ';' is not shell-safe.
        define = f"-DPYPRUNE_FAST_CUDA_ARCHS={cuda_archs().replace(';', '_').replace(' ', '_')}"
        cxx.append(define)
        nvcc.append(define)
        ldflags += cuda_link_flags()
    return {
        "sources": sources,
        "include_dirs": includes,
        "cxx_flags": cxx,
        "nvcc_flags": nvcc,
        "ldflags": ldflags,
        "with_cuda": with_cuda,
        "cuda_reason": why,
        "archs": cuda_archs() if with_cuda else "",
    }
