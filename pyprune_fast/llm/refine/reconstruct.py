"""Reconstruction after masking: the kept weights of a masked block adjusted so that it reproduces the
dense block on the calibration inputs, the masks kept exactly (pruned weights stay 0).

    "linear"  per Linear, closed form: each row's masked least squares on its kept support S,
              min over ŵ_S of (w − ŵ) A (w − ŵ)ᵀ, A = XᵀX + λI (λ = percdamp · mean diag XᵀX, a ridge
              towards the dense weights), i.e. A_SS ŵ_S = (A w)_S — the solve SparseGPT's OBS sweep
              approximates column by column, done exactly for the final mask. The refinements' percdamp
              is their own, 0.1 by default, ten times SparseGPT's: on a few thousand calibration tokens
              the exact refit otherwise fits them too closely (the sweep: benchmarks/README.md). Every
              row is solved at once by batched conjugate gradients (`iterations`, from the method's
              weights), preconditioned by diag A plus A's top `rank` eigenpairs on each row's support
              (_preconditioner); kept only where the undamped layer error falls.
    "sequential"  per Linear, closed form, against the dense model rather than the dense block: the
              Linears refit in the order the block calls them (q/k/v, then o_proj on the refit
              attention, gate/up, then down_proj on the refit MLP), each on the inputs X_p the pruned
              model gives it, towards the output X_d w_dᵀ the dense model gives at the same place (X_d
              from the dense model's own inputs of the block, which the pipeline keeps):
              min ‖X_d w_dᵀ − X_p ŵᵀ‖² + λ‖ŵ − w_d‖², A_SS ŵ_S = (w_d C + λ w_d)_S with A = X_pᵀX_p + λI,
              C = X_dᵀX_p — so each Linear also corrects the error of the blocks and Linears before it
              instead of reproducing the dense weights on already-damaged inputs ("linear"). The
              asymmetric calibration of GPTAQ (Li et al. 2025), and the dense model's outputs as
              targets as in EBFT's block-wise fine-tuning (Guo et al. 2024), here as one closed form per
              Linear over its final mask. Costs two partial forwards per group of Linears and batch, and the
              dense model's block inputs (one more copy of the hidden states, two while a block runs).
    "block"   the block's output (Wanda++'s regional optimisation, Yang et al. 2025): `steps` Adam steps,
              one calibration batch each, on L = ‖f(X; Ŵ) − Y‖² / ‖Y‖² (Y the dense block's outputs),
              the gradients of pruned weights zeroed so they stay 0.
    "parts"   as "block", the loss summed over the outputs of the block's parts (its first-level
              modules holding Linears: attention and MLP), each against the dense part's output: the
              attention and the MLP reconstructed separately.

The gradient modes keep their result only when the block's output error over every calibration batch
falls; all four report their own error before and after (the Gain)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...modeling import first_tensor
from ..blocks import BlockInputs
from .base import BlockStep, Gain, Refinement
from .swap import layer_error

MODES = ("linear", "sequential", "block", "parts")
PERCDAMP = 0.1  # the closed forms' ridge towards the dense weights (module docstring)
ITERATIONS = 10  # conjugate-gradient iterations with the rank-32 preconditioner (benchmarks/README.md)
RANK = 32


class _Stop(Exception):
    """Ends a forward once the Linears it was run for have been seen."""


def _damped(h: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """A = H + λI with λ = percdamp · mean diag H (a ridge towards the dense weights), and λ."""
    a = h.clone()
    damp = percdamp * float(h.diagonal().mean()) + torch.finfo(h.dtype).tiny
    a.diagonal().add_(damp)
    return a, damp


def _preconditioner(a: Tensor, keep: Tensor, rank: int, floor: float) -> Callable[[Tensor], Tensor]:
    """r ↦ M_S⁻¹ r for every row at once, M ≈ A restricted to the row's kept support S. rank 0 (or A
    of at most 2·rank columns): M = diag A (Jacobi). Otherwise M = D + U Λ Uᵀ, U Λ the top `rank`
    eigenpairs of A (a randomized range finder: three products with A and a small eigh) and D the rest
    of A's diagonal, inverted on each support by Woodbury: D_S⁻¹ − D_S⁻¹U_S (Λ⁻¹ + U_SᵀD_S⁻¹U_S)⁻¹ U_SᵀD_S⁻¹,
    one rank × rank Cholesky factor per row. Calibration activations of LLMs have a few dominant
    directions (outlier features) that diag A cannot see, and which slow the diagonal preconditioner
    down (its accuracy against iterations: benchmarks/README.md). `floor` (> 0) bounds D and Λ from
    below."""
    d = a.shape[0]
    diag = a.diagonal()
    jacobi = diag.clamp_min(floor).reciprocal()
    if rank == 0 or d <= 2 * rank:
        return lambda r: r * jacobi
    g = torch.Generator(device=a.device).manual_seed(0)
    q = torch.linalg.qr(a @ torch.randn(d, rank + 8, generator=g, device=a.device, dtype=a.dtype)).Q
    for _ in range(2):
        q = torch.linalg.qr(a @ q).Q
    values, vectors = torch.linalg.eigh(q.T @ a @ q)
    u, lam = q @ vectors[:, -rank:], values[-rank:].clamp_min(floor)
    inv = (diag - (u * u * lam).sum(1)).clamp_min(floor).reciprocal()
    outer = (u * inv.unsqueeze(1)).unsqueeze(2) * u.unsqueeze(1)  # [d, rank, rank]: u_d u_dᵀ / D_d
    small = torch.diag_embed(lam.reciprocal()) + (keep.to(a.dtype) @ outer.reshape(d, -1)).view(-1, rank, rank)
    factor, info = torch.linalg.cholesky_ex(small)
    if bool(info.any()):
        return lambda r: r * jacobi

    def apply(r: Tensor) -> Tensor:
        y = r * inv
        t = torch.cholesky_solve((y @ u).unsqueeze(2), factor).squeeze(2)
        return (y - (t @ u.T) * inv) * keep

    return apply


def _masked_cg(
    x: Tensor, xa: Tensor, keep: Tensor, rhs: Tensor, a: Tensor, iterations: int, precondition: Callable
) -> None:
    """`iterations` steps of preconditioned conjugate gradients on every row's system (x A)_S = rhs_S
    over its kept support S (x zero elsewhere), from x; updates x and xa = x A (carried along, so
    that the errors need no further product with A) in place."""
    work = x.dtype
    r = (rhs - xa) * keep
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(iterations):
        ap = p @ a
        q = ap * keep
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(torch.finfo(work).tiny), torch.zeros_like(pq)).unsqueeze(1)
        x.addcmul_(alpha, p)
        xa.addcmul_(alpha, ap)
        r.addcmul_(alpha, q, value=-1.0)
        z = precondition(r)
        rz, previous = (r * z).sum(1), rz
        beta = torch.where(previous > 0, rz / previous.clamp_min(torch.finfo(work).tiny), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p


def _floor(a: Tensor, damp: float) -> float:
    """The preconditioner's lower bound on eigenvalues: the dampening, at least 1e-6 · mean diag A."""
    return max(damp, 1e-6 * float(a.diagonal().mean()), torch.finfo(a.dtype).tiny)


