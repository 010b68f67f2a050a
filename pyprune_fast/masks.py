"""Keep-masks from scores (True = kept) and their application to a model.

Rule shared by every granularity and backend: exactly round(sparsity × N) entries of each group are
pruned, the lowest scores first; among equal scores the lower flat index (tensors in dict order, each
row-major) is pruned first; NaN is refused, ±inf are ordinary values, -0.0 equals 0.0. An empty score
dict gives an empty mask dict. `sparsity`: a real number in [0, 1] (a numpy scalar or a 0-d tensor
too)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import distributed, ops, reference
from .ops.checks import SCORE_TYPES, check_n_m, raise_on_nan


def _check_score_types(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validates that scores is a dict of name -> floating-point Tensor; returns it as a plain dict."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict of name -> Tensor, got {type(scores).__name__}")
    for name, s in scores.items():
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{name!r}] must be a Tensor, got {type(s).__name__}")
        if not s.is_floating_point():
            raise TypeError(f"scores[{name!r}] must be a floating-point tensor, got {s.dtype}")
    return dict(scores)


def check_sparsity(sparsity: object) -> float:
    """The sparsity as a float in [0, 1]: a real number (int, float, a numpy scalar or a 0-d real
    tensor); bools, NaN and values outside [0, 1] are a ValueError.

    Args:
        sparsity: the value to check.

    Returns:
        The sparsity as a float.
    """
    value = None
    if isinstance(sparsity, Tensor):
        if sparsity.dim() == 0 and sparsity.dtype != torch.bool and not sparsity.is_complex():
            value = float(sparsity)
    elif isinstance(sparsity, numbers.Real) and not isinstance(sparsity, (bool, np.bool_)):
        value = float(sparsity)
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return value


def _prepare(scores: Mapping[str, Tensor], sparsity: object) -> tuple[list[str], list[Tensor], list[str], float]:
    """Validates a score dict and a sparsity: (names, tensors in one dtype on one device, labels for
    errors, the sparsity as a float)."""
    scores = _check_score_types(scores)
    sparsity = check_sparsity(sparsity)
    names, tensors = list(scores), list(scores.values())
    for name, s in zip(names, tensors):
        if s.device != tensors[0].device:
            raise ValueError(f"scores[{name!r}] is on {s.device} but scores[{names[0]!r}] is on {tensors[0].device}")
    if tensors:
        dtype = tensors[0].dtype
        for s in tensors[1:]:
            dtype = torch.promote_types(dtype, s.dtype)
        tensors = [s if s.dtype == dtype else s.to(dtype) for s in tensors]
    return names, tensors, [f"scores[{n!r}]" for n in names], sparsity


def _refuse_nan(tensors: list[Tensor], labels: list[str]) -> None:
    if tensors:
        raise_on_nan(torch.stack([torch.isnan(t).sum() for t in tensors]).cpu(), labels)


def _targets(apply_to: nn.Module | Mapping[str, Tensor], names: list[str], tensors: list[Tensor]) -> list[Tensor]:
    """The parameters pruned in place: by score name, in a model or a dict; shapes must match."""
    if isinstance(apply_to, nn.Module):
        named = dict(apply_to.named_parameters())
    elif isinstance(apply_to, Mapping):
        named = dict(apply_to)
    else:
        raise TypeError(f"apply_to must be an nn.Module or a dict of name -> Tensor, got {type(apply_to).__name__}")
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"apply_to has no parameters named {missing}")
    targets = []
    for name, s in zip(names, tensors):
        p = named[name]
        if p.shape != s.shape:
            raise ValueError(f"apply_to[{name!r}] has shape {tuple(p.shape)} but its scores have {tuple(s.shape)}")
        if p.dtype not in SCORE_TYPES:
            raise TypeError(f"apply_to[{name!r}] must be float32, float16, bfloat16 or float64, got {p.dtype}")
        if p.device != s.device:
            raise ValueError(f"apply_to[{name!r}] is on {p.device} but its scores are on {s.device}")
        targets.append(p)
    return targets


def _ones(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.ones_like(t, dtype=torch.bool) for t in tensors]


def global_unstructured(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    apply_to: nn.Module | Mapping[str, Tensor] | None = None,
    group: object = None,
) -> dict[str, Tensor] | None:
    """One threshold over all tensors: exactly round(sparsity × total) entries pruned, the lowest first,
    ties by flat index (tensors in dict order, each row-major).

    The exact k-th smallest score comes from a radix select over all tensors (no concatenation, no
    sort) and the masks from one fused compare pass. With `apply_to=` (a model, or a dict of
    parameters, keyed like the scores) the pruned weights are zeroed in place instead and no mask is
    kept (returns None): for models whose masks would not fit.

    `group=` (a torch.distributed ProcessGroup, e.g. torch.distributed.group.WORLD): `scores` is this
    rank's part of the scores (layers split over ranks; a rank may hold none) and the threshold is
    global over all ranks: exactly round(sparsity × all ranks' entries) pruned, ties in rank order,
    then dict order, each row-major. Every rank gets its own masks (or prunes its own `apply_to`),
    bit for bit those of one process given every rank's scores in rank order. Only radix histograms
    (512 KiB a pass, 1-4 passes by dtype) and a few ints are exchanged, never the scores (see
    `pyprune_fast.distributed`); `sparsity` must be the same on every rank; an error on any rank
    (NaN, a bad argument) raises on every rank. None (the default): no communication.

    Args:
        scores: {name: floating-point scores}, higher = kept.
        sparsity: the fraction to prune, in [0, 1].
        apply_to: a model, or a dict of parameters, keyed like the scores: prune those in place
            instead of returning masks.
        group: a torch.distributed ProcessGroup whose ranks hold parts of the scores; None: this
            process holds them all.

    Returns:
        {name: bool keep-mask shaped like its scores}, or None with `apply_to`.
    """
    if group is not None:
        comm = distributed.Communicator(group)
        with comm.session():
            return _global_over_ranks(comm, scores, sparsity, apply_to)
    names, tensors, labels, sparsity = _prepare(scores, sparsity)
    targets = None if apply_to is None else _targets(apply_to, names, tensors)
    k = round(sparsity * sum(t.numel() for t in tensors))
    if k == 0:
        _refuse_nan(tensors, labels)
        return None if targets is not None else dict(zip(names, _ones(tensors)))
    value, counts = ops.select_counts(tensors, k, labels)
    if targets is not None:
        ops.threshold_apply_(targets, tensors, value, counts, k)
        return None
    return dict(zip(names, ops.threshold_masks(tensors, value, counts, k)))


def _global_over_ranks(
    comm: distributed.Communicator,
    scores: Mapping[str, Tensor],
    sparsity: float,
    apply_to: nn.Module | Mapping[str, Tensor] | None,
) -> dict[str, Tensor] | None:
    """global_unstructured(group=) inside the caller's `comm.session()` (its arguments checked there,
    so that a bad one on any rank raises on every rank): one session, never one nested in another,
    whose two closing exchanges would not pair up across ranks when only some of them failed."""
    names, tensors, labels, sparsity = _prepare(scores, sparsity)
    targets = None if apply_to is None else _targets(apply_to, names, tensors)
    masks = distributed.global_threshold(comm, tensors, sparsity, labels, targets)
    return None if masks is None else dict(zip(names, masks))


def _group_masks(scores, sparsity, apply_to, group_sizes, build):
    """Masks of a granularity whose groups lie inside single tensors; with apply_to, tensor by tensor
    so that only one tensor's mask exists at a time."""
    names, tensors, labels, sparsity = _prepare(scores, sparsity)
    counts = [round(sparsity * group_sizes(t)) for t in tensors]
    if apply_to is None:
        return dict(zip(names, build(tensors, counts, labels))) if tensors else {}
    targets = _targets(apply_to, names, tensors)
    with torch.no_grad():
        for target, t, count, label in zip(targets, tensors, counts, labels):
            target.masked_fill_(~build([t], [count], [label])[0], 0)
    return None


