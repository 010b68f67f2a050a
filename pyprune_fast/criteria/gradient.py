"""Criteria from the gradient (and curvature) of the loss: SNIP, GraSP, OBD."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from .engine import GradSum, Job, as_float32, first_tensor, grads_of, require_reiterable
from .registry import criterion


def loss_gradient(job: Job, temperature: float | None = None) -> list[Tensor]:
    """g = Σ_batches ∂L/∂w (float32), L = loss_fn(outputs [/ temperature], targets); with group=, the
    batches of every rank (`Job.reduce`)."""
    total = GradSum()
    for inputs, targets in job.batches():
        outputs = job.run(inputs)
        if temperature is not None:
            outputs = first_tensor(outputs) / temperature
        total.add(grads_of(job.loss(outputs, targets), job.tensors))
    return job.reduce(total.value())


@criterion(needs=("data", "loss"))
def snip(job: Job) -> list[Tensor]:
    """SNIP (Lee, Ajanthan and Torr 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR): S(w) = |∂L/∂w ⊙ w|, the gradient summed over the batches.

    Equal to |∂L/∂m| at m = 1 for the mask m in w ⊙ m. Computed by the fused saliency op."""
    grads = loss_gradient(job)
    scores, _ = ops.saliency(grads, as_float32(job.tensors))
    return scores


@criterion(needs=("data", "loss"))
def grasp(job: Job, *, temperature: float = 200.0) -> list[Tensor]:
    """GraSP (Wang, Zhang and Grosse 2020, "Picking Winning Tickets Before Training by Preserving
    Gradient Flow", ICLR), returned as S(w) = w ⊙ (H g) so that lower is pruned.

    g = Σ_b ∇L_b and H g = Σ_b ∇(∇L_b · stopgrad(g)) from a second pass (Hessian-vector product by
    double backward), with L_b = loss_fn(outputs_b / temperature, targets_b). This is the negation of
    the paper's S = -w ⊙ Hg, whose largest entries the paper removes. Two passes over `data`, so
    data must be re-iterable (a list or a DataLoader, not a generator)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    require_reiterable(job.data, "grasp", "the gradient g, then the Hessian-vector product Hg")
    g = loss_gradient(job, temperature)
    hg = GradSum()
    # Double backward: the fused attention kernels have no second derivative, the math one does.
    with sdpa_kernel(SDPBackend.MATH):
        for inputs, targets in job.batches():
            outputs = first_tensor(job.run(inputs)) / temperature
            grads = grads_of(job.loss(outputs, targets), job.tensors, create_graph=True)
            z = sum((gb.float() * gi).sum() for gb, gi in zip(grads, g))
            hg.add(grads_of(z, job.tensors))
    return [w.detach().float() * h for w, h in zip(job.tensors, job.reduce(hg.value()))]


@criterion(needs=("data", "loss"))
def obd(job: Job) -> list[Tensor]:
    """Optimal Brain Damage (LeCun, Denker and Solla 1990, NeurIPS 2) with the empirical Fisher:
    S(w) = ½ · F_diag · w², where F_diag = (1/B) Σ_b (∂L_b/∂w)² over the B batches (per-batch
    gradients, squared, averaged).

    Accumulated batch by batch by the fused saliency op (acc += ½ |g_b ⊙ w|²)."""
    weights = as_float32(job.tensors)
    acc = [torch.zeros_like(w) for w in weights]
    count = 0
    for inputs, targets in job.batches():
        grads = grads_of(job.loss(job.run(inputs), targets), job.tensors)
        ops.saliency_accumulate_(acc, as_float32(grads), weights, scale=0.5, power=2)
        count += 1
    batches = torch.tensor([float(count)], dtype=torch.float64, device=weights[0].device)
    job.reduce([*acc, batches])
    torch._foreach_mul_(acc, 1.0 / float(batches))
    return acc
