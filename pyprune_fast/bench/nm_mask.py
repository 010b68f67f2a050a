"""N:M masks (masks.n_m, one fused op for all weights) against the loops users write today."""

from __future__ import annotations

import torch

from .. import masks
from .harness import Case, scaled

# Weight shapes [out, in] of the Linear layers of ViT-B/16 and of one LLaMA-7B decoder layer.
VIT_B16_LINEARS = {"vit_b_16": [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(1000, 768)]}
LLAMA7B_LAYER = {"llama_7b_layer": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]}


def loop_n_m(scores, n=2, m=4):
    """What users write today (Wanda's and SparseGPT's loop): per tensor, a Python loop over the column
    groups, topk of each [out, m] slice, scatter into the mask. Returns keep-masks (True = kept)."""
    out = {}
    for name, s in scores.items():
        s = s.reshape(s.shape[0], -1).float()
        pruned = torch.zeros_like(s, dtype=torch.bool)
        for i in range(0, s.shape[1], m):
            pruned.scatter_(1, i + torch.topk(s[:, i : i + m], m - n, dim=1, largest=False)[1], True)
        out[name] = ~pruned
    return out


def vectorized_n_m(scores, n=2, m=4):
    """The vectorized torch version: topk over a [-1, m] view of each tensor."""
    out = {}
    for name, s in scores.items():
        groups = s.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
        out[name] = keep.view(s.shape)
    return out


def n_m_case(
    model: str = "vit_b_16", device: str = "cpu", dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> Case:
    """masks.n_m (2:4, one fused op for all weights) on random scores shaped like the model's Linear
    weights, against the Wanda-style loop and vectorized topk."""
    shapes = [(scaled(o, scale), i) for o, i in {**VIT_B16_LINEARS, **LLAMA7B_LAYER}[model]]
    g = torch.Generator(device="cpu").manual_seed(0)
    scores = {f"w{i}": torch.rand(s, generator=g).to(device=device, dtype=dtype) for i, s in enumerate(shapes)}
    n = sum(s.numel() for s in scores.values())
    return Case(
        group=f"n_m 2:4 {model} {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: masks.n_m(scores),
        baselines={"python loop (wanda)": lambda: loop_n_m(scores), "torch topk": lambda: vectorized_n_m(scores)},
        elements=n,
        bytes_moved=n * (torch.finfo(dtype).bits // 8 + 1),
    )
