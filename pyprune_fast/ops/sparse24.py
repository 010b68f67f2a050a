"""2:4 semi-structured sparsity: compression to values + mma.sp metadata, decompression, and the
2:4 sparse matmul on the sparse tensor cores (CUDA; a decompress + matmul on CPU)."""

from __future__ import annotations

import functools
import os
import re

import torch
from torch import Tensor

from .. import _extension
from .checks import check_compressed, check_dtypes, check_features_24, check_tensor
from .dispatch import call, native, when_loaded

__all__ = ["ACTIVATIONS", "KERNEL_ENV", "compress_24", "decompress_24", "sparse24_linear"]

ACTIVATIONS = (None, "relu", "gelu")
# Which CUDA kernel serves sparse24_linear: "auto" (wgmma.sp on compute capability 9.0 with an sm_90a
# build, mma.sp elsewhere), "mma_sp" (the Ampere kernel everywhere) or "wgmma_sp" (the Hopper kernel, an
# error where it cannot run).
KERNEL_ENV = "PYPRUNE_FAST_SPARSE24_KERNEL"
KERNELS = ("auto", "mma_sp", "wgmma_sp")


def compress_24(w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """2:4 weight w [out, in] -> (values [out, in/2] in w's dtype, meta int32 [out/16, in/32, 16]).

    Each chunk of 4 consecutive entries of a row keeps its (at most two) non-zero entries, or with a
    mask its (exactly two) masked-in entries, in increasing position order; meta holds the positions
    i0 < i1 of each chunk as the nibble i0 | i1 << 2, laid out as the operand of
    mma.sp::ordered_metadata m16n8k32 (csrc/include/pyprune_fast/sparse24.h). w that is not 2:4 (or a
    mask that does not keep exactly 2 of 4) is a ValueError. out % 16 == 0 and in % 32 == 0;
    float16/bfloat16/float32.

    Args:
        w: the 2:4 weight [out, in].
        mask: a bool keep-mask of w's shape choosing the two entries of each chunk.

    Returns:
        (values [out, in/2], meta int32 [out/16, in/32, 16]).
    """
    check_dtypes("w", w)
    if w.dim() != 2 or w.shape[0] % 16 or w.shape[1] % 32:
        raise ValueError(f"w must be [out, in] with out % 16 == 0 and in % 32 == 0, got shape {tuple(w.shape)}")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = keep), got {mask.dtype}")
        if mask.shape != w.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but w has shape {tuple(w.shape)}")
        if mask.device != w.device:
            raise ValueError(f"mask is on {mask.device} but w is on {w.device}")
    values, meta, invalid = call("compress_24", w, w, mask)
    bad = int(invalid)
    if bad:
        groups = w.numel() // 4
        if mask is None:
            raise ValueError(
                f"w is not 2:4 sparse: {bad} of its {groups} groups of 4 consecutive entries of a row hold more "
                "than two non-zeros (make it 2:4 first, e.g. with masks.n_m, or pass mask=)"
            )
        raise ValueError(f"mask must keep exactly 2 of every 4 consecutive entries of a row; {bad} of {groups} do not")
    return values, meta


def decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    """(values, meta) from compress_24 -> the dense weight [out, in] (zeros at the pruned positions).
    meta with an index pair that is not one of the six ordered pairs is a ValueError.

    Args:
        values, meta: from compress_24.

    Returns:
        The dense weight [out, in].
    """
    check_compressed(values, meta)
    dense, invalid = call("decompress_24", values, values, meta)
    if int(invalid):
        raise ValueError(f"meta holds {int(invalid)} groups whose index pair is not an ordered 2:4 pair (i0 < i1)")
    return dense


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """y = act(x @ Wᵀ + b) with W [out, in] given compressed (compress_24), for x [..., in].

    CUDA: our own kernel on the sparse tensor cores (mma.sp::ordered_metadata m16n8k32, float16 or
    bfloat16, float32 accumulation) with bias and activation fused in the epilogue; any number of
    tokens. On compute capability 9.0 (H100/H200) with an sm_90a build and out % 128 == 0, the Hopper
    kernel (wgmma.mma_async.sp, TMA, K split across SMs for few tokens); PYPRUNE_FAST_SPARSE24_KERNEL=mma_sp
    keeps the mma.sp one. CPU: W decompressed to float32 and one matmul. Both compute in float32 and round once to
    x's dtype. act: None, 'relu' or 'gelu' (exact: x/2 · (1 + erf(x/√2)), as nn.GELU()). in and out
    must be multiples of 64; x, values and bias of one dtype. Differentiable in x and bias (not in
    values). meta is trusted to come from compress_24 (decompress_24 validates it).

    Args:
        x: the input [..., in].
        values, meta: the weight, from compress_24.
        bias: [out], or None.
        activation: None, "relu" or "gelu".

    Returns:
        y [..., out] in x's dtype.
    """
    check_tensor("x", x)
    out, cols = check_compressed(values, meta)
    check_dtypes("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
    check_features_24(cols, out, "sparse24_linear")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise ValueError(f"x must be [..., {cols}] for a weight of {cols} input features, got shape {tuple(x.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"x is {x.dtype} but values is {values.dtype}")
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but values is on {values.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (out,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must be a [{out}] {x.dtype} tensor on {x.device}, got {tuple(bias.shape)} {bias.dtype} on "
                f"{bias.device}"
            )
    if x.is_cuda and x.dtype == torch.float32:
        raise TypeError("sparse24_linear on CUDA needs float16 or bfloat16 (the sparse tensor cores), got float32")
    if values.requires_grad and torch.is_grad_enabled():
        raise ValueError("sparse24_linear is not differentiable in values; freeze them (values.requires_grad_(False))")
    return launch_24(x, values, meta, bias, activation)


def launch_24(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    """sparse24_linear without its argument checks, for callers that hold validated weights and have
    checked x (SparseLinear.forward): a decode step calls it once per layer and token, where ~6 µs of
    Python checks per call would weigh as much as the kernel itself."""
    if _use_wgmma(x, values.shape[0]):
        return torch.ops.pyprune_fast.sparse24_linear_sm90(x, values, meta, bias, activation or "none")
    return call("sparse24_linear", x, x, values, meta, bias, activation or "none")


@functools.cache
def _hopper_device(index: int) -> str | None:
    """Why the wgmma.sp kernel cannot run on GPU `index`, or None when it can (decided once per device)."""
    capability = torch.cuda.get_device_capability(index)
    if capability != (9, 0):
        return f"cuda:{index} has compute capability {capability[0]}.{capability[1]}, the kernel needs 9.0"
    archs = re.split(r"[;\s]+", _extension.state()["cuda_archs"] or "")
    if not any(a.startswith("9.0a") for a in archs):
        return f"the library was built without 9.0a (CUDA archs {';'.join(archs)})"
    return None


def _use_wgmma(x: Tensor, out: int) -> bool:
    """Whether sparse24_linear runs on the Hopper kernel (sparse24_linear_sm90): CUDA float16/bfloat16 x,
    out % 128 == 0, a device and build that have it, and KERNEL_ENV not "mma_sp"."""
    choice = os.environ.get(KERNEL_ENV, "auto") or "auto"
    if choice not in KERNELS:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNELS)}, got {choice!r}")
    if choice == "mma_sp" or not x.is_cuda:
        return False
    why = _why_not_wgmma(x.device.index if x.device.index is not None else torch.cuda.current_device(), out)
    if why is not None and choice == "wgmma_sp":
        raise ValueError(f"{KERNEL_ENV}=wgmma_sp, but the Hopper kernel cannot run: {why}")
    return why is None


@functools.cache
def _why_not_wgmma(index: int, out: int) -> str | None:
    """Why the Hopper kernel cannot serve `out` output features on GPU `index`, or None (once per pair)."""
    why = _hopper_device(index)
    if why is None and out % 128:
        why = f"out features must be a multiple of 128, got {out}"
    if why is None and not native("sparse24_linear_sm90", torch.empty(0, device=f"cuda:{index}")):
        why = "the compiled library has no sparse24_linear_sm90"
    return why


def _fake_compress_24(w, mask=None):
    out, cols = w.shape
    return (
        w.new_empty((out, cols // 2)),
        w.new_empty((out // 16, cols // 32, 16), dtype=torch.int32),
        w.new_empty((), dtype=torch.int64),
    )


def _fake_decompress_24(values, meta):
    return values.new_empty((values.shape[0], 2 * values.shape[1])), values.new_empty((), dtype=torch.int64)


def _fake_sparse24_linear(x, values, meta, bias=None, activation="none"):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _setup_context(ctx, inputs, output):
    x, values, meta, bias, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, values, meta, bias, output)


def _backward(ctx, grad):
    x, values, meta, bias, y = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = grad * (y > 0)
    elif ctx.activation == "gelu":
        pre = torch.ops.pyprune_fast.sparse24_linear(x, values, meta, bias, "none")
        grad = torch.ops.aten.gelu_backward(grad.float(), pre.float()).to(grad.dtype)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w, _ = torch.ops.pyprune_fast.decompress_24(values, meta)
        grad_x = (grad.float() @ w.float()).to(x.dtype)
    if bias is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
    return grad_x, None, None, grad_bias, None


@when_loaded
def _register() -> None:
    torch.library.register_fake("pyprune_fast::compress_24", _fake_compress_24)
    torch.library.register_fake("pyprune_fast::decompress_24", _fake_decompress_24)
    torch.library.register_fake("pyprune_fast::sparse24_linear", _fake_sparse24_linear)
    torch.library.register_autograd("pyprune_fast::sparse24_linear", _backward, setup_context=_setup_context)
    if hasattr(torch.ops.pyprune_fast, "sparse24_linear_sm90"):  # a library built before it lacks the op
        torch.library.register_fake("pyprune_fast::sparse24_linear_sm90", _fake_sparse24_linear)
        torch.library.register_autograd("pyprune_fast::sparse24_linear_sm90", _backward, setup_context=_setup_context)
