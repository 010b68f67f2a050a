"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot"):
prune a Linear W [rows, d] and update its remaining weights so that the layer output on the
calibration inputs X changes as little as possible, min ‖WX − ŴX‖², one column at a time (OBS).

    H = 2XᵀX/n + λI,  λ = percdamp · mean(diag H)   (inputs that are always zero: H_jj := 1, W_:j := 0)
    U = chol(H⁻¹), upper (H⁻¹ = UᵀU); row i of U is (H_F⁻¹)_{i,:} / √(H_F⁻¹)_ii with F = {i, ..., d-1}
    for each column i, left to right:   q = w_:i ⊙ keep_:i
                                        e = (w_:i − q) / U_ii
                                        w_:j −= e · U_ij   for j ≥ i      (OBS update of the free columns)
                                        w_:i := q                          (column i frozen)

Columns are processed in blocks of `blocksize` (128): inside a block the updates are applied column
by column to the block only, and the accumulated errors E [rows, B] update the columns right of the
block at once (W_:,right −= E · U_block,right) — the lazy batched updates of the paper. The same
split is applied once more inside each block (sub-blocks of 32 columns), so that a column's rank-1
update streams 32 columns rather than up to 128: the same arithmetic in another order.

Masks are chosen per block of columns (adaptive mask selection): at the start of a block, from the
OBS saliency w²/U_ii² = w²/(H_F⁻¹)_ii of its columns with the weights as updated so far; for N:M,
each group of m columns is chosen when the sweep reaches it. So that every Linear ends with exactly
round(s × N) pruned weights as the project's rule says, block b of columns [c0, c1) prunes
round(s·c1) − round(s·c0) entries of each row ("row"), or round(s·rows·c1) − round(s·rows·c0) of the
block's entries jointly ("layer", as the paper), lowest saliency first, ties by the lower flat index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..criteria.method import Block, Method
from .sparsity import Pattern

SUBBLOCK = 32  # columns updated one by one between two matrix products, inside a block (memory traffic)


@dataclass
class HessianFactor:
    """The upper Cholesky factor U of the dampened H⁻¹ ([d, d]) and the dead inputs (bool [d])."""

    upper: Tensor
    dead: Tensor


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs and float32, float64 for float64 (the reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def inverse_factor(hessian: Tensor, percdamp: float = 0.01) -> HessianFactor:
    """U = chol(H⁻¹) (upper) of H = hessian with dead inputs set to H_jj = 1, dampened by
    percdamp · mean(diag H) on the diagonal. ValueError when H is not positive definite even so, and
    for a percdamp that is not a finite number >= 0 (an infinite one dampens H into inf, no factor)."""
    if not 0.0 <= percdamp < float("inf"):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    h = hessian.detach().to(_work_dtype(hessian.dtype)).clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("the Hessian XᵀX holds non-finite values (non-finite calibration activations)")
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percdamp * diag.mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the dampened Hessian is not positive definite (percdamp={percdamp}): use a larger percdamp "
            "or more calibration tokens"
        )
    return HessianFactor(chol, dead)


def _block_keep(score: Tensor, pattern: Pattern, fraction: float, granularity: str, c0: int, c1: int) -> Tensor:
    """Keep-mask of the columns [c0, c1) of an unstructured layer: their share of the exact total."""
    rows = score.shape[0]
    name = [f"columns {c0}:{c1}"]
    if granularity == "row":
        count = round(fraction * c1) - round(fraction * c0)
        return ops.per_row_masks([score], [count], name)[0]
    count = round(fraction * (rows * c1)) - round(fraction * (rows * c0))
    return ops.layerwise_masks([score], [count], name)[0]


