"""Exact selection: the k-th smallest score, global masks and global pruning in place against
concatenate-and-select, and the torch.nn.utils.prune drop-in against torch's global_unstructured."""

from __future__ import annotations

import os

import torch

from .. import masks, ops
from .harness import Case, scaled


def _score_tensors(total: int, pieces: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """`total` |N(0,1)| fp32 scores in `pieces` tensors, as a criterion would produce them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [total // pieces + (1 if i < total % pieces else 0) for i in range(pieces)]
    return [torch.randn(n, generator=g).abs_().to(device) for n in sizes]


def kth_case(total: int, pieces: int = 20, device: str = "cpu", sparsity: float = 0.9, scale: float = 1.0) -> Case:
    """The exact k-th smallest score (k = sparsity × total) vs concatenating and selecting."""
    import numpy as np

    total = max(pieces, int(total * scale))
    xs = _score_tensors(total, pieces, device)
    k = round(sparsity * total)
    baselines = {
        "torch.kthvalue(torch.cat)": lambda: torch.kthvalue(torch.cat(xs), k).values,
        "torch.quantile(torch.cat)": lambda: torch.quantile(torch.cat(xs), sparsity),
    }
    if device == "cpu":
        baselines["numpy concatenate+partition"] = lambda: np.partition(np.concatenate([x.numpy() for x in xs]), k - 1)[
            k - 1
        ]
    else:
        baselines["torch.topk(torch.cat)"] = lambda: torch.topk(torch.cat(xs), total - k + 1).values[-1]
    return Case(
        group=f"kth_smallest {total / 1e6:.0f}M fp32 in {pieces} tensors {device}",
        ours=lambda: ops.kth_smallest(xs, k),
        baselines=baselines,
        elements=total,
        bytes_moved=total * 4,
    )


SELECT_PATH_ENV = "PYPRUNE_FAST_SELECT_PATH"


def _under_schedule(schedule: str, fn):
    """fn() with the CUDA selection forced onto `schedule` ("compact" or "full"), the variable restored."""
    before = os.environ.get(SELECT_PATH_ENV)
    os.environ[SELECT_PATH_ENV] = schedule
    try:
        return fn()
    finally:
        if before is None:
            del os.environ[SELECT_PATH_ENV]
        else:
            os.environ[SELECT_PATH_ENV] = before


def kth_schedule_case(xs: list[torch.Tensor], k: int, label: str) -> Case:
    """The k-th smallest of xs with candidate compaction ("ours": sample, one full pass, radix passes over
    the candidates) against the full 11-bit radix passes it replaces (PYPRUNE_FAST_SELECT_PATH=full).
    bytes_moved is one read of the scores, so GB/s over it is the effective bandwidth; `extra` holds the
    path and the passes over the scores the CPU emulation (reference/select_compact.py) finds for these
    very inputs, and the full schedule's passes."""
    from ..reference import select_compact

    total = sum(x.numel() for x in xs)
    _, _, _, trace = select_compact.kth_smallest_counts(xs, k, "compact")
    width = torch.finfo(xs[0].dtype).bits
    return Case(
        group=f"kth_smallest {label}: compacted vs full passes",
        ours=lambda: _under_schedule("compact", lambda: ops.kth_smallest(xs, k)),
        baselines={"full radix passes": lambda: _under_schedule("full", lambda: ops.kth_smallest(xs, k))},
        elements=total,
        bytes_moved=total * xs[0].element_size(),
        extra={
            "path": trace.path,
            "passes": round(trace.passes, 4),
            "full_passes": -(-width // select_compact.DIGIT_BITS),
        },
    )


def global_masks_case(
    total: int, pieces: int = 20, device: str = "cpu", sparsity: float = 0.9, scale: float = 1.0
) -> Case:
    """Global keep-masks at `sparsity` vs the threshold-by-concatenation users write."""
    total = max(pieces, int(total * scale))
    xs = _score_tensors(total, pieces, device)
    scores = {f"layer{i}.weight": x for i, x in enumerate(xs)}
    k = round(sparsity * total)

    def concat_threshold():
        threshold = torch.kthvalue(torch.cat(xs), k).values
        return {n: s > threshold for n, s in scores.items()}

    return Case(
        group=f"global masks {total / 1e6:.0f}M fp32 in {pieces} tensors {device}",
        ours=lambda: masks.global_unstructured(scores, sparsity),
        baselines={"torch.cat + kthvalue + compare": concat_threshold},
        elements=total,
        bytes_moved=total * 5,
    )


def global_apply_case(
    total: int, pieces: int = 20, device: str = "cpu", sparsity: float = 0.9, scale: float = 1.0
) -> Case:
    """Global pruning in place (masks.global_unstructured(apply_to=...), no masks kept) of `total`
    weights scored by themselves, vs the threshold-by-concatenation then masked_fill_ users write.
    Pruning is idempotent, so every round does the same work."""
    total = max(pieces, int(total * scale))
    xs = _score_tensors(total, pieces, device)
    scores = {f"layer{i}.weight": x for i, x in enumerate(xs)}
    params = {n: s.clone() for n, s in scores.items()}
    k = round(sparsity * total)

    def concat_threshold():
        threshold = torch.kthvalue(torch.cat(xs), k).values
        for n, s in scores.items():
            params[n].masked_fill_(s <= threshold, 0)

    return Case(
        group=f"global prune in place {total / 1e6:.0f}M fp32 in {pieces} tensors {device}",
        ours=lambda: masks.global_unstructured(scores, sparsity, apply_to=params),
        baselines={"torch.cat + kthvalue + masked_fill_": concat_threshold},
        elements=total,
        bytes_moved=total * 12,
    )


def vit_b16_modules(device: str = "cpu", scale: float = 1.0) -> torch.nn.ModuleList:
    """Modules with ViT-B/16's scored weight shapes (the conv patch embedding, 12 × (attention
    out_proj, MLP fc1, fc2), the head), randomly initialized; scale < 1 shrinks each output dim."""

    def out(n: int) -> int:
        return scaled(n, scale)

    mods = [torch.nn.Conv2d(3, out(768), 16, 16)]
    for _ in range(12):
        mods += [torch.nn.Linear(768, out(768)), torch.nn.Linear(768, out(3072)), torch.nn.Linear(3072, out(768))]
    mods.append(torch.nn.Linear(768, out(1000)))
    return torch.nn.ModuleList(mods).to(device)


def torch_prune_case(device: str = "cpu", amount: float = 0.9, scale: float = 1.0) -> Case:
    """Global L1 pruning of ViT-B/16's weights through torch.nn.utils.prune, ours (the drop-in) vs
    torch's; each round starts from the same unpruned weights."""
    from torch.nn.utils import prune

    from ..integrations import torch_prune

    torch.manual_seed(0)
    modules = vit_b16_modules(device, scale)
    params = [(m, "weight") for m in modules]
    original = [m.weight.detach().clone() for m in modules]

    def reset():
        for m, w in zip(modules, original):
            if hasattr(m, "weight_orig"):
                prune.remove(m, "weight")
            with torch.no_grad():
                m.weight.copy_(w)

    def run(fn):
        reset()
        return fn(params, prune.L1Unstructured, amount=amount)

    n = sum(w.numel() for w in original)
    return Case(
        group=f"torch.nn.utils.prune global L1 {amount:.0%}, ViT-B/16 weights {device}",
        ours=lambda: run(torch_prune.global_unstructured),
        baselines={"torch.nn.utils.prune.global_unstructured": lambda: run(prune.global_unstructured)},
        elements=n,
    )
