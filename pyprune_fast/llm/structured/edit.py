"""Changing a model's shapes for real, with an undo log: every Linear replaced by a smaller one and
every attribute set goes through an `Edits` object, which puts the originals back when a run fails
(the replaced modules are kept, nothing is copied)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_MISSING = object()


class Edits:
    """The changes made to a model, in order; `undo()` reverts them all (last first)."""

    def __init__(self) -> None:
        self._log: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        """setattr(owner, name, value), remembered (a submodule, a config field or an attribute)."""
        old = getattr(owner, name, _MISSING)
        self._log.append((owner, name, old))
        setattr(owner, name, value)

    def replace(self, root: nn.Module, path: str, module: nn.Module) -> None:
        """The submodule at `path` (relative to `root`) replaced by `module`."""
        parent_name, _, child = path.rpartition(".")
        self.set(root.get_submodule(parent_name) if parent_name else root, child, module)

    def undo(self) -> None:
        for owner, name, old in reversed(self._log):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._log.clear()


@torch.no_grad()
def new_linear(
    linear: nn.Linear,
    weight: Tensor,
    bias: Tensor | None | bool = True,
) -> nn.Linear:
    """A Linear holding `weight` [out, in] on `linear`'s device and dtype; `bias`: a tensor, True (zeros),
    False/None (no bias)."""
    out_features, in_features = weight.shape
    has_bias = bias is not None and bias is not False
    new = nn.Linear(in_features, out_features, bias=has_bias, device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(weight)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if has_bias:
        new.bias.copy_(bias if isinstance(bias, Tensor) else torch.zeros(out_features))
    return new


def rows(linear: nn.Linear, keep: Tensor) -> nn.Linear:
    """`linear` with only the output rows `keep` (its bias entries with them)."""
    keep = keep.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias[keep]
    return new_linear(linear, linear.weight[keep], bias)


def with_bias(linear: nn.Linear) -> nn.Linear:
    """`linear` given a zero bias (itself when it has one)."""
    if linear.bias is not None:
        return linear
    return new_linear(linear, linear.weight, True)
