"""The Python face of every op: argument checks, dispatch to the compiled kernels
(`torch.ops.pyprune_fast.*`) or to `reference`, and the fake (meta) implementations that make the ops
work under `torch.compile` and `torch.library.opcheck`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _extension, reference

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


class Stats(NamedTuple):
    """Statistics of the values an op wrote, as 0-d float64 tensors on the op's device (reading them
    does not synchronize until you call `.item()`). sum/sumsq/min/max cover the finite values."""

    count: Tensor
    sum: Tensor
    sumsq: Tensor
    min: Tensor
    max: Tensor
    nonfinite: Tensor
    nan: Tensor

    @classmethod
    def from_tensor(cls, stats: Tensor) -> Stats:
        return cls(*stats.unbind(0))

    def mean(self) -> Tensor:
        """Mean of the finite values."""
        return self.sum / (self.count - self.nonfinite).clamp_min(1)

    def std(self) -> Tensor:
        """Population standard deviation of the finite values."""
        n = (self.count - self.nonfinite).clamp_min(1)
        mean = self.sum / n
        return (self.sumsq / n - mean * mean).clamp_min(0).sqrt()


def _native(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and _extension.native_available(tensors[0].device.type)


def _as_list(name: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _check_float_list(name: str, tensors: Sequence[Tensor], types: tuple[torch.dtype, ...] = FLOAT_TYPES) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
        if t.dtype not in types:
            allowed = ", ".join(str(d).replace("torch.", "") for d in types)
            raise TypeError(f"{name}[{i}] must be one of {allowed}, got {str(t.dtype).replace('torch.', '')}")


def _check_same_device(named: dict[str, Sequence[Tensor]]) -> None:
    first = None
    for name, tensors in named.items():
        for i, t in enumerate(tensors):
            if first is None:
                first = (f"{name}[{i}]", t.device)
            elif t.device != first[1]:
                raise ValueError(f"{name}[{i}] is on {t.device} but {first[0]} is on {first[1]}")


def _check_saliency_args(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    _check_float_list("grads", grads)
    _check_float_list("weights", weights)
    if len(grads) != len(weights):
        raise ValueError(f"grads and weights must have the same length, got {len(grads)} and {len(weights)}")
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g.shape != w.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has shape {tuple(w.shape)}")
        if g.dtype != w.dtype:
            raise TypeError(f"grads[{i}] is {g.dtype} but weights[{i}] is {w.dtype}")
    _check_same_device({"grads": grads, "weights": weights})


def saliency(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> tuple[list[Tensor], Stats]:
    """Fused `|g ⊙ w|` over lists of tensors, with the statistics of all results in the same pass.

    Returns float32 scores shaped like the weights and `Stats` (count, sum, sumsq, min, max,
    nonfinite, nan) over all of them. Inputs: float32/float16/bfloat16, any strides; one kernel call
    for the whole list.
    """
    grads, weights = _as_list("grads", grads), _as_list("weights", weights)
    _check_saliency_args(grads, weights)
    if _native(weights):
        scores, stats = torch.ops.pyprune_fast.saliency(grads, weights)
    else:
        scores, stats = reference.saliency(grads, weights)
    return list(scores), Stats.from_tensor(stats)


def saliency_accumulate_(
    acc: Sequence[Tensor], grads: Sequence[Tensor], weights: Sequence[Tensor], *, scale: float = 1.0, power: int = 1
) -> Stats:
    """In place `acc_i += scale · |g_i ⊙ w_i|^power` (power 1 or 2; acc float32, shaped like the
    weights) and the statistics of the updated accumulators, in one pass."""
    acc, grads, weights = _as_list("acc", acc), _as_list("grads", grads), _as_list("weights", weights)
    _check_saliency_args(grads, weights)
    _check_float_list("acc", acc, (torch.float32,))
    if len(acc) != len(weights):
        raise ValueError(f"acc and weights must have the same length, got {len(acc)} and {len(weights)}")
    for i, (a, w) in enumerate(zip(acc, weights)):
        if a.shape != w.shape:
            raise ValueError(f"acc[{i}] has shape {tuple(a.shape)} but weights[{i}] has shape {tuple(w.shape)}")
    _check_same_device({"acc": acc, "weights": weights})
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if _native(weights):
        stats = torch.ops.pyprune_fast.saliency_accumulate_(acc, grads, weights, float(scale), int(power))
    else:
        stats = reference.saliency_accumulate_(acc, grads, weights, float(scale), int(power))
    return Stats.from_tensor(stats)


def _check_matrices(name: str, tensors: Sequence[Tensor], dims: tuple[int, ...] = (2,)) -> None:
    _check_float_list(name, tensors, FLOAT_TYPES + (torch.float64,))
    for i, t in enumerate(tensors):
        if t.dim() not in dims:
            expected = "a 2-d [N, D] matrix" if dims == (2,) else "[N, D] or [B, N, D]"
            raise ValueError(f"{name}[{i}] must be {expected}, got shape {tuple(t.shape)}")
        if t.shape[-1] == 0 or t.shape[-2] == 0:
            raise ValueError(f"{name}[{i}] must have N > 0 and D > 0 (its singular values), got shape {tuple(t.shape)}")


def _svd_mean_dtype(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors in one compute dtype: float64 if any is float64, else float32 (half inputs included)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dtype) for t in tensors]


def svd_mean(features: Tensor) -> Tensor:
    """Mean singular value of each matrix: F [B, N, D] -> [B] (or [N, D] -> 0-d), differentiable.

    value = Σ_i σ_i / k over the k = min(N, D) singular values, computed from the eigenvalues λ_i = σ_i²
    of the Gram matrix of the smaller side (F Fᵀ or FᵀF); gradient U Vᵀ / k = G^{-1/2} F / k (or
    F G^{-1/2} / k). Eigenvalues at or below k·eps·λ_max (the rounding level of the Gram matrix) count as
    zero, so rank-deficient and zero inputs have finite gradients (the minimum-norm subgradient).
    float32/float64; half inputs are computed in float32. Matrices with NaN or inf entries give NaN.
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    _check_matrices("features", [features], dims=(2, 3))
    (x,) = _svd_mean_dtype([features])
    if _native([x]):
        values, _ = torch.ops.pyprune_fast.svd_mean([x])
        return values.reshape(x.shape[:-2])
    return reference.svd_mean(features)


