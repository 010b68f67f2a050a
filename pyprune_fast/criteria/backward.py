"""Gradients consumed inside the backward pass: each scored tensor's gradient is handed to the
criterion as soon as autograd has accumulated it (PyTorch's post-accumulate-grad hooks) and released
at once, so the full set of gradients is never resident; the running sums over batches are the only
gradient-sized buffers a criterion keeps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def check_objective(objective: Tensor) -> Tensor:
    """The objective as a 0-d tensor; ValueError unless it is a scalar with a gradient path."""
    if not isinstance(objective, Tensor) or objective.numel() != 1:
        raise ValueError(
            f"the objective must be a scalar tensor, got {type(objective).__name__} "
            f"{tuple(objective.shape) if isinstance(objective, Tensor) else ''}"
        )
    if not objective.requires_grad:
        raise ValueError("the objective does not depend on any scored parameter (no gradient path)")
    return objective.reshape(())


def backward_each(
    objective: Tensor,
    tensors: Sequence[Tensor],
    on_grad: Callable[[int, Tensor], None],
    *,
    retain_graph: bool = False,
) -> None:
    """Backpropagates `objective` into the leaf tensors `tensors` only, calling `on_grad(i, ∂objective/∂tensors[i])`
    as soon as that gradient is accumulated; the gradient is dropped from `.grad` before the call, so
    it is freed when on_grad keeps no reference. Tensors the objective does not reach get no call.
    Each tensor's `.grad` (None or a tensor) is set aside before and put back, the same object, after."""
    objective = check_objective(objective)
    tensors = list(tensors)
    saved = [t.grad for t in tensors]
    handles = []
    try:
        for t in tensors:
            t.grad = None
        for i, t in enumerate(tensors):

            def hook(leaf: Tensor, i: int = i) -> None:
                grad, leaf.grad = leaf.grad, None
                on_grad(i, grad)

            handles.append(t.register_post_accumulate_grad_hook(hook))
        objective.backward(inputs=tensors, retain_graph=retain_graph)
    finally:
        for h in handles:
            h.remove()
        for t, g in zip(tensors, saved):
            t.grad = g


class RunningSum:
    """Σ over batches of each tensor's gradient, in float32, filled inside the backward pass: a
    float32 gradient becomes the first batch's sum without a copy, later ones are added in place."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        self.total: list[Tensor | None] = [None] * len(self.tensors)

    def add(self, i: int, grad: Tensor) -> Tensor:
        """Adds one gradient of tensor i and returns its running sum."""
        grad = grad.detach()
        if self.total[i] is None:
            self.total[i] = grad if grad.dtype == torch.float32 else grad.float()
        else:
            self.total[i].add_(grad)
        return self.total[i]

    def take(self, i: int) -> Tensor:
        """Tensor i's sum (zeros if no batch reached it), dropped from this accumulator."""
        total, self.total[i] = self.total[i], None
        return torch.zeros_like(self.tensors[i], dtype=torch.float32) if total is None else total

    def backward(self, objective: Tensor, *, retain_graph: bool = False) -> None:
        """Adds ∂objective/∂tensors, one tensor at a time as the backward pass reaches it."""
        backward_each(objective, self.tensors, self.add, retain_graph=retain_graph)

    def value(self) -> list[Tensor]:
        return [self.take(i) for i in range(len(self.tensors))]


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """(item, is_last) for each item, reading one item ahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True