@torch.no_grad()
def masked_least_squares_(
    weight: Tensor,
    keep: Tensor,
    dense: Tensor,
    xtx: Tensor,
    percdamp: float = PERCDAMP,
    iterations: int = ITERATIONS,
    rank: int = RANK,
) -> tuple[float, float]:
    """Solves every row's masked least squares (module docstring, "linear") in place by preconditioned
    conjugate gradients (`rank`: see _preconditioner) from the current weights; the weights change only
    when the undamped error Σ_r (w_r − ŵ_r) XᵀX (w_r − ŵ_r)ᵀ falls. Returns that error before and after."""
    work = torch.promote_types(weight.dtype, torch.float32)
    x, w, h = weight.detach().to(work).clone(), dense.detach().to(work), xtx.detach().to(work)
    keep = keep.to(x.device)
    a, damp = _damped(h, percdamp)
    wa, xa = w @ a, x @ a

    def error(v: Tensor, va: Tensor) -> float:  # Σ_r (w_r − v_r) H (w_r − v_r)ᵀ, H = A − λI, from v A
        d = w - v
        return float((((wa - va) - damp * d) * d).sum())

    before = error(x, xa)
    _masked_cg(x, xa, keep, wa, a, iterations, _preconditioner(a, keep, rank, _floor(a, damp)))
    after = error(x, xa)
    if not after < before:
        return before, before
    weight.copy_(x.masked_fill(~keep, 0).to(weight.dtype))
    return before, after