def svd_mean_list(features: Sequence[Tensor]) -> Tensor:
    """svd_mean of each [N, D_l] matrix of a list (the layers of one batch: one N, any widths D_l), as a
    1-d tensor, in one call: all matrices whose Gram matrices have the same size (N × N for every
    D_l ≥ N) share one batched eigendecomposition. Mixed float32/float64 inputs are computed in float64."""
    features = _as_list("features", features)
    if not features:
        raise ValueError("features must hold at least one [N, D] matrix")
    _check_matrices("features", features)
    for i, t in enumerate(features):
        if t.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"features[{i}] has N = {t.shape[0]} rows but features[0] has {features[0].shape[0]}: "
                "every matrix of svd_mean_list must have the same N"
            )
    _check_same_device({"features": features})
    xs = _svd_mean_dtype(features)
    if _native(xs):
        values, _ = torch.ops.pyprune_fast.svd_mean(xs)
        return values
    return reference.svd_mean_list(features)


SELECT_TYPES = FLOAT_TYPES + (torch.float64,)


def _check_select_args(name: str, tensors: Sequence[Tensor]) -> None:
    _check_float_list(name, tensors, SELECT_TYPES)
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor")
    for i, t in enumerate(tensors):
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{name}[{i}] is {t.dtype} but {name}[0] is {tensors[0].dtype}; all must have one dtype")
    _check_same_device({name: tensors})


def _raise_on_nan(nan: Tensor, names: Sequence[str]) -> None:
    """One synchronization for the whole call: ValueError naming the first tensor holding NaN."""
    if bool(nan.any()):
        first = int(torch.nonzero(nan)[0, 0])
        raise ValueError(f"{names[first]} contains NaN ({int(nan[first])} values); scores must not be NaN")


