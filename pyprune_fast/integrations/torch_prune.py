"""A drop-in for `torch.nn.utils.prune.global_unstructured` that selects with pyprune_fast's exact
radix select instead of concatenating every score and calling `torch.topk`.

    from pyprune_fast.integrations import torch_prune
    torch_prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.9)

Same signature, errors and results as torch's function, including its reparametrization
(`weight_orig` parameter, `weight_mask` buffer, forward pre-hook; repeated calls combine masks) and
its rule that only entries not yet pruned compete: `amount` is a fraction of (or a number of) the
entries whose current mask is 1. Differences, both deliberate: among equal scores the lower flat
index (parameters in order, each row-major) is pruned first, where `torch.topk` picks arbitrarily;
and NaN scores are refused (ValueError) instead of being treated as the largest. Every argument is
checked before any module changes (torch's function can fail half-way, leaving some parameters
pruned): an empty `parameters` is a ValueError, `amount=True` a TypeError (as in torch), an importance
score that is not a real tensor of its parameter's shape a TypeError or ValueError naming it; integer
scores are accepted, as torch accepts them. Pruning methods other than L1Unstructured
(RandomUnstructured, custom methods) are handed to torch unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from .. import _compat, ops


def _unpruned_scores(importance: list[Tensor], masks: list[Tensor | None]) -> list[Tensor]:
    """|score| of the entries that still compete: all of them, or those whose mask is 1."""
    return [s.detach().abs() if m is None else s.detach().abs()[m == 1] for s, m in zip(importance, masks)]


def _targets(parameters: list) -> list[tuple[nn.Module, str]]:
    """The (module, name) pairs, each naming a parameter of its module (or one already pruned)."""
    if not parameters:
        raise ValueError("global_unstructured(): parameters is empty; expected at least one (module, name) pair")
    for i, entry in enumerate(parameters):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"parameters[{i}] must be a (module, name) pair, got {entry!r}")
        module, name = entry
        if not isinstance(module, nn.Module) or not isinstance(name, str):
            raise TypeError(
                f"parameters[{i}] must be a (torch.nn.Module, str) pair, got ({type(module).__name__}, {name!r})"
            )
        if not hasattr(module, name):
            raise AttributeError(f"parameters[{i}]: {type(module).__name__!r} object has no attribute {name!r}")
        pruned = isinstance(getattr(module, name + "_mask", None), Tensor)
        if not pruned and not isinstance(module._parameters.get(name), nn.Parameter):
            raise TypeError(
                f"parameters[{i}]: {type(module).__name__}.{name} is a {type(getattr(module, name)).__name__}, not a "
                "parameter; only parameters can be pruned"
            )
    return [tuple(entry) for entry in parameters]


def _importance(parameters: list[tuple[nn.Module, str]], importance_scores: dict, labels: list[str]) -> list[Tensor]:
    """Each parameter's importance (its own value by default), checked: a real-valued tensor of the
    parameter's shape; integer scores become float64 (exact up to 2**53)."""
    out = []
    for (module, name), label in zip(parameters, labels):
        param = getattr(module, name)
        score = importance_scores.get((module, name), param)
        if not isinstance(score, Tensor):
            raise TypeError(f"{label} must be a Tensor, got {type(score).__name__}")
        if score.dtype == torch.bool or score.is_complex():
            raise TypeError(f"{label} must be a real-valued tensor, got {score.dtype}")
        if score.shape != param.shape:
            raise ValueError(f"{label} has shape {tuple(score.shape)}; expected the parameter's {tuple(param.shape)}")
        out.append(score if score.is_floating_point() else score.to(torch.float64))
    return out


def global_unstructured(parameters, pruning_method, importance_scores=None, **kwargs) -> None:
    """`torch.nn.utils.prune.global_unstructured` with pyprune_fast's selection (see the module doc).
    Every argument is checked before any module is changed: an error leaves the model as it was.

    Args:
        parameters: (module, name) pairs.
        pruning_method: a torch.nn.utils.prune method class (L1Unstructured takes our selection).
        importance_scores: {(module, name): scores}; default each parameter itself.
        **kwargs: the method's arguments (amount).

    Returns:
        None; the modules are reparametrized in place, as torch does.
    """
    if not isinstance(parameters, Iterable):
        raise TypeError("global_unstructured(): parameters is not an Iterable")
    importance_scores = importance_scores if importance_scores is not None else {}
    if not isinstance(importance_scores, dict):
        raise TypeError("global_unstructured(): importance_scores must be of type dict")
    parameters = list(parameters)
    method = pruning_method(**kwargs)
    if method.PRUNING_TYPE != "unstructured":
        raise TypeError(
            'Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. '
            f"Found method {pruning_method} of type {method.PRUNING_TYPE}"
        )
    if type(method) is not prune.L1Unstructured:
        return prune.global_unstructured(parameters, pruning_method, importance_scores=importance_scores, **kwargs)
    if isinstance(method.amount, bool):
        raise TypeError(f"Invalid type for amount: {method.amount!r}. Must be int or float, not bool.")

    parameters = _targets(parameters)
    labels = [
        f"importance of {type(module).__name__}.{name} (parameters[{i}])" for i, (module, name) in enumerate(parameters)
    ]
    importance = _importance(parameters, importance_scores, labels)
    masks = [getattr(module, name + "_mask", None) for module, name in parameters]
    candidates = _unpruned_scores(importance, masks)
    competing = sum(c.numel() for c in candidates)
    count = _compat.prune_amount(method.amount, competing)
    if count == 0:
        keeps = [torch.ones_like(c, dtype=torch.bool) for c in candidates]
    else:
        dtype = candidates[0].dtype
        for c in candidates[1:]:
            dtype = torch.promote_types(dtype, c.dtype)
        candidates = [c.to(dtype) for c in candidates]
        value, counts = ops.select_counts(candidates, count, labels)
        keeps = ops.threshold_masks(candidates, value, counts, count)
    for (module, name), mask, keep in zip(parameters, masks, keeps):
        param = getattr(module, name)
        if mask is None:
            new_mask = keep.to(param.dtype).view_as(param)
        else:
            new_mask = mask.to(param.dtype).clone()
            new_mask[mask == 1] = keep.to(param.dtype)
        prune.custom_from_mask(module, name, mask=new_mask)
    return None