@torch.no_grad()
def dense_target_least_squares_(
    weight: Tensor,
    keep: Tensor,
    dense: Tensor,
    stats: tuple[Tensor, Tensor, float],
    percdamp: float = PERCDAMP,
    iterations: int = ITERATIONS,
    toward: float = 1.0,
    rank: int = RANK,
) -> tuple[float, float]:
    """Refits the kept weights of a Linear whose inputs in the pruned model X_p differ from those in the
    dense model X_d (module docstring, "sequential") in place: every row's

        min over ŵ_S of ‖X_d w_dᵀ − X_p ŵᵀ‖² + λ‖ŵ − w_d‖²,   i.e.   ŵ_S (A + λI)_SS = (w_d C + λ w_d)_S

    with A = X_pᵀX_p, C = X_dᵀX_p and λ = percdamp · mean diag A, by preconditioned conjugate gradients
    (`rank`: see _preconditioner) from the current weights. `stats` = (A, C, ‖X_d w_dᵀ‖²); C may be A
    itself (X_d = X_p). `toward` t < 1 aims at the blend t·X_d w_dᵀ + (1 − t)·X_p w_dᵀ instead (C
    replaced by t·C + (1 − t)·A; t = 0 is the "linear" solve on these inputs). The weights change only
    when the undamped error towards that aim falls; returns the error towards the dense model,
    ‖X_d w_dᵀ − X_p ŵᵀ‖² = ‖X_d w_dᵀ‖² − 2⟨w_d C, ŵ⟩ + Σ_r ŵ_r A ŵ_rᵀ, before and after."""
    xtx, cross, norm = stats
    work = torch.promote_types(weight.dtype, torch.float32)
    x, w = weight.detach().to(work).clone(), dense.detach().to(work)
    h = xtx.detach().to(work)
    keep = keep.to(x.device)
    a, damp = _damped(h, percdamp)
    wh = w @ h
    target = wh if cross is xtx else w @ cross.detach().to(work)
    xa = x @ a

    def error(v: Tensor, va: Tensor) -> float:  # va = v A = v H + λ v
        return norm + float(((va - damp * v) * v).sum() - 2 * (target * v).sum())

    before = error(x, xa)
    aim = target if toward == 1 else toward * target + (1 - toward) * wh
    _masked_cg(x, xa, keep, aim + damp * w, a, iterations, _preconditioner(a, keep, rank, _floor(a, damp)))
    after = error(x, xa)
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


def call_groups(module: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs) -> list[list[str]]:
    """The block's Linears in the order its forward calls them (on calibration batch 0), grouped where
    consecutive calls take the same input tensor (q/k/v, gate/up). Linears the forward calls other than
    once (routed experts, shared layers) are left out: their inputs in the dense and the pruned model
    are not the same tokens."""
    calls: list[tuple[str, Tensor]] = []  # the inputs held, so that no later tensor reuses their memory
    handles = [
        lin.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0]))) for n, lin in linears.items()
    ]
    try:
        with torch.no_grad():
            inputs.run(module, 0)
    finally:
        for h in handles:
            h.remove()
    once = {n for n in linears if sum(c == n for c, _ in calls) == 1}
    groups: list[list[str]] = []
    previous = None
    for n, source in calls:
        if n not in once:
            previous = None
            continue
        if previous is not None and source is previous:
            groups[-1].append(n)
        else:
            groups.append([n])
        previous = source
    return groups