@torch.no_grad()
def prune_(
    weight: Tensor,
    factor: HessianFactor,
    pattern: Pattern,
    fraction: float | None = None,
    granularity: str = "layer",
    blocksize: int = 128,
    pruned: Tensor | None = None,
) -> Tensor:
    """Prunes `weight` [rows, d] in place with SparseGPT's OBS updates (computed in float32, or float64
    for a float64 weight) and returns its keep-mask. `fraction` overrides the pattern's (OWL's
    per-layer sparsity). `pruned` (bool [rows, d], unstructured only): entries that must stay pruned
    (an earlier round's); the mask of the whole row or layer is then chosen once, before the sweep,
    from the saliency w²/U_ii² with these entries first, so that the count of every group is exact
    and no OBS update revives them (per-block counts could fall below what a block already holds)."""
    if weight.dim() != 2 or factor.upper.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the Hessian {tuple(factor.upper.shape)}")
    if not isinstance(blocksize, int) or blocksize < 1 or (pattern.is_nm and blocksize % pattern.m):
        raise ValueError(f"blocksize must be a positive int (a multiple of m for N:M), got {blocksize!r}")
    fraction = pattern.fraction if fraction is None else fraction
    # W transposed, [d, rows]: a column of W is a contiguous row here
    wt = weight.detach().T.to(_work_dtype(weight.dtype)).clone(memory_format=torch.contiguous_format)
    if not bool(torch.isfinite(wt).all()):
        raise ValueError("the weight holds non-finite values")
    d = wt.shape[0]
    wt[factor.dead] = 0
    u = factor.upper.to(device=wt.device, dtype=wt.dtype)
    keep = torch.ones_like(wt, dtype=torch.bool)
    fixed = pruned is not None
    if fixed:
        if pattern.is_nm or tuple(pruned.shape) != tuple(weight.shape):
            raise ValueError(f"pruned must be a bool mask of the weight's shape {tuple(weight.shape)} (unstructured)")
        saliency = (wt / u.diagonal().unsqueeze(1)).pow(2).T.masked_fill(pruned.to(wt.device), -torch.inf)
        keep.copy_(_block_keep(saliency, pattern, fraction, granularity, 0, d).T)
        del saliency
    sub = pattern.m * max(1, SUBBLOCK // pattern.m) if pattern.is_nm else SUBBLOCK
    for c0 in range(0, d, blocksize):
        c1 = min(c0 + blocksize, d)
        w1, u1, keep1 = wt[c0:c1], u[c0:c1, c0:c1], keep[c0:c1]
        scale = u1.diagonal().unsqueeze(1)
        err = torch.empty_like(w1)
        gain = torch.empty_like(w1)  # (1 − keep) / U_ii: e = w ⊙ gain is (w − q) / U_ii with q = w ⊙ keep
        if not pattern.is_nm:
            if not fixed:
                keep1.copy_(_block_keep((w1 / scale).pow(2).T, pattern, fraction, granularity, c0, c1).T)
            torch.div((~keep1).to(w1.dtype), scale, out=gain)
        for s0 in range(0, c1 - c0, sub):  # the same lazy batching again, inside the block
            s1 = min(s0 + sub, c1 - c0)
            for i in range(s0, s1):
                if pattern.is_nm and i % pattern.m == 0:
                    group = slice(i, i + pattern.m)
                    keep1[group] = ops.nm_mask([(w1[group] / scale[group]).pow(2).T], pattern.n, pattern.m)[0][0].T
                    torch.div((~keep1[group]).to(w1.dtype), scale[group], out=gain[group])
                torch.mul(w1[i], gain[i], out=err[i])
                w1[i:s1].addr_(u1[i, i:s1], err[i], alpha=-1.0)  # OBS update of the free columns j >= i
            if s1 < c1 - c0:
                w1[s1:].addmm_(u1[s0:s1, s1:].T, err[s0:s1], alpha=-1.0)
        if c1 < d:
            wt[c1:].addmm_(u[c0:c1, c1:].T, err, alpha=-1.0)  # the block's lazy update of the columns right of it
    keep = keep.T.contiguous()
    weight.copy_(wt.T.masked_fill(~keep, 0).to(weight.dtype))
    return keep


class SparseGPT(Method):
    """SparseGPT as a method of the block pipeline: H = 2XᵀX/n from the statistics pass (one per input
    shared by several Linears, such as q/k/v), then the OBS sweep of each Linear in place. Over several
    ranks (block.comm) each group of Linears sharing an input is solved by one rank, which broadcasts
    the weights it solved. `blocksize`: the lazy column block width; `percdamp`: the Hessian dampening."""

    name = "sparsegpt"
    observes = frozenset({"xtx"})
    prunes_in_place = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
            raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
        self.blocksize, self.percdamp = blocksize, float(percdamp)

    def configured(self, *, blocksize: int = 128, percdamp: float = 0.01, **_options) -> SparseGPT:
        return SparseGPT(blocksize, percdamp)

    def check(self, pattern: Pattern, granularity: str | None) -> None:
        super().check(pattern, granularity)
        if pattern.is_nm and self.blocksize % pattern.m:
            raise ValueError(
                f"blocksize {self.blocksize} must be a multiple of m={pattern.m} for the {pattern} pattern"
            )

    def workspace_bytes(self, linears: dict[str, nn.Linear], forward_bytes: int) -> int:
        return max(4 * (2 * lin.in_features**2 + 2 * lin.out_features * lin.in_features) for lin in linears.values())

    def record(self) -> dict:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}

    def prune_(self, block: Block) -> None:
        groups: dict[int, list[str]] = {}
        for n in block.observed():
            groups.setdefault(id(block.stats[n]), []).append(n)
        comm, granularity = block.comm, block.granularity or "layer"
        for g, names in enumerate(groups.values()):  # Linears sharing their input (q/k/v) share H
            if comm is not None and g % comm.size != comm.rank:
                continue  # over ranks: each input group solved by one rank, its weights broadcast below
            shared = block.stats[names[0]]
            try:
                factor = inverse_factor(shared.hessian(), self.percdamp)
            except ValueError as error:
                raise ValueError(f"{', '.join(block.qualified(n) for n in names)}: {error}") from error
            shared.xtx = None
            for n in names:
                weight = block.linears[n].weight
                pruned = (weight == 0) if block.nested else None
                try:
                    prune_(weight, factor, block.pattern, block.fraction, granularity, self.blocksize, pruned=pruned)
                except ValueError as error:
                    raise ValueError(f"{block.qualified(n)}: {error}") from error
            del factor
        if comm is not None:
            for g, names in enumerate(groups.values()):
                comm.broadcast_([block.linears[n].weight for n in names], src=g % comm.size)
