"""Value + gradient of Σ_l mean σ(F_l) (ReFer's objective): ops.svd_mean / svd_mean_list against
torch.linalg.svdvals with autograd."""

from __future__ import annotations

import torch

from .. import ops
from .harness import Case


def svdvals_autograd(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """What users write today: Σ_l mean σ(F_l) through torch.linalg.svdvals, and its gradient by autograd."""
    value = torch.stack([torch.linalg.svdvals(f).mean(-1).sum() for f in features]).sum()
    return list(torch.autograd.grad(value, features))


def svd_mean_value_and_grad(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same with ops.svd_mean (one [B, N, D] tensor) or ops.svd_mean_list (a list of [N, D] layers)."""
    value = ops.svd_mean(features[0]).sum() if features[0].dim() == 3 else ops.svd_mean_list(features).sum()
    return list(torch.autograd.grad(value, features))


def svd_mean_case(layers: int, n: int, d: int, as_list: bool, device: str = "cpu", scale: float = 1.0) -> Case:
    """Value + gradient of ReFer's objective Σ_l mean σ(F_l) for `layers` float32 feature matrices of
    n × d: one [layers, n, d] tensor (ViT-B/16 block outputs: 12 × 64 × 197·768) or a list of [n, d]
    layers (LLM-like: 24 × 16 sequences × 256·4096); scale < 1 shrinks d."""
    d = max(n, int(d * scale))
    g = torch.Generator(device="cpu").manual_seed(0)
    if as_list:
        features = [torch.randn(n, d, generator=g).to(device).requires_grad_(True) for _ in range(layers)]
    else:
        features = [torch.randn(layers, n, d, generator=g).to(device).requires_grad_(True)]
    kind = "list" if as_list else "batch"
    return Case(
        group=f"svd_mean {layers}x{n}x{d} {kind} fp32 {device}",
        ours=lambda: svd_mean_value_and_grad(features),
        baselines={"torch svdvals autograd": lambda: svdvals_autograd(features)},
        elements=layers * n * d,
        bytes_moved=3 * layers * n * d * 4,
        extra={"layers": layers, "n": n, "d": d, "list": as_list},
    )
