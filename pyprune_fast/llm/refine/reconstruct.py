"""Reconstruction after masking: the kept weights of a masked block adjusted so that it reproduces the
dense block on the calibration inputs, the masks kept exactly (pruned weights stay 0).

    "linear"  per Linear, closed form: each row's masked least squares on its kept support S,
              min over ŵ_S of (w − ŵ) A (w − ŵ)ᵀ, A = XᵀX + λI (λ = percdamp · mean diag XᵀX, SparseGPT's
              dampening), i.e. A_SS ŵ_S = (A w)_S — the solve SparseGPT's OBS sweep approximates column
              by column, done exactly for the final mask. Every row is solved at once by batched
              conjugate gradients preconditioned by diag A (`iterations`, from the method's weights);
              kept only where the undamped layer error falls.
    "block"   the block's output (Wanda++'s regional optimisation, Yang et al. 2025): `steps` Adam steps,
              one calibration batch each, on L = ‖f(X; Ŵ) − Y‖² / ‖Y‖² (Y the dense block's outputs),
              the gradients of pruned weights zeroed so they stay 0.
    "parts"   as "block", the loss summed over the outputs of the block's parts (its first-level
              modules holding Linears: attention and MLP), each against the dense part's output: the
              attention and the MLP reconstructed separately.

The gradient modes keep their result only when the block's output error over every calibration batch
falls; all three report their own error before and after (the Gain)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...modeling import first_tensor
from .base import BlockStep, Gain, Refinement
from .swap import layer_error

MODES = ("linear", "block", "parts")


@torch.no_grad()
def masked_least_squares_(
    weight: Tensor, keep: Tensor, dense: Tensor, xtx: Tensor, percdamp: float = 0.01, iterations: int = 30
) -> tuple[float, float]:
    """Solves every row's masked least squares (module docstring, "linear") in place by preconditioned
    conjugate gradients from the current weights; the weights change only when the undamped error
    Σ_r (w_r − ŵ_r) XᵀX (w_r − ŵ_r)ᵀ falls. Returns that error before and after."""
    work = torch.promote_types(weight.dtype, torch.float32)
    x, w, h = weight.detach().to(work).clone(), dense.detach().to(work), xtx.detach().to(work)
    keep = keep.to(x.device)
    a = h.clone()
    a.diagonal().add_(percdamp * float(h.diagonal().mean()) + torch.finfo(work).tiny)
    precondition = a.diagonal().reciprocal()
    r = ((w - x) @ a) * keep
    z = r * precondition
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(iterations):
        q = (p @ a) * keep
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(torch.finfo(work).tiny), torch.zeros_like(pq))
        x.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), q, value=-1.0)
        z = r * precondition
        rz, previous = (r * z).sum(1), rz
        beta = torch.where(previous > 0, rz / previous.clamp_min(torch.finfo(work).tiny), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
    before = float(layer_error(w, weight.detach().to(work), h).sum())
    after = float(layer_error(w, x, h).sum())
    if not after < before:
        return before, before
    weight.copy_(x.masked_fill(~keep, 0).to(weight.dtype))
    return before, after


def parts(block: nn.Module) -> dict[str, nn.Module]:
    """The block's first-level modules that are or hold Linear layers (attention, MLP; OPT's fc1, fc2)."""
    return {
        n: m
        for n, m in block.named_children()
        if isinstance(m, nn.Linear) or any(isinstance(c, nn.Linear) for c in m.modules())
    }


@contextlib.contextmanager
def _outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Each module's first output tensor, by name, as the forward goes."""
    seen: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, n=n: seen.__setitem__(n, first_tensor(out)))
        for n, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _relative(got: Tensor, want: Tensor) -> Tensor:
    return (got.float() - want.float()).pow(2).sum() / want.float().pow(2).sum().clamp_min(1e-30)


def _block_error(step: BlockStep, weights: dict[str, Tensor] | None = None) -> float:
    """sqrt(Σ_j ‖f(X_j) − Y_j‖² / Σ_j ‖Y_j‖²) over every calibration batch (with `weights` substituted)."""
    block, inputs = step.block, step.block.inputs
    sums = torch.zeros(2, dtype=torch.float64)
    for j in range(len(inputs)):
        args, kwargs = inputs.call(j)
        params = {} if weights is None else {f"{n}.weight": w for n, w in weights.items()}
        y = first_tensor(functional_call(block.module, params, args, kwargs))
        want = step.targets[j]
        if not bool(torch.isfinite(want).all()):
            raise ValueError(f"decoder block {block.index}: the dense block's outputs are not finite")
        sums[0] += float((y.double() - want.double()).pow(2).sum())
        sums[1] += float(want.double().pow(2).sum())
    if block.comm is not None:
        sums = block.comm.all_reduce_sum(sums)
    return float((sums[0] / sums[1].clamp_min(1e-300)).sqrt())