def layerwise(
    scores: Mapping[str, Tensor], sparsity: float, *, apply_to: nn.Module | Mapping[str, Tensor] | None = None
) -> dict[str, Tensor] | None:
    """Each tensor its own group: exactly round(sparsity × numel) entries pruned in each, lowest first,
    ties by flat index. `apply_to=` prunes in place instead (see global_unstructured).

    Args:
        scores: {name: floating-point scores}, higher = kept.
        sparsity: the fraction of each tensor to prune, in [0, 1].
        apply_to: a model, or a dict of parameters, keyed like the scores: prune those in place
            instead of returning masks.

    Returns:
        {name: bool keep-mask}, or None with `apply_to`.
    """
    return _group_masks(scores, sparsity, apply_to, lambda t: t.numel(), ops.layerwise_masks)


def per_row(
    scores: Mapping[str, Tensor], sparsity: float, *, apply_to: nn.Module | Mapping[str, Tensor] | None = None
) -> dict[str, Tensor] | None:
    """Each output row its own group (Wanda's rule): every tensor viewed as (out, -1) and exactly
    round(sparsity × row length) entries pruned in each row, lowest first, ties by lower index.
    `apply_to=` prunes in place instead (see global_unstructured).

    Args:
        scores: {name: floating-point scores}, higher = kept.
        sparsity: the fraction of each row to prune, in [0, 1].
        apply_to: a model, or a dict of parameters, keyed like the scores: prune those in place
            instead of returning masks.

    Returns:
        {name: bool keep-mask}, or None with `apply_to`.
    """
    return _group_masks(scores, sparsity, apply_to, lambda t: reference.rows_of(t).shape[1], ops.per_row_masks)


