"""Finds and loads the compiled operator library.

Order: `PYPRUNE_FAST_BACKEND=reference` forces the pure-PyTorch path; otherwise the library built
ahead of time by setup.py (`pyprune_fast/_C*.so`); otherwise a just-in-time build of the same sources
with torch.utils.cpp_extension (ninja, cached per torch version and source state). If none works the
reference path is used and `backend_info()` says why.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable

from . import _build
from ._compat import has_kernel, library_ops

_lock = threading.RLock()
_state: dict | None = None
_after_load: list[Callable[[], None]] = []
_cuda_fits: dict[tuple[str, int], bool] = {}  # (op, device index) -> whether the CUDA kernel can run there

# CUDA kernels that need more than an image for the device: the lowest compute capability they run on.
MIN_CAPABILITY = {
    "sparse24_linear": (8, 0),  # cp.async, ldmatrix and mma.sp (csrc/include/.../mma_sp.cuh)
    "sparse24_linear_sm90": (9, 0),  # TMA and wgmma.mma_async.sp, sm_90a only (ops/sparse24.py checks 9.0 exactly)
}
# Ops with a CUDA kernel only (a variant of another op that the dispatch picks): not counted by cpu_ops.
CUDA_ONLY = {"sparse24_linear_sm90"}


def _cache_dir() -> str:
    import torch

    root = os.environ.get("PYPRUNE_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyprune_fast"
    )
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{_build.cuda_archs()}".replace(";", "_")
    return os.path.join(root, hashlib.sha1(tag.encode()).hexdigest()[:12])


def _load_aot() -> str | None:
    spec = importlib.util.find_spec(f"pyprune_fast.{_build.LIBRARY_NAME}")
    if spec is None or spec.origin is None:
        return None
    import torch

    torch.ops.load_library(spec.origin)
    return spec.origin


def _stale(build_dir: str) -> bool:
    """Whether the cached library is missing or older than a source file (then ninja rebuilds)."""
    libs = glob.glob(os.path.join(build_dir, "pyprune_fast_C*.so"))
    if not libs:
        return True
    built = max(os.path.getmtime(p) for p in libs)
    sources = glob.glob(os.path.join(_build.csrc_dir(), "**", "*"), recursive=True)
    return any(os.path.getmtime(p) > built for p in sources if os.path.isfile(p))


def _load_jit(config: dict) -> str:
    from torch.utils import cpp_extension

    build_dir = _cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    if _stale(build_dir):
        what = "C++/CUDA" if config["with_cuda"] else "C++"
        print(
            f"pyprune_fast: building the {what} extension (first use; cached in {build_dir}) ...",
            file=sys.stderr,
            flush=True,
        )
    cpp_extension.load(
        name="pyprune_fast_C",
        sources=config["sources"],
        extra_include_paths=config["include_dirs"],
        extra_cflags=config["cxx_flags"],
        extra_cuda_cflags=config["nvcc_flags"],
        extra_ldflags=config["ldflags"],
        build_directory=build_dir,
        with_cuda=config["with_cuda"],
        is_python_module=False,
        verbose=os.environ.get("PYPRUNE_FAST_VERBOSE_BUILD") == "1",
    )
    return build_dir


def _kernels() -> dict[str, dict[str, bool]]:
    """{op name: {"cpu": has a CPU kernel, "cuda": has a CUDA kernel}} for every op of the library."""
    return {
        op.split("::", 1)[1]: {"cpu": has_kernel(op, "CPU"), "cuda": has_kernel(op, "CUDA")}
        for op in library_ops("pyprune_fast")
        if op != "pyprune_fast::build_info"
    }


def _load() -> dict:
    import torch

    backend = os.environ.get("PYPRUNE_FAST_BACKEND", "auto").lower()
    state = {
        "backend": "reference",
        "requested": backend,
        "library": None,
        "build": None,
        "cpu_ops": False,
        "cuda_ops": False,
        "ops": {},
        "cuda_archs": None,
        "reason": None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if backend == "reference":
        state["reason"] = "PYPRUNE_FAST_BACKEND=reference"
        return state
    if backend not in ("auto", "native"):
        raise ValueError(f"PYPRUNE_FAST_BACKEND must be 'auto', 'native' or 'reference', got {backend!r}")
    try:
        path = _load_aot()
        if path is not None:
            state["build"] = "ahead-of-time (setup.py)"
        else:
            config = _build.build_config()
            path = _load_jit(config)
            state["build"] = "just-in-time (torch.utils.cpp_extension.load)"
            if not config["with_cuda"]:
                state["cuda_reason"] = config["cuda_reason"]
        state["library"] = path
    except Exception as exc:  # noqa: BLE001 - any build/load failure falls back, and is reported
        if backend == "native":
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        state["reason"] = f"the compiled library could not be loaded: {type(exc).__name__}: {first_line[:300]}"
        state["error"] = str(exc)
        warnings.warn(
            f"pyprune_fast: using the pure-PyTorch reference path; {state['reason']} "
            "(backend_info()['error'] has the full message)",
            stacklevel=3,
        )
        return state
    state["ops"] = _kernels()
    state["cpu_ops"] = bool(state["ops"]) and all(k["cpu"] for op, k in state["ops"].items() if op not in CUDA_ONLY)
    state["cuda_ops"] = bool(state["ops"]) and all(k["cuda"] for k in state["ops"].values())
    built = dict(item.split("=", 1) for item in torch.ops.pyprune_fast.build_info().split(";") if item)
    state["cuda_archs"] = built.get("cuda_archs", "").replace("_", ";") or None
    state["backend"] = "native"
    return state


def state() -> dict:
    """Loads the library once (thread-safe) and returns what was loaded."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                loaded = _load()
                if loaded["backend"] == "native":
                    for callback in _after_load:
                        callback()
                _state = loaded
    return _state


