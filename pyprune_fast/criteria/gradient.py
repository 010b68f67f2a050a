"""Criteria from the gradient (and curvature) of the loss: SNIP, GraSP, OBD."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import _compat, ops
from ..modeling import first_tensor
from .backward import RunningSum, backward_each, with_last
from .engine import Job, as_float32, grads_of, require_reiterable
from .registry import criterion


def loss_gradient(job: Job, temperature: float | None = None) -> list[Tensor]:
    """g = Σ_batches ∂L/∂w (float32), L = loss_fn(outputs [/ temperature], targets); with group=, the
    batches of every rank (`Job.reduce`). Each batch's gradients are added to the sums inside its
    backward pass, so only the sums and the gradients in flight are resident."""
    total = RunningSum(job.tensors)
    for inputs, targets in job.batches():
        outputs = job.run(inputs)
        if temperature is not None:
            outputs = first_tensor(outputs) / temperature
        total.backward(job.loss(outputs, targets))
    return job.reduce(total.value())


@criterion(needs=("data", "loss"))
def snip(job: Job) -> list[Tensor]:
    """SNIP (Lee, Ajanthan and Torr 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR): S(w) = |(Σ_b ∂L_b/∂w) ⊙ w|, the gradient summed over the batches before the
    absolute value.

    Equal to |∂L/∂m| at m = 1 for the mask m in w ⊙ m. Computed by the fused saliency op inside the
    last batch's backward pass: as each weight's gradient is accumulated it is added to that weight's
    running sum over the earlier batches (none for a single batch), the score |Σg ⊙ w| is written and
    the gradient and the sum are released (the batches are read one ahead to know the last). With
    group=, the sums are reduced over the ranks first, so the scores are formed after the backward."""
    if job.comm is not None:
        grads = loss_gradient(job)
        scores, _ = ops.saliency(grads, as_float32(job.tensors))
        return scores
    total = RunningSum(job.tensors)
    scores: list[Tensor | None] = [None] * len(job.tensors)

    def score(i: int, grad: Tensor) -> None:
        g = total.add(i, grad)
        total.take(i)
        w = job.tensors[i].detach()
        scores[i] = ops.saliency([g], [w if w.dtype == torch.float32 else w.float()])[0][0]

    for (inputs, targets), last in with_last(job.batches()):
        loss = job.loss(job.run(inputs), targets)
        backward_each(loss, job.tensors, score if last else total.add)
    return [
        ops.saliency([total.take(i)], [as_float32([w])[0]])[0][0] if s is None else s
        for i, (s, w) in enumerate(zip(scores, job.tensors))
    ]


@criterion(needs=("data", "loss"))
def grasp(job: Job, *, temperature: float = 200.0) -> list[Tensor]:
    """GraSP (Wang, Zhang and Grosse 2020, "Picking Winning Tickets Before Training by Preserving
    Gradient Flow", ICLR), returned as S(w) = w ⊙ (H g) so that lower is pruned.

    g = Σ_b ∇L_b and H g = Σ_b ∇(∇L_b · stopgrad(g)) from a second pass (Hessian-vector product by
    double backward), with L_b = loss_fn(outputs_b / temperature, targets_b). This is the negation of
    the paper's S = -w ⊙ Hg, whose largest entries the paper removes. Two passes over `data`, so
    data must be re-iterable (a list or a DataLoader, not a generator).

    Memory: g is needed whole by the second pass, so its float32 sum (one gradient-sized buffer) is
    kept from the first pass to the end; the per-batch gradients of both passes are added to their sums
    inside the backward pass and released (the second pass's differentiable gradients ∇L_b live in its
    graph until Hg has been accumulated)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    require_reiterable(job.data, "grasp", "the gradient g, then the Hessian-vector product Hg")
    g = loss_gradient(job, temperature)
    hg = RunningSum(job.tensors)
    # Double backward: the fused attention kernels have no second derivative, the math one does.
    with sdpa_kernel(SDPBackend.MATH):
        for inputs, targets in job.batches():
            outputs = first_tensor(job.run(inputs)) / temperature
            grads = grads_of(job.loss(outputs, targets), job.tensors, create_graph=True)
            z = sum((gb.float() * gi).sum() for gb, gi in zip(grads, g))
            del grads
            hg.backward(z)
    return [w.detach().float() * h for w, h in zip(job.tensors, job.reduce(hg.value()))]


@criterion(needs=("data", "loss"))
def obd(job: Job) -> list[Tensor]:
    """Optimal Brain Damage (LeCun, Denker and Solla 1990, NeurIPS 2) with the empirical Fisher:
    S(w) = ½ · F_diag · w², where F_diag = (1/B) Σ_b (∂L_b/∂w)² over the B batches (per-batch
    gradients, squared, averaged).

    Accumulated by the fused saliency op (acc += ½ |g_b ⊙ w|²) inside each batch's backward pass, one
    weight at a time as its gradient is accumulated, the gradient released at once."""
    acc: list[Tensor | None] = [None] * len(job.tensors)

    def add(i: int, grad: Tensor) -> None:
        (g, w) = as_float32([grad, job.tensors[i]])
        if acc[i] is None:  # allocated when first reached, as the activations are being freed
            acc[i] = torch.zeros_like(w)
        ops.saliency_accumulate_([acc[i]], [g], [w], scale=0.5, power=2)

    count = 0
    for inputs, targets in job.batches():
        backward_each(job.loss(job.run(inputs), targets), job.tensors, add)
        count += 1
    acc = [torch.zeros_like(w, dtype=torch.float32) if a is None else a for a, w in zip(acc, job.tensors)]
    batches = torch.tensor([float(count)], dtype=torch.float64, device=acc[0].device)
    job.reduce([*acc, batches])
    _compat.foreach_mul_(acc, 1.0 / float(batches))
    return acc