class Reconstruct(Refinement):
    """Reconstruction as a refinement of the block pipeline (module docstring). `mode`: "linear",
    "block" or "parts"; `iterations`: conjugate-gradient iterations ("linear"); `steps`, `lr`: Adam
    steps and learning rate (the gradient modes); `percdamp`: the dampening of "linear" (the
    pipeline's, as SparseGPT's, when given by name)."""

    name = "reconstruct"
    stage = "masked"
    order = 1  # after swaps: the masks first, then the weights

    def __init__(
        self, mode: str = "linear", *, iterations: int = 30, steps: int = 20, lr: float = 1e-4, percdamp: float = 0.01
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reconstruct mode must be one of {MODES}, got {mode!r}")
        for what, value in (("iterations", iterations), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"reconstruct {what} must be a positive int, got {value!r}")
        for what, value in (("lr", lr), ("percdamp", percdamp)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"reconstruct {what} must be a finite number >= 0, got {value!r}")
        self.mode, self.iterations, self.steps, self.lr, self.percdamp = mode, iterations, steps, float(lr), percdamp
        self.observes = frozenset({"xtx"}) if mode == "linear" else frozenset()
        self.keeps_dense = mode != "block"
        self.keeps_targets = mode != "linear"

    def configured(self, *, percdamp: float = 0.01, **_options) -> Reconstruct:
        return Reconstruct(self.mode, iterations=self.iterations, steps=self.steps, lr=self.lr, percdamp=percdamp)

    def record(self) -> dict:
        return {"mode": self.mode, "iterations": self.iterations, "steps": self.steps, "lr": self.lr}

    def workspace_bytes(self, linears: dict[str, nn.Linear], forward_bytes: int) -> int:
        if self.mode == "linear":
            return max(4 * (2 * lin.in_features**2 + 5 * lin.weight.numel()) for lin in linears.values())
        return 16 * sum(lin.weight.numel() for lin in linears.values()) + 2 * forward_bytes

    def refine_(self, step: BlockStep) -> Gain:
        if self.mode == "linear":
            return self._linear(step)
        return self._gradient(step)

    def _linear(self, step: BlockStep) -> Gain:
        block = step.block
        before = after = norm = 0.0
        for n, lin in block.linears.items():
            xtx = block.stats[n].xtx
            if not bool(torch.isfinite(xtx).all()):
                raise ValueError(f"{block.qualified(n)}: XᵀX is not finite (non-finite calibration activations)")
            dense = step.dense[n]
            e0, e1 = masked_least_squares_(lin.weight, step.masks[n], dense, xtx, self.percdamp, self.iterations)
            before, after = before + e0, after + e1
            norm += float(layer_error(dense.float(), torch.zeros_like(dense, dtype=torch.float32), xtx.float()).sum())
        scale = 1.0 / norm if norm > 0 else 0.0
        return Gain("layer error", before * scale, after * scale)

    def _gradient(self, step: BlockStep) -> Gain:
        block, inputs = step.block, step.block.inputs
        names = list(block.linears)
        leaves = {n: block.linears[n].weight.detach().float().clone().requires_grad_(True) for n in names}
        keep = {n: step.masks[n].to(leaves[n].device) for n in names}
        before = _block_error(step)
        pieces = parts(block.module) if self.mode == "parts" else {}
        dense_parts = self._dense_parts(step, pieces) if pieces else None
        optimizer = torch.optim.Adam(list(leaves.values()), lr=self.lr)
        with torch.enable_grad():
            for s in range(self.steps):
                j = s % len(inputs)
                args, kwargs = inputs.call(j)
                params = {f"{n}.weight": leaves[n].to(block.linears[n].weight.dtype) for n in names}
                with _outputs(pieces) as seen:
                    y = first_tensor(functional_call(block.module, params, args, kwargs))
                if pieces:
                    loss = sum(_relative(seen[n], dense_parts[j][n]) for n in pieces)
                else:
                    loss = _relative(y, step.targets[j])
                optimizer.zero_grad(set_to_none=False)
                loss.backward(inputs=list(leaves.values()))  # no .grad left on the model's parameters
                if block.comm is not None:
                    block.comm.all_reduce_sum_([leaves[n].grad for n in names])
                for n in names:
                    leaves[n].grad.mul_(keep[n])
                optimizer.step()
        refined = {n: leaves[n].detach().masked_fill(~keep[n], 0).to(block.linears[n].weight.dtype) for n in names}
        after = _block_error(step, refined)
        if not after < before:
            return Gain("block output error", before, before)
        with torch.no_grad():
            for n in names:
                block.linears[n].weight.copy_(refined[n])
        return Gain("block output error", before, after)

    def _dense_parts(self, step: BlockStep, pieces: dict[str, nn.Module]) -> list[dict[str, Tensor]]:
        """Each part's output in the dense block (its dense weights substituted), per calibration batch."""
        block, inputs = step.block, step.block.inputs
        out = []
        with torch.no_grad():
            for j in range(len(inputs)):
                args, kwargs = inputs.call(j)
                with _outputs(pieces) as seen:
                    functional_call(block.module, {f"{n}.weight": w for n, w in step.dense.items()}, args, kwargs)
                out.append(dict(seen))
        return out