def channels(
    scores: Mapping[str, Tensor], sparsity: float, scope: str = "global", *, group: object = None
) -> dict[str, Tensor]:
    """Channel keep-masks from per-channel scores ({layer name: (C,) Tensor}, as the channel criteria
    return them): scope="global" prunes exactly round(sparsity × all channels) over every layer
    together, scope="layer" exactly round(sparsity × C) in each layer; lowest scores first, among
    equal scores the lower channel index (layers in dict order) first. A global scope may empty a
    layer whose scores are all low: normalize the scores per layer (normalize="lp") or use "layer".
    `group=` (scope="global" only): the layers are split over the ranks of a torch.distributed group
    and the threshold is global over all ranks (see global_unstructured); every argument is checked
    inside the distributed session, so a bad one on any rank raises on every rank.

    Args:
        scores: {layer name: (C,) floating-point scores}.
        sparsity: the fraction of channels to prune, in [0, 1].
        scope: "global" (one threshold over every layer) or "layer" (each layer alone).
        group: a torch.distributed ProcessGroup over which the layers are split (scope="global").

    Returns:
        {layer name: (C,) bool keep-mask}.
    """
    try:
        comm = None if group is None else distributed.Communicator(group)
    except (TypeError, ValueError):
        _check_scope(scope, group)  # no session can start: a bad scope is named before the bad group
        raise
    with distributed.session(comm):
        _check_scope(scope, group)
        if isinstance(scores, Mapping):
            wrong = {n: tuple(s.shape) for n, s in scores.items() if isinstance(s, Tensor) and s.dim() != 1}
            if wrong:
                raise ValueError(f"channel scores must be 1-D (one score per output channel), got shapes {wrong}")
        if scope == "layer":
            return layerwise(scores, sparsity)
        if comm is None:
            return global_unstructured(scores, sparsity)
        return _global_over_ranks(comm, scores, sparsity, None)


def _check_scope(scope: object, group: object) -> None:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if group is not None and scope != "global":
        raise ValueError(f"group= needs scope='global' (a per-layer scope needs no communication), got {scope!r}")


