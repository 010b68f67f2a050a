"""SynFlow: data-free synaptic flow (Tanaka, Kunin, Yamins and Ganguli 2020, "Pruning neural networks
without any data by iteratively conserving synaptic flow", NeurIPS), single shot."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .engine import Job, first_tensor
from .registry import criterion


@criterion(needs=("input",))
def synflow(job: Job, *, input_shape: tuple[int, ...] | None = None) -> list[Tensor]:
    """S(w) = |∂R/∂w ⊙ w| with R = Σ model(1), computed on a float64 copy of the model whose every
    state-dict entry is made non-negative (|θ|), for an all-ones input of one sample's shape
    (`input_shape=`, or the shape of one sample of the first batch of `data`, whose inputs must then be
    floating point: a model of token ids has no all-ones input, ValueError).

    Single shot (the iterative schedule is not applied here). The user's model is not modified: the
    linearized network is a deep copy, so it costs one float64 copy of the model in memory."""
    if input_shape is None:
        if job.data is None:
            raise ValueError("synflow needs input_shape= (one sample's shape) or data to read it from")
        inputs, _ = next(job.batches())
        if not isinstance(inputs, Tensor):
            raise TypeError("synflow needs tensor inputs to build an all-ones input; pass input_shape=")
        if not inputs.is_floating_point():
            raise ValueError(
                f"synflow feeds the model an all-ones float64 input, but its data's inputs are {inputs.dtype} "
                "(token ids?): synflow needs a model that takes float inputs; score a token model with a "
                "data-based criterion (snip, wanda, magnitude, ...)"
            )
        input_shape = tuple(inputs.shape[1:])
    shape = tuple(int(d) for d in input_shape)
    linear = copy.deepcopy(job.model).double()
    with torch.no_grad():
        for value in linear.state_dict().values():
            if value.is_floating_point():
                value.abs_()
    params = dict(linear.named_parameters())
    weights = [params[n] for n in job.names]
    ones = torch.ones((1, *shape), dtype=torch.float64, device=job.device)
    outputs = job.forward(linear, ones) if job.forward is not None else linear(ones)
    total = first_tensor(outputs).sum()
    grads = torch.autograd.grad(total, weights, allow_unused=True)
    return [
        torch.zeros_like(w, dtype=torch.float32) if g is None else (g * w).detach().abs().float()
        for g, w in zip(grads, weights)
    ]
