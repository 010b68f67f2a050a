"""Channel criteria: per-channel feature-map statistics (taylor, fisher, ide, apoz sums) and HRank's
per-channel map ranks, one whole-tensor pass per layer against a Python loop over channels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..criteria.channel_stats import ChannelStats, channel_view, map_ranks
from ..modeling import PRUNABLE_MODULES, observable_attention
from .harness import Case

CHANNEL_NEEDS = {"zeros", "x_sum", "g_sum", "dot", "dot_sq"}


def capture_feature_maps(
    model_name: str, batch: int = 8, device: str = "cpu", seed: int = 0
) -> list[tuple[torch.nn.Module, Tensor, Tensor]]:
    """(layer, output, ∂loss/∂output) of every Conv/Linear of a randomly initialized torchvision model
    (weights=None, nothing downloaded) for one batch of random 224 × 224 images and labels."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)(weights=None).eval().to(device)
    if model_name.startswith("vit"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes it
    seen: list[tuple[torch.nn.Module, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _a, out: seen.append((mod, out)))
        for m in model.modules()
        if isinstance(m, PRUNABLE_MODULES)
    ]
    with observable_attention(model):
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(batch, 3, 224, 224, device=device)), torch.randint(0, 1000, (batch,), device=device)
        )
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [out for _, out in seen])
    return [(m, out.detach(), g) for (m, out), g in zip(seen, grads)]


def fused_channel_stats(maps) -> list:
    """Ours: each layer's batch reduced for all channels at once (what the channel criteria's hooks do)."""
    stats = []
    for module, out, grad in maps:
        s = ChannelStats(module, CHANNEL_NEEDS)
        s.add_output(out)
        s.add_gradient(out, grad)
        stats.append(s)
    return stats


def looped_channel_stats(maps) -> list[dict[str, Tensor]]:
    """What users write in a hook: a Python loop over the channels, the same sums per channel."""
    results = []
    for module, out, grad in maps:
        linear = isinstance(module, torch.nn.Linear)
        channels = out.shape[-1] if linear else out.shape[1]
        sums: dict[str, list[Tensor]] = {k: [] for k in CHANNEL_NEEDS}
        for c in range(channels):
            x = (out[..., c] if linear else out[:, c]).reshape(out.shape[0], -1)
            g = (grad[..., c] if linear else grad[:, c]).reshape(out.shape[0], -1)
            dots = (x * g).sum(1)
            sums["zeros"].append((x <= 0).sum())
            sums["x_sum"].append(x.sum(0))
            sums["g_sum"].append(g.sum(0))
            sums["dot"].append(dots.sum())
            sums["dot_sq"].append(dots.square().sum())
        results.append({k: torch.stack(v) for k, v in sums.items()})
    return results


def channel_stats_case(model_name: str = "resnet50", device: str = "cpu", scale: float = 1.0, batch: int = 8) -> Case:
    """The per-channel feature-map statistics of taylor, fisher, ide and apoz (Σx, Σ∇, Σ xᵀ∇,
    Σ (xᵀ∇)², zero counts) over one batch's feature maps and gradients of every Conv/Linear layer of a
    torchvision model: one whole-tensor pass per layer (ours) vs a Python loop over channels. scale < 1
    shrinks the batch (at least 1 image) and keeps the first ⌈scale × layers⌉ layers."""
    batch = max(1, round(batch * scale))
    maps = capture_feature_maps(model_name, batch, device)
    maps = maps[: math.ceil(len(maps) * scale)]
    n = sum(out.numel() for _, out, _ in maps)
    return Case(
        group=f"channel stats {model_name} batch {batch}x224x224 {device}",
        ours=lambda: fused_channel_stats(maps),
        baselines={"loop over channels": lambda: looped_channel_stats(maps)},
        elements=n,
        bytes_moved=n * 8,
        extra={"layers": len(maps), "channels": sum(channel_view(o, m).shape[1] for m, o, _ in maps)},
    )


def looped_map_ranks(maps) -> list[Tensor]:
    """What users write for HRank: per channel, the ranks of its maps over the batch."""
    return [
        torch.stack([torch.linalg.matrix_rank(out[:, c].float()).sum() for c in range(out.shape[1])])
        for _, out, _ in maps
    ]


def hrank_case(model_name: str = "resnet50", batch: int = 8) -> Case:
    """HRank's per-channel feature-map ranks over one batch of a torchvision CNN's Conv2d outputs: one
    batched matrix_rank per layer (ours) vs one per channel."""
    maps = [(m, out, g) for m, out, g in capture_feature_maps(model_name, batch) if isinstance(m, torch.nn.Conv2d)]
    return Case(
        group=f"hrank ranks {model_name} batch {batch}x224x224 cpu",
        ours=lambda: [map_ranks(out, m)[0] for m, out, _ in maps],
        baselines={"loop over channels": lambda: looped_map_ranks(maps)},
        elements=sum(out.numel() for _, out, _ in maps),
        extra={"layers": len(maps)},
    )