def n_m(scores: Mapping[str, Tensor], n: int = 2, m: int = 4) -> dict[str, Tensor]:
    """N:M semi-structured keep-masks: each tensor viewed as (out, -1), groups of m consecutive entries
    along a row, the n highest of each group kept (among equal scores the lower index is kept).
    One fused op for all tensors of a device (ops.nm_mask), NaN detected in the same pass.

    Args:
        scores: {name: floating-point scores}, each row's length divisible by m.
        n: entries kept in each group.
        m: the group size.

    Returns:
        {name: bool keep-mask}.
    """
    n, m = check_n_m(n, m)
    scores = _check_score_types(scores)
    for name, s in scores.items():
        row = reference.rows_of(s).shape[1]
        if row % m:
            raise ValueError(f"scores[{name!r}]: row length {row} (shape {tuple(s.shape)}) is not divisible by m={m}")
    by_device: dict[torch.device, list[str]] = {}
    for name, s in scores.items():
        by_device.setdefault(s.device, []).append(name)
    out = {}
    for names in by_device.values():  # one fused call per device (scores of a model split over GPUs)
        keep, nan = ops.nm_mask([scores[name] for name in names], n, m)
        raise_on_nan(nan, [f"scores[{name!r}]" for name in names])
        out.update(zip(names, keep))
    return {name: out[name] for name in scores}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Zeros, in place, every parameter entry whose mask is False; returns the model.

    Args:
        model: the model, changed in place.
        masks: {parameter name: bool keep-mask of its shape}.

    Returns:
        The model.
    """
    named = dict(model.named_parameters())
    unknown = [n for n in masks if n not in named]
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown}")
    for name, mask in masks.items():
        param = named[name]
        if mask.shape != param.shape:
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(mask.shape)} but the parameter has {tuple(param.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor (True = keep), got {mask.dtype}")
        param.masked_fill_(~mask.to(param.device), 0)
    return model


# the signed integer type of each element width: a parameter's bits are viewed as these to zero them
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _and_mask(name: str, param: Tensor, keep_mask: Tensor) -> Tensor:
    """keep_mask as an integer tensor of the parameter's element width: all ones where kept, 0 where
    pruned, so that `bits(t) &= and_mask` zeros exactly the pruned entries of t (NaN and ±inf too)."""
    bits = _BITS.get(param.element_size())
    if bits is None:
        raise TypeError(
            f"masks.keep: parameter {name!r} has dtype {param.dtype}; "
            f"it masks elements of 1, 2, 4 or 8 bytes, not {param.element_size()}"
        )
    return keep_mask.to(device=param.device, dtype=bits).neg_()


def _zero_pruned_(t: Tensor, and_mask: Tensor) -> None:
    """t's pruned entries set to +0 in place: one vectorized bitwise AND on t's bits (faster than a
    masked_fill with a bool mask on CPU, and exact where a multiplication by 0 would make NaN)."""
    t.view(and_mask.dtype).bitwise_and_(and_mask)


class KeptMasks:
    """The handle `keep` returns: while it is active, every `torch.optim` optimizer step leaves the
    pruned weights exactly zero. A context manager (removed on exit) with `.remove()`; `.masks` holds
    the keep-masks by parameter name."""

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        named = dict(model.named_parameters())
        apply_masks(model, masks)  # checks names, shapes and dtypes, and zeros the pruned weights now
        self._names = list(masks)
        # by parameter identity (an optimizer knows its parameters, not their names); fully kept
        # tensors are left out. Each mask is held once, as the integer AND mask of its parameter.
        self._pruned = {}
        self._kept = {}
        for name, mask in masks.items():
            param = named[name]
            if bool(mask.all()):
                self._kept[name] = param
            else:
                self._pruned[id(param)] = (param, _and_mask(name, param, mask), name)
        self._handles = [
            register_optimizer_step_pre_hook(self.mask_gradients),
            register_optimizer_step_post_hook(self.zero_weights),
        ]

    @property
    def masks(self) -> dict[str, Tensor]:
        """The keep-masks (bool, True = kept) by parameter name, on the parameters' devices."""
        out = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self._kept.items()}
        out.update({name: bits != 0 for _, bits, name in self._pruned.values()})
        return {name: out[name] for name in self._names}

    def _mine(self, optimizer: torch.optim.Optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                hit = self._pruned.get(id(p))
                if hit is not None and hit[0] is p:
                    yield p, self._fitted(p, hit[1], hit[2]), hit[2]

    def _fitted(self, p: Tensor, bits: Tensor, name: str) -> Tensor:
        """`bits` as the AND mask of `p` as it is now. model.half() or model.to(device) after keep()
        give the same Parameter other data: the mask follows, converted once (to the integer type of the
        new element width, on the new device). A shape changed since is refused naming the parameter:
        the mask no longer says which entries are pruned."""
        if bits.shape != p.shape:
            raise ValueError(
                f"masks.keep: parameter {name!r} has shape {tuple(p.shape)} now but {tuple(bits.shape)} when its "
                "mask was kept; remove() the handle and keep masks of the parameter's new shape"
            )
        if bits.element_size() != p.element_size() or bits.device != p.device:
            bits = _and_mask(name, p, bits != 0)
            self._pruned[id(p)] = (p, bits, name)
        return bits

    @torch.no_grad()
    def mask_gradients(self, optimizer: torch.optim.Optimizer, args=(), kwargs=None) -> None:
        """The step pre hook: the gradients of the pruned entries this optimizer holds set to 0."""
        for p, bits, _ in self._mine(optimizer):
            if p.grad is not None:
                _zero_pruned_(p.grad, bits)

    @torch.no_grad()
    def zero_weights(self, optimizer: torch.optim.Optimizer, args=(), kwargs=None) -> None:
        """The step post hook: the pruned entries this optimizer holds set to 0."""
        for p, bits, _ in self._mine(optimizer):
            _zero_pruned_(p, bits)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Stops keeping the masks; the model is left as it is (pruned weights zero), with nothing of
        the handle attached to it. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> KeptMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def keep(model: nn.Module, masks: Mapping[str, Tensor]) -> KeptMasks:
    """Keeps the pruned weights of `model` exactly zero while it is trained: zeros them now (as
    `apply_masks`), then around every `torch.optim` optimizer step that updates one of them, masks
    their gradients before the step and zeros them again after it. Returns a handle; use it as a
    context manager or call `.remove()`.

        with ppf.masks.keep(model, masks):
            for batch in data:
                loss_fn(model(batch)).backward()
                optimizer.step()
                optimizer.zero_grad()

    Mechanism, and why: two global optimizer step hooks (`torch.optim.optimizer.
    register_optimizer_step_pre_hook` / `..._post_hook`), which act only on the parameters of `masks`
    that the stepping optimizer holds.
    - Zeroing after the step is what guarantees the invariant, whatever the optimizer's rule: SGD's
      momentum and weight decay, Adam's and AdamW's moments (even moments carried over from training
      before the masks) move a pruned weight during the step and the post hook puts it back to 0.
    - Masking the gradient before the step keeps the optimizer's state of pruned entries at zero
      (momentum buffers, first and second moments), so the pruned entries cost no state drift and
      removing the handle later leaves no stale momentum behind. It runs once per step, after any
      number of accumulated backward passes and after DDP's all-reduce, so gradient accumulation and
      DistributedDataParallel need nothing special.
    - The zeroing is a bitwise AND of each tensor's bits with an integer mask of the same element
      width (all ones where kept, 0 where pruned): exact for every value (NaN and ±inf become +0,
      where multiplying by a 0/1 float mask would give NaN) and vectorized, faster than
      `masked_fill_` with a bool mask on CPU (benchmarks/README.md, "Keeping masks while training").
      The price is memory: each pruned tensor's mask takes
      the size of the tensor (a bool mask would take an eighth of an fp32 tensor).
    - Nothing is attached to the model: no parametrization (which would rename the state_dict keys
      and recompute `weight` at every forward), no tensor hooks (which torch.compile'd backward
      graphs and DDP's own gradient hooks interact with). A compiled model reads the zeroed
      parameters as it reads any parameter update. The cost is two masked passes over the pruned
      tensors per optimizer step (benchmarks/bench_schedule.py).
    Not covered: updates that bypass `torch.optim` (a hand-written `p -= lr * p.grad`); call
    `apply_masks(model, handle.masks)` after those.

    Args:
        model: the model to train.
        masks: {parameter name: bool keep-mask of its shape}.

    Returns:
        The KeptMasks handle.
    """
    return KeptMasks(model, masks)