def after_load(callback: Callable[[], None]) -> Callable[[], None]:
    """Runs `callback` once the compiled library is loaded (at once if it already is): how the op
    modules register their fake kernels and autograd formulas, which need the ops defined. Usable as
    a decorator. Nothing runs when the reference backend is in use."""
    with _lock:
        if _state is None:
            _after_load.append(callback)
        elif _state["backend"] == "native":
            callback()
    return callback


def native_available(op: str, device_type: str) -> bool:
    """Whether the compiled kernel of `op` serves tensors of this device type ('cpu' or 'cuda')."""
    s = state()
    return s["backend"] == "native" and s["ops"].get(op, {}).get(device_type, False)


def kernel_image(capability: tuple[int, int], archs: str | None) -> str | None:
    """The image of a library built for `archs` (TORCH_CUDA_ARCH_LIST syntax, as backend_info reports it)
    that a GPU of compute capability `capability` runs: "sm_XY" (a binary of the same major version and a
    minor no higher than the device's; an arch-specific "X.Ya" binary on X.Y only), "compute_XY" (PTX of an
    arch no higher than the device's, JIT-compiled by the driver), or None when there is none. "unknown"
    when the list has entries other than X.Y[a|f][+PTX] (named archs): then the library is trusted."""
    cubins, ptx = [], []
    for entry in re.split(r"[;\s]+", (archs or "").strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if m is None:
            return "unknown"
        arch, suffix = (int(m.group(1)), int(m.group(2))), m.group(3)
        if arch[0] == capability[0] and (arch == capability if suffix == "a" else arch[1] <= capability[1]):
            cubins.append(arch)
        if m.group(4) and (arch == capability if suffix == "a" else arch <= capability):
            ptx.append(arch)
    if cubins:
        return "sm_{}{}".format(*max(cubins))
    if ptx:
        return "compute_{}{}".format(*max(ptx))
    return None


def _why_not(op: str, index: int) -> tuple[str | None, str | None]:
    """(why no CUDA kernel runs on GPU `index`, why `op`'s cannot): None where it can."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    name = f"{torch.cuda.get_device_name(index)} (cuda:{index}, compute capability {major}.{minor})"
    archs = state()["cuda_archs"]
    no_image = None
    if kernel_image((major, minor), archs) is None:
        no_image = f"this build has no kernel image for {name}: CUDA archs {archs} (TORCH_CUDA_ARCH_LIST at build time)"
    need = MIN_CAPABILITY.get(op, (0, 0))
    too_old = None if (major, minor) >= need else f"{op} needs compute capability {need[0]}.{need[1]}, {name}"
    return no_image, too_old


def cuda_kernel_fits(op: str, device: object) -> bool:
    """Whether `op`'s CUDA kernel can run on this GPU (a torch.device of type cuda): the build has an image
    for its compute capability and the op's MIN_CAPABILITY is met. Decided once per device and op; where
    it cannot, one warning (per device, and per op for MIN_CAPABILITY) says why, and the reference path
    serves the op there."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    fits = _cuda_fits.get((op, index))
    if fits is None:
        no_image, too_old = _why_not(op, index)
        with _lock:
            device_known = ("", index) in _cuda_fits
            _cuda_fits[("", index)] = no_image is None
            fits = _cuda_fits[(op, index)] = no_image is None and too_old is None
        why = (None if device_known else no_image) if no_image else too_old
        if why:
            warnings.warn(f"pyprune_fast: {why}; the pure-PyTorch reference path serves it there", stacklevel=4)
    return fits
