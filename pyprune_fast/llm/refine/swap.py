"""Mask refinement by swaps (DSnoT, Zhang et al. 2024; SparseSwaps, 2025): inside each row of a pruned
Linear, a kept weight p is pruned and a pruned weight q revived — in the same group of m for N:M, anywhere
in the row otherwise — when that lowers the layer's reconstruction error on the calibration inputs,

    E_r = (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ,   H = XᵀX   (w_r the dense row, ŵ_r the pruned one)

until no swap helps or `budget` rounds are spent. With the residual r = w − ŵ and g = rH, a swap sets
ŵ_p := 0 (a = ŵ_p) and revives q at the value that minimises the error given that (ŵ_q := −b):

    ΔE(p, q) = 2a·g_p + a²·H_pp − (g_q + a·H_pq)² / H_qq,    b = −(g_q + a·H_pq) / H_qq

which is exact (E is quadratic). Rows are independent (E = Σ_r E_r). Candidates of a row: the best
pair of each group of m (N:M), or the best p for each of the `candidates` pruned q of largest revival
gain g_q²/H_qq, distinct p (unstructured). Each round, in every row, all of its improving candidates
together — their joint change Δr, ΔE = 2Δr·g + Δr H Δrᵀ computed exactly — when that beats the row's
single best swap, else that best swap alone; then g += Δr H. So every round lowers every E_r it
touches by at least the best single swap, and a row is done when no single swap lowers it (a local
optimum: no swap of one pair helps). Counts per group, per row and per layer stay exactly as the
method left them; inputs that are always zero (H_qq = 0) are never revived."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import BlockStep, Gain, Refinement

TOLERANCE = 1e-6  # a change must lower E_r by more than this share of it (float rounding never cycles)


def layer_error(dense: Tensor, weight: Tensor, hessian: Tensor) -> Tensor:
    """E_r = (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ of every row r, [rows]."""
    r = dense - weight
    return ((r @ hessian) * r).sum(1)


def _work(t: Tensor) -> Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def group_pairs(hessian: Tensor, m: int) -> Tensor:
    """H_pq of every pair of columns inside each group of m: [groups, m (p), m (q)]."""
    cols = torch.arange(hessian.shape[0], device=hessian.device).view(-1, m)
    return hessian[cols.unsqueeze(2), cols.unsqueeze(1)]


def _tiny(h: Tensor) -> float:
    return torch.finfo(h.dtype).tiny


def group_swaps(weight: Tensor, keep: Tensor, g: Tensor, hessian: Tensor, pairs: Tensor) -> tuple[Tensor, ...]:
    """The best swap of every group of m of every row: (ΔE, p, q), each [rows, groups] (ΔE = inf where
    a group has none)."""
    rows, d = weight.shape
    groups, m, _ = pairs.shape
    hg = hessian.diagonal().view(1, groups, m)
    w, k, gg = weight.view(rows, groups, m), keep.view(rows, groups, m), g.view(rows, groups, m)
    a = w.unsqueeze(3)  # [rows, groups, m (p), 1]
    lin = a * (2 * gg + w * hg).unsqueeze(3)
    hq = hg.unsqueeze(2)  # [1, groups, 1, m (q)]
    revived = (gg.unsqueeze(2) + a * pairs).pow(2) / hq.clamp_min(_tiny(hg))
    valid = k.unsqueeze(3) & ~k.unsqueeze(2) & (hq > 0)
    delta = (lin - revived).masked_fill(~valid, torch.inf).view(rows, groups, m * m)
    best, where = delta.min(2)
    base = torch.arange(groups, device=weight.device) * m
    return best, base + where // m, base + where % m


def row_swaps(weight: Tensor, keep: Tensor, g: Tensor, hessian: Tensor, candidates: int) -> tuple[Tensor, ...]:
    """For each of the `candidates` pruned q of largest g_q²/H_qq of every row, its best kept p:
    (ΔE, p, q), each [rows, candidates], a p used by a better candidate of its row given ΔE = inf."""
    h = hessian.diagonal()
    gain = (g.pow(2) / h.clamp_min(_tiny(h))).masked_fill(keep | (h == 0), -1.0)
    _, qs = gain.topk(min(candidates, weight.shape[1]), dim=1)  # [rows, c]
    hq = h[qs]
    a = weight.unsqueeze(1)  # [rows, 1, d]: p along the last dim
    lin = a * (2 * g + weight * h).unsqueeze(1)
    revived = (g.gather(1, qs).unsqueeze(2) + a * hessian[qs]).pow(2) / hq.clamp_min(_tiny(h)).unsqueeze(2)
    valid = keep.unsqueeze(1) & (~keep.gather(1, qs) & (hq > 0)).unsqueeze(2)
    best, p = (lin - revived).masked_fill(~valid, torch.inf).min(2)
    order = best.argsort(1)
    best, p, qs = best.gather(1, order), p.gather(1, order), qs.gather(1, order)
    earlier = torch.ones(p.shape[1], p.shape[1], dtype=torch.bool, device=p.device).tril(-1)
    taken = ((p.unsqueeze(2) == p.unsqueeze(1)) & earlier).any(2)
    return best.masked_fill(taken, torch.inf), p, qs


def _joint(g: Tensor, hessian: Tensor, swaps: tuple[Tensor, ...], use: Tensor) -> tuple[Tensor, Tensor]:
    """The swaps `use` of each row applied together: (Δr H, ΔE = (2g + Δr H)·Δr), Δr holding a = ŵ_p at
    p and b at q of each swap (p, q, a, b) used."""
    p, q, a, b = swaps
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    delta = torch.zeros_like(g).scatter_add_(1, p, torch.where(use, a, zero))
    delta.scatter_add_(1, q, torch.where(use, b, zero))
    moved = delta @ hessian
    return moved, (2 * g + moved).mul_(delta).sum(1)


@torch.no_grad()
def swap_(
    weight: Tensor, keep: Tensor, dense: Tensor, hessian: Tensor, m: int | None, budget: int, candidates: int = 8
) -> tuple[float, float, int]:
    """Refines `weight` [rows, d] and its keep-mask `keep` in place by swaps (module docstring); `m` the
    group size for N:M (None: anywhere in the row). Returns (Σ_r E_r before, after, swaps made)."""
    w, x = _work(weight).clone(), _work(dense)
    h = _work(hessian).to(w.dtype)
    k = keep.clone()
    g = (x - w) @ h
    before = layer_error(x, w, h)
    error = before.clone()
    pairs = None if m is None else group_pairs(h, m)
    active = torch.arange(w.shape[0], device=w.device)  # rows whose last round found a swap
    swaps = 0
    for _ in range(budget):
        wa, ka, ga = w[active], k[active], g[active]
        if pairs is None:
            delta, p, q = row_swaps(wa, ka, ga, h, candidates)
        else:
            delta, p, q = group_swaps(wa, ka, ga, h, pairs)
        limit = -TOLERANCE * error[active].clamp_min(0)
        single, first = delta.min(1)
        busy = single < limit
        if not bool(busy.any()):
            break
        active, delta, p, q, single, first = active[busy], delta[busy], p[busy], q[busy], single[busy], first[busy]
        ga, limit = ga[busy], limit[busy]
        a = w[active.unsqueeze(1), p]
        b = -(g[active.unsqueeze(1), q] + a * h[p, q]) / h[q, q].clamp_min(_tiny(h))
        use = delta < limit.unsqueeze(1)
        moved, change = _joint(ga, h, (p, q, a, b), use)
        alone = ~(change < single)  # the joint change does not beat the best single swap: that one alone
        if bool(alone.any()):
            use[alone] = False
            use[alone, first[alone]] = True
            pick = first[alone].unsqueeze(1)
            pa, qa = p[alone].gather(1, pick), q[alone].gather(1, pick)
            moved[alone] = a[alone].gather(1, pick) * h[pa.squeeze(1)] + b[alone].gather(1, pick) * h[qa.squeeze(1)]
            change[alone] = single[alone]
        g[active] = ga + moved
        rows = active.unsqueeze(1).expand_as(p)[use]
        w[rows, p[use]] = 0
        w[rows, q[use]] = -b[use]
        k[rows, p[use]], k[rows, q[use]] = False, True
        error[active] += change
        swaps += int(use.sum())
    after = layer_error(x, w, h)
    if float(after.sum()) >= float(before.sum()):  # float rounding: never worse than what it was given
        return float(before.sum()), float(before.sum()), 0
    weight.copy_(w.to(weight.dtype))
    keep.copy_(k)
    return float(before.sum()), float(after.sum()), swaps


class Swap(Refinement):
    """The swap refinement of the block pipeline (module docstring): every pruned Linear of the block,
    against its dense weights and its inputs' XᵀX from the dense statistics pass. `budget`: rounds of
    swaps per Linear (each at most one swap per row); `candidates`: pruned weights tried per row and
    round for unstructured sparsity. Gain: the block's layer error Σ E / Σ_L ‖W_L X‖² before and after."""

    name = "swap"
    stage = "masked"
    order = 0  # before reconstruction: choose the masks, then fit the weights
    observes = frozenset({"xtx"})
    keeps_dense = True

    def __init__(self, budget: int = 20, candidates: int = 8) -> None:
        for what, value in (("budget", budget), ("candidates", candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"swap {what} must be a positive int, got {value!r}")
        self.budget, self.candidates = budget, candidates

    def check(self, plan) -> None:
        if plan.options.nested:
            raise ValueError("refine 'swap' may revive weights; nested=True keeps every weight an earlier run pruned")

    def record(self) -> dict:
        return {"budget": self.budget, "candidates": self.candidates}

    def refine_(self, step: BlockStep) -> Gain:
        block = step.block
        m = block.pattern.m if block.pattern.is_nm else None
        before = after = norm = 0.0
        for n, lin in block.linears.items():
            xtx = block.stats[n].xtx
            dense = step.dense[n]
            if not bool(torch.isfinite(xtx).all()):
                raise ValueError(f"{block.qualified(n)}: XᵀX is not finite (non-finite calibration activations)")
            e0, e1, _ = swap_(lin.weight, step.masks[n], dense, xtx, m, self.budget, self.candidates)
            before, after = before + e0, after + e1
            norm += float(layer_error(_work(dense), torch.zeros_like(_work(dense)), _work(xtx)).sum())
        scale = 1.0 / norm if norm > 0 else 0.0
        return Gain("layer error", before * scale, after * scale)