def _group_stats(step: BlockStep, group: list[str], dense_inputs: BlockInputs | None) -> dict[str, tuple]:
    """(A = Σ_j X_pᵀX_p, C = Σ_j X_dᵀX_p, ‖X_d w_dᵀ‖²) of every Linear of `group` (which share one
    input): X_p its inputs in the block as it is now (the Linears before it refit) on the pruned
    model's inputs, X_d its inputs in the dense block on the dense model's, token by token; summed over
    the calibration batches and the ranks. Each forward stops at the group. Without `dense_inputs`
    (toward = 0: no dense-model target) X_d = X_p: C is A and no dense forward runs."""
    block = step.block
    module, pruned, first, last = block.module, block.inputs, block.linears[group[0]], block.linears[group[-1]]
    seen: dict[str, Tensor] = {}
    norms = {n: torch.zeros((), dtype=torch.float64) for n in group}

    def capture(_m, args):
        seen["x"] = args[0].detach()
        raise _Stop

    def dense_capture(_m, args):
        seen["x"] = args[0].detach()

    def output(lin, _args, out, n):
        y = out.detach().float() if lin.bias is None else (out.detach() - lin.bias.detach()).float()
        norms[n] += float(y.pow(2).sum())
        if lin is last:
            raise _Stop

    dense_weights = {f"{n}.weight": w for n, w in step.dense.items()}
    xtx = cross = None
    with torch.no_grad():
        for j in range(len(pruned)):
            if dense_inputs is not None:
                handles = [first.register_forward_pre_hook(dense_capture)]
                handles += [block.linears[n].register_forward_hook(partial(output, n=n)) for n in group]
                try:
                    args, kwargs = dense_inputs.call(j)
                    functional_call(module, dense_weights, args, kwargs)
                except _Stop:
                    pass
                finally:
                    for h in handles:
                        h.remove()
                xd = seen.pop("x")
            handle = first.register_forward_pre_hook(capture)
            try:
                pruned.run(module, j)
            except _Stop:
                pass
            finally:
                handle.remove()
            xp = seen.pop("x")
            if dense_inputs is None:
                xp = xp.reshape(-1, xp.shape[-1]).float()
                xtx = xp.T @ xp if xtx is None else xtx.addmm_(xp.T, xp)
                continue
            if xp.shape != xd.shape:
                raise ValueError(
                    f"{block.qualified(group[0])}: its inputs in the dense and the pruned model differ in shape "
                    f"({tuple(xd.shape)} and {tuple(xp.shape)})"
                )
            xp, xd = xp.reshape(-1, xp.shape[-1]).float(), xd.reshape(-1, xd.shape[-1]).float()
            xtx = xp.T @ xp if xtx is None else xtx.addmm_(xp.T, xp)
            cross = xd.T @ xp if cross is None else cross.addmm_(xd.T, xp)
    sums = torch.stack([norms[n] for n in group])
    if block.comm is not None:
        xtx = block.comm.all_reduce_sum(xtx)
        cross = None if cross is None else block.comm.all_reduce_sum(cross)
        sums = block.comm.all_reduce_sum(sums)
    if dense_inputs is None:
        cross = xtx
        sums = torch.stack([((step.dense[n].float() @ xtx) * step.dense[n].float()).sum().double() for n in group])
    if not (bool(torch.isfinite(xtx).all()) and bool(torch.isfinite(cross).all())):
        raise ValueError(f"{block.qualified(group[0])}: its input statistics are not finite (non-finite activations)")
    return {n: (xtx, cross, float(sums[k])) for k, n in enumerate(group)}


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
    "sequential", "block" or "parts"; `iterations`: conjugate-gradient iterations (the closed forms);
    `steps`, `lr`: Adam steps and learning rate (the gradient modes); `percdamp`: the dampening of the
    closed forms, a ridge towards the dense weights (its own, not the method's: module docstring);
    `rank`: the eigenpairs of XᵀX in the conjugate gradients' preconditioner (0: diag XᵀX only);
    `toward`: how far "sequential" aims at the dense model's output rather than the dense weights' on
    the pruned inputs (0: not at all, no dense stream kept; 1: fully — on a few thousand calibration
    tokens it overfits them; measured in benchmarks/README.md); `name`: its key
    (the registry holds "reconstruct", mode "linear", and "sequential", mode "sequential" with
    toward=0)."""

    name = "reconstruct"
    stage = "masked"
    order = 1  # after swaps: the masks first, then the weights

    def __init__(
        self,
        mode: str = "linear",
        *,
        iterations: int = ITERATIONS,
        rank: int = RANK,
        steps: int = 20,
        lr: float = 1e-4,
        percdamp: float = PERCDAMP,
        toward: float = 1.0,
        name: str = "reconstruct",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reconstruct mode must be one of {MODES}, got {mode!r}")
        for what, value in (("iterations", iterations), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"reconstruct {what} must be a positive int, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"reconstruct rank must be an int >= 0, got {rank!r}")
        for what, value in (("lr", lr), ("percdamp", percdamp)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"reconstruct {what} must be a finite number >= 0, got {value!r}")
        if isinstance(toward, bool) or not isinstance(toward, (int, float)) or not 0 <= toward <= 1:
            raise ValueError(f"reconstruct toward must be a number in [0, 1], got {toward!r}")
        self.mode, self.iterations, self.steps, self.lr, self.percdamp = mode, iterations, steps, float(lr), percdamp
        self.toward, self.name, self.rank = float(toward), name, rank
        self.observes = frozenset({"xtx"}) if mode == "linear" else frozenset()
        self.keeps_dense = mode != "block"
        self.keeps_targets = mode in ("block", "parts")
        self.keeps_dense_inputs = mode == "sequential" and toward > 0

    def record(self) -> dict:
        return {
            "mode": self.mode,
            "iterations": self.iterations,
            "rank": self.rank,
            "percdamp": self.percdamp,
            "steps": self.steps,
            "lr": self.lr,
            "toward": self.toward,
        }

    def workspace_bytes(self, linears: dict[str, nn.Linear], forward_bytes: int) -> int:
        if self.mode in ("linear", "sequential"):
            return max(
                4 * (3 * lin.in_features**2 + 12 * lin.weight.numel() + sum(lin.weight.shape) * self.rank**2)
                for lin in linears.values()
            )
        return 16 * sum(lin.weight.numel() for lin in linears.values()) + 2 * forward_bytes

    def refine_(self, step: BlockStep) -> Gain:
        if self.mode == "linear":
            return self._linear(step)
        if self.mode == "sequential":
            return self._sequential(step)
        return self._gradient(step)

    def _linear(self, step: BlockStep) -> Gain:
        block = step.block
        before = after = norm = 0.0
        for n, lin in block.linears.items():
            xtx = block.stats[n].xtx
            if not bool(torch.isfinite(xtx).all()):
                raise ValueError(f"{block.qualified(n)}: XᵀX is not finite (non-finite calibration activations)")
            dense = step.dense[n]
            e0, e1 = masked_least_squares_(
                lin.weight, step.masks[n], dense, xtx, self.percdamp, self.iterations, self.rank
            )
            before, after = before + e0, after + e1
            norm += float(layer_error(dense.float(), torch.zeros_like(dense, dtype=torch.float32), xtx.float()).sum())
        scale = 1.0 / norm if norm > 0 else 0.0
        return Gain("layer error", before * scale, after * scale)

    def _sequential(self, step: BlockStep) -> Gain:
        block = step.block
        pruned = block.inputs
        dense_inputs = None
        if self.toward > 0:
            hidden = pruned.hidden if step.dense_inputs is None else step.dense_inputs
            dense_inputs = BlockInputs(list(hidden), pruned.args, pruned.kwargs, pruned.by_keyword)
        before = after = norm = 0.0
        for group in call_groups(block.module, block.linears, pruned):
            stats = _group_stats(step, group, dense_inputs)
            for n in group:
                e0, e1 = dense_target_least_squares_(
                    block.linears[n].weight,
                    step.masks[n],
                    step.dense[n],
                    stats[n],
                    self.percdamp,
                    self.iterations,
                    self.toward,
                    self.rank,
                )
                before, after, norm = before + e0, after + e1, norm + stats[n][2]
        scale = 1.0 / norm if norm > 0 else 0.0
        metric = "layer error vs the dense model" if self.toward > 0 else "layer error"
        return Gain(metric, before * scale, after * scale)

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