def select_counts(tensors: Sequence[Tensor], k: int, names: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
    """(value, counts): the k-th smallest value over all tensors and int64 [elements < value, elements ==
    value], on the tensors' device. NaN is refused with a ValueError naming the tensor."""
    names = names or [f"tensors[{i}]" for i in range(len(tensors))]
    if _native(tensors):
        value, counts, nan = torch.ops.pyprune_fast.kth_smallest_counts(list(tensors), int(k))
    else:
        value, counts, nan = reference.kth_smallest_counts(tensors, int(k))
    _raise_on_nan(nan, names)
    return value, counts


def _check_k(k: int, total: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of elements), got {k}")


def kth_smallest(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The exact k-th smallest value (1-based) over all elements of all tensors, as a 0-d tensor of
    their dtype, without concatenating or sorting them.

    Radix select on order-preserving integer keys: a few histogram passes over the tensors (one per
    16-bit digit on CPU, per 11-bit digit on CUDA), memory O(threads × bins). float32/float16/bfloat16/
    float64, any shapes and strides, empty tensors allowed, more than 2³¹ elements per tensor or in
    total. -0.0 and 0.0 are one value, ±inf ordinary values; NaN is refused (ValueError naming the
    tensor)."""
    tensors = _as_list("tensors", tensors)
    _check_select_args("tensors", tensors)
    _check_k(k, sum(t.numel() for t in tensors))
    return select_counts(tensors, k)[0]


def threshold_masks(tensors: Sequence[Tensor], value: Tensor, counts: Tensor, k: int) -> list[Tensor]:
    """Keep-masks (bool, shaped like the tensors) with the k lowest entries of all tensors pruned; among
    entries equal to the threshold the lower flat index (tensors in order, each row-major) is pruned
    first. value/counts: `select_counts(tensors, k)`. One fused compare pass; a second (tie-counting)
    pass only when the threshold value is partly pruned."""
    if _native(tensors):
        return list(torch.ops.pyprune_fast.threshold_masks(list(tensors), value, counts, int(k)))
    return reference.threshold_masks(tensors, value, counts, int(k))


@torch.no_grad()
def threshold_apply_(
    params: Sequence[Tensor], tensors: Sequence[Tensor], value: Tensor, counts: Tensor, k: int
) -> None:
    """The selection of `threshold_masks` applied in place: params[i] entries whose score tensors[i]
    entry is pruned are set to zero, without materializing the masks."""
    if not _native(tensors):
        for p, m in zip(params, reference.threshold_masks(tensors, value, counts, int(k))):
            p.masked_fill_(~m, 0)
        return
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    torch.ops.pyprune_fast.threshold_apply_(work, list(tensors), value, counts, int(k))
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def layerwise_masks(tensors: Sequence[Tensor], ks: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """Each tensor its own group: the ks[i] lowest entries of tensors[i] pruned (ties by flat index)."""
    if _native(tensors):
        masks, nan = torch.ops.pyprune_fast.layerwise_masks(list(tensors), [int(k) for k in ks])
    else:
        masks, nan = reference.layerwise_masks(tensors, ks)
    _raise_on_nan(nan, names)
    return list(masks)


def per_row_masks(tensors: Sequence[Tensor], counts: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """Each row of each tensor (viewed as (size(0), -1)) its own group: counts[i] lowest entries of
    every row of tensors[i] pruned, ties by lower index."""
    if _native(tensors):
        masks, nan = torch.ops.pyprune_fast.per_row_masks(list(tensors), [int(c) for c in counts])
    else:
        masks, nan = reference.per_row_masks(tensors, counts)
    _raise_on_nan(nan, names)
    return list(masks)


# --- N:M masks and 2:4 semi-structured sparsity (issue 5) ---------------------------------------

ACTIVATIONS = (None, "relu", "gelu")


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _check_n_m(n: object, m: object) -> tuple[int, int]:
    """n and m of an N:M pattern: ints with 0 <= n <= m and m >= 1."""
    n, m = _check_int("n", n), _check_int("m", m)
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"n:m must satisfy 0 <= n <= m and m >= 1, got {n}:{m}")
    return n, m


def nm_mask(scores: Sequence[Tensor], n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """N:M keep-flags of every tensor of a list in one fused pass: groups of m consecutive entries of
    each (row-major) tensor, the n highest of each group kept,

        rank_i = #{j : s_j > s_i} + #{j < i : s_j = s_i},   keep_i = rank_i < n

    (ties: the lower index is kept; -0.0 = 0.0; ±inf ordinary). Returns bool masks shaped like the
    scores and the number of NaN scores of each tensor (int64 [len(scores)], on the scores' device;
    masks.n_m refuses NaN). float32/float16/bfloat16/float64 scores, any strides.
    """
    scores = _as_list("scores", scores)
    _check_float_list("scores", scores, FLOAT_TYPES + (torch.float64,))
    n, m = _check_n_m(n, m)
    for i, s in enumerate(scores):
        if s.numel() % m:
            raise ValueError(f"scores[{i}] has {s.numel()} entries (shape {tuple(s.shape)}), not a multiple of m={m}")
    _check_same_device({"scores": scores})
    if not scores:
        return [], torch.zeros(0, dtype=torch.int64)
    if _native(scores):
        keep, nan = torch.ops.pyprune_fast.nm_mask(scores, n, m)
        return list(keep), nan
    return reference.nm_mask(scores, n, m)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    return t


def _check_compressed(values: Tensor, meta: Tensor) -> tuple[int, int]:
    """(out, in) of a compressed weight; values [out, in/2] float, meta int32 [out/16, in/32, 16]."""
    _check_tensor("values", values)
    _check_tensor("meta", meta)
    _check_float_list("values", [values])
    if values.dim() != 2 or values.shape[0] % 16 or (2 * values.shape[1]) % 32:
        raise ValueError(
            f"values must be [out, in/2] with out % 16 == 0 and in % 32 == 0, got shape {tuple(values.shape)}"
        )
    out, cols = values.shape[0], 2 * values.shape[1]
    if meta.dtype != torch.int32:
        raise TypeError(f"meta must be int32, got {meta.dtype}")
    if tuple(meta.shape) != (out // 16, cols // 32, 16):
        raise ValueError(
            f"meta must have shape {(out // 16, cols // 32, 16)} for values of shape {tuple(values.shape)}, "
            f"got {tuple(meta.shape)}"
        )
    if meta.device != values.device:
        raise ValueError(f"meta is on {meta.device} but values is on {values.device}")
    return out, cols


def check_features_24(in_features: int, out_features: int, what: str) -> None:
    """The shape limit of sparse24_linear (its kernel's 64-wide tiles): in and out multiples of 64."""
    if in_features % 64 or out_features % 64:
        raise ValueError(
            f"{what} needs in and out features that are multiples of 64, got in={in_features}, out={out_features}"
        )


def compress_24(w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """2:4 weight w [out, in] -> (values [out, in/2] in w's dtype, meta int32 [out/16, in/32, 16]).

    Each chunk of 4 consecutive entries of a row keeps its (at most two) non-zero entries, or with a
    mask its (exactly two) masked-in entries, in increasing position order; meta holds the positions
    i0 < i1 of each chunk as the nibble i0 | i1 << 2, laid out as the operand of
    mma.sp::ordered_metadata m16n8k32 (csrc/include/pyprune_fast/sparse24.h). w that is not 2:4 (or a
    mask that does not keep exactly 2 of 4) is a ValueError. out % 16 == 0 and in % 32 == 0;
    float16/bfloat16/float32.
    """
    _check_tensor("w", w)
    _check_float_list("w", [w])
    if w.dim() != 2 or w.shape[0] % 16 or w.shape[1] % 32:
        raise ValueError(f"w must be [out, in] with out % 16 == 0 and in % 32 == 0, got shape {tuple(w.shape)}")
    if mask is not None:
        _check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = keep), got {mask.dtype}")
        if mask.shape != w.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but w has shape {tuple(w.shape)}")
        if mask.device != w.device:
            raise ValueError(f"mask is on {mask.device} but w is on {w.device}")
    if _native([w]):
        values, meta, invalid = torch.ops.pyprune_fast.compress_24(w, mask)
    else:
        values, meta, invalid = reference.compress_24(w, mask)
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
    meta with an index pair that is not one of the six ordered pairs is a ValueError."""
    _check_compressed(values, meta)
    if _native([values]):
        dense, invalid = torch.ops.pyprune_fast.decompress_24(values, meta)
    else:
        dense, invalid = reference.decompress_24(values, meta)
    if int(invalid):
        raise ValueError(f"meta holds {int(invalid)} groups whose index pair is not an ordered 2:4 pair (i0 < i1)")
    return dense


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """y = act(x @ Wᵀ + b) with W [out, in] given compressed (compress_24), for x [..., in].

    CUDA: our own kernel on the sparse tensor cores (mma.sp::ordered_metadata m16n8k32, float16 or
    bfloat16, float32 accumulation) with bias and activation fused in the epilogue; any number of
    tokens. CPU: W decompressed to float32 and one matmul. Both compute in float32 and round once to
    x's dtype. act: None, 'relu' or 'gelu' (exact: x/2 · (1 + erf(x/√2)), as nn.GELU()). in and out
    must be multiples of 64; x, values and bias of one dtype. Differentiable in x and bias (not in
    values). meta is trusted to come from compress_24 (decompress_24 validates it).
    """
    _check_tensor("x", x)
    out, cols = _check_compressed(values, meta)
    _check_float_list("x", [x])
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
        _check_tensor("bias", bias)
        if bias.shape != (out,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must be a [{out}] {x.dtype} tensor on {x.device}, got {tuple(bias.shape)} {bias.dtype} on "
                f"{bias.device}"
            )
    if x.is_cuda and x.dtype == torch.float32:
        raise TypeError("sparse24_linear on CUDA needs float16 or bfloat16 (the sparse tensor cores), got float32")
    if values.requires_grad and torch.is_grad_enabled():
        raise ValueError("sparse24_linear is not differentiable in values; freeze them (values.requires_grad_(False))")
    act = activation or "none"
    if _native([x]):
        return torch.ops.pyprune_fast.sparse24_linear(x, values, meta, bias, act)
    return reference.sparse24_linear(x, values, meta, bias, act)


# --- fake (meta) implementations, registered once the library is loaded -------------------------


def _stats_like(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0].new_empty((len(reference.STATS_FIELDS),), dtype=torch.float64)


def _fake_saliency(grads, weights):
    return [torch.empty_like(w, dtype=torch.float32) for w in weights], _stats_like(weights)


def _fake_saliency_accumulate_(acc, grads, weights, scale=1.0, power=1):
    return _stats_like(weights)


def _fake_kth_smallest_counts(xs, k):
    return (
        xs[0].new_empty(()),
        xs[0].new_empty((2,), dtype=torch.int64),
        xs[0].new_empty((len(xs),), dtype=torch.int64),
    )


def _fake_threshold_masks(xs, value, counts, k):
    return [torch.empty_like(x, dtype=torch.bool, memory_format=torch.contiguous_format) for x in xs]


def _fake_threshold_apply_(params, xs, value, counts, k):
    return None


def _fake_group_masks(xs, counts):
    return _fake_threshold_masks(xs, None, None, 0), xs[0].new_empty((len(xs),), dtype=torch.int64)


# fake implementations and autograd of the N:M and 2:4 ops (issue 5)


def _fake_nm_mask(scores, n, m):
    device = scores[0].device if scores else torch.device("cpu")
    return [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in scores], torch.empty(
        len(scores), dtype=torch.int64, device=device
    )


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


def _setup_sparse24_linear(ctx, inputs, output):
    x, values, meta, bias, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, values, meta, bias, output)


def _backward_sparse24_linear(ctx, grad):
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


def _fake_svd_mean(features):
    total = sum(f.shape[0] if f.dim() == 3 else 1 for f in features)
    factors = []
    for f in features:
        n = torch.sym_min(f.shape[-2], f.shape[-1])
        factors.append(f.new_empty((*f.shape[:-2], n, n)))
    return features[0].new_empty((total,)), factors


def _fake_svd_mean_backward(grad, features, factors):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features]


# --- autograd of svd_mean -----------------------------------------------------------------------


def _svd_mean_setup_context(ctx, inputs, output):
    (features,) = inputs
    _, factors = output
    ctx.count = len(features)
    ctx.save_for_backward(*features, *factors)


def _svd_mean_backward(ctx, grad_values, _grad_factors):
    saved = ctx.saved_tensors
    features, factors = list(saved[: ctx.count]), list(saved[ctx.count :])
    return (torch.ops.pyprune_fast.svd_mean_backward(grad_values, features, factors),)


def _register_python_side() -> None:
    """Called by _extension after the compiled library has defined the ops."""
    torch.library.register_fake("pyprune_fast::saliency", _fake_saliency)
    torch.library.register_fake("pyprune_fast::saliency_accumulate_", _fake_saliency_accumulate_)
    torch.library.register_fake("pyprune_fast::kth_smallest_counts", _fake_kth_smallest_counts)
    torch.library.register_fake("pyprune_fast::threshold_masks", _fake_threshold_masks)
    torch.library.register_fake("pyprune_fast::threshold_apply_", _fake_threshold_apply_)
    torch.library.register_fake("pyprune_fast::layerwise_masks", _fake_group_masks)
    torch.library.register_fake("pyprune_fast::per_row_masks", _fake_group_masks)

    # N:M and 2:4 ops (issue 5)
    torch.library.register_fake("pyprune_fast::nm_mask", _fake_nm_mask)
    torch.library.register_fake("pyprune_fast::compress_24", _fake_compress_24)
    torch.library.register_fake("pyprune_fast::decompress_24", _fake_decompress_24)
    torch.library.register_fake("pyprune_fast::sparse24_linear", _fake_sparse24_linear)
    torch.library.register_autograd(
        "pyprune_fast::sparse24_linear", _backward_sparse24_linear, setup_context=_setup_sparse24_linear
    )

    torch.library.register_fake("pyprune_fast::svd_mean", _fake_svd_mean)
    torch.library.register_fake("pyprune_fast::svd_mean_backward", _fake_svd_mean_backward)
    torch.library.register_autograd("pyprune_fast::svd_mean", _svd_mean_backward, setup_context=_svd_mean_setup_context)
