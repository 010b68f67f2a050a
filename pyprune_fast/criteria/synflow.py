"""SynFlow: data-free synaptic flow (Tanaka, Kunin, Yamins and Ganguli 2020, "Pruning neural networks
without any data by iteratively conserving synaptic flow", NeurIPS), single shot."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modeling import first_tensor
from .engine import Job
from .registry import criterion


@criterion(needs=("input",))
def synflow(job: Job, *, input_shape: tuple[int, ...] | None = None) -> list[Tensor]:
    """S(w) = |∂R/∂w ⊙ w| with R = Σ model(1), computed on a float64 copy of the model whose every
    state-dict entry is made non-negative (|θ|), for an all-ones input of one sample's shape
    (`input_shape=`, or the shape of one sample of the first batch of `data`, whose inputs must then be
    floating point: a model of token ids has no all-ones input, ValueError).

    Single shot (the iterative schedule is not applied here). The user's model is not modified: the
    linearized network is the model run on float64 copies of |θ| (one float64 copy of its parameters
    and floating buffers in memory), not a deep copy of the model."""
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
    # The linearized network: the model itself run with float64 |θ| in place of its parameters and
    # floating buffers (torch.func.functional_call), so neither a deep copy of the model nor a change
    # to it; only the scored weights take gradients.
    scored = set(job.names)
    state = {}
    with torch.no_grad():
        for name, p in job.model.named_parameters():
            state[name] = p.detach().to(torch.float64, copy=True).abs_().requires_grad_(name in scored)
        for name, b in job.model.named_buffers():
            state[name] = b.to(torch.float64, copy=True).abs_() if b.is_floating_point() else b
    weights = [state[n] for n in job.names]
    ones = torch.ones((1, *shape), dtype=torch.float64, device=job.device)
    with torch.enable_grad():
        outputs = torch.func.functional_call(_Forward(job), {f"model.{n}": v for n, v in state.items()}, (ones,))
        total = first_tensor(outputs).sum()
    grads = torch.autograd.grad(total, weights, allow_unused=True)
    with torch.no_grad():
        return [
            torch.zeros_like(w, dtype=torch.float32) if g is None else g.mul_(w).abs_().float()
            for g, w in zip(grads, weights)
        ]


class _Forward(nn.Module):
    """The job's model behind its forward (job.forward(model, inputs), or model(inputs)), as one module
    that functional_call can run with other parameters."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        self.model = job.model
        self.forward_fn = job.forward

    def forward(self, inputs: Tensor):
        return self.forward_fn(self.model, inputs) if self.forward_fn is not None else self.model(inputs)
