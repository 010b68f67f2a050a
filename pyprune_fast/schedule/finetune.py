"""The plain training loop the schedules and the CLI use: AdamW over the batches, cycled, with the
masks kept (masks.keep)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import masks as masks_
from ..criteria.engine import default_loss
from ..modeling import split_batch, to_device


def finetune(
    model: nn.Module,
    batches: Sequence,
    steps: int,
    *,
    masks: Mapping[str, Tensor] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Trains `model` in place for `steps` optimizer steps, one batch a step, cycling through
    `batches` (each `(inputs, targets)` or bare inputs, as the criteria take them), with the loss
    `loss_fn(outputs, targets)` (default: cross-entropy on integer targets) and `forward(model,
    inputs)` (default `model(inputs)`). `masks` (parameter name -> bool keep-mask) are kept: the
    pruned weights stay exactly zero (masks.keep). The optimizer is AdamW(lr, weight_decay) over every
    parameter that requires a gradient unless one is given. The model is in train mode during the
    loop and back in its own mode after. Returns the loss of each step.

    Args:
        model: the model, trained in place.
        batches: the training batches.
        steps: optimizer steps.
        masks: keep-masks to keep.
        loss_fn: `loss_fn(outputs, targets)`.
        forward: `forward(model, inputs)`.
        lr, weight_decay: AdamW's.
        optimizer: an optimizer to use instead.

    Returns:
        The loss of each step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if steps and not batches:
        raise ValueError("finetune needs at least one batch (batches is empty)")
    if steps == 0:
        return []
    loss_fn = loss_fn or default_loss
    device = next(model.parameters()).device
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    losses = []
    kept = masks_.keep(model, masks) if masks else None
    try:
        model.train()
        for step in range(steps):
            inputs, targets = split_batch(batches[step % len(batches)])
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            outputs = forward(model, inputs) if forward is not None else model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        if kept is not None:
            kept.remove()
    return losses
