"""Benchmark workloads: each op next to what a user would write today, built once and shared by the
pytest-benchmark suite (benchmarks/) and `pyprune-fast bench`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops

# The weights scored by default in torchvision's ViT-B/16 (every Linear and Conv weight; the
# attention in_proj is a bare Parameter): 65.06 M values in 38 tensors.
VIT_B16_WEIGHTS = [(768, 3, 16, 16)] + [(768, 768), (3072, 768), (768, 3072)] * 12 + [(1000, 768)]


@dataclass
class Case:
    """One comparison: `ours` against one or more baselines on the same inputs."""

    group: str
    ours: Callable[[], object]
    baselines: dict[str, Callable[[], object]]
    elements: int = 0
    bytes_moved: int = 0
    extra: dict = field(default_factory=dict)


def eager_saliency(grads, weights):
    """What users write: per-tensor |g·w|, then the statistics over the concatenated scores."""
    scores = [(g * w).abs() for g, w in zip(grads, weights)]
    flat = torch.cat([s.reshape(-1) for s in scores])
    finite = torch.isfinite(flat)
    stats = torch.stack(
        [
            torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
            flat.sum(dtype=torch.float64),
            flat.square().sum(dtype=torch.float64),
            flat.min().double(),
            flat.max().double(),
            (~finite).sum().double(),
            torch.isnan(flat).sum().double(),
        ]
    )
    return scores, stats


def saliency_case(device: str = "cpu", dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Case:
    """The fused saliency op on ViT-B/16's weights and random gradients (scale < 1 shrinks each tensor)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(max(1, int(s[0] * scale)),) + tuple(s[1:]) for s in VIT_B16_WEIGHTS]
    weights = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    n = sum(w.numel() for w in weights)
    return Case(
        group=f"saliency vit_b_16 {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: ops.saliency(grads, weights),
        baselines={"torch eager": lambda: eager_saliency(grads, weights)},
        elements=n,
        bytes_moved=n * (2 * weights[0].element_size() + 4),
    )


def _score_tensors(total: int, pieces: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """`total` |N(0,1)| fp32 scores in `pieces` tensors, as a criterion would produce them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [total // pieces + (1 if i < total % pieces else 0) for i in range(pieces)]
    return [torch.randn(n, generator=g).abs_().to(device) for n in sizes]


def kth_case(total: int, pieces: int = 20, device: str = "cpu", sparsity: float = 0.9) -> Case:
    """The exact k-th smallest score (k = sparsity × total) vs concatenating and selecting."""
    import numpy as np

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


def global_masks_case(total: int, pieces: int = 20, device: str = "cpu", sparsity: float = 0.9) -> Case:
    """Global keep-masks at `sparsity` vs the threshold-by-concatenation users write."""
    from . import masks

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


def vit_b16_modules(device: str = "cpu") -> torch.nn.ModuleList:
    """Modules with ViT-B/16's scored weight shapes (the conv patch embedding, 12 × (attention
    out_proj, MLP fc1, fc2), the head), randomly initialized."""
    mods = [torch.nn.Conv2d(3, 768, 16, 16)]
    for _ in range(12):
        mods += [torch.nn.Linear(768, 768), torch.nn.Linear(768, 3072), torch.nn.Linear(3072, 768)]
    mods.append(torch.nn.Linear(768, 1000))
    return torch.nn.ModuleList(mods).to(device)


def torch_prune_case(device: str = "cpu", amount: float = 0.9) -> Case:
    """Global L1 pruning of ViT-B/16's weights through torch.nn.utils.prune, ours (the drop-in) vs
    torch's; each round starts from the same unpruned weights."""
    from torch.nn.utils import prune

    from .integrations import torch_prune

    torch.manual_seed(0)
    modules = vit_b16_modules(device)
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


CHANNEL_NEEDS = {"zeros", "x_sum", "g_sum", "dot", "dot_sq"}


def capture_feature_maps(
    model_name: str, batch: int = 8, seed: int = 0
) -> list[tuple[torch.nn.Module, Tensor, Tensor]]:
    """(layer, output, ∂loss/∂output) of every Conv/Linear of a randomly initialized torchvision model
    (weights=None, nothing downloaded) for one batch of random 224 × 224 images and labels."""
    import torchvision

    from .criteria._channel_stats import CHANNEL_MODULES
    from .criteria._engine import observable_attention

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    if model_name.startswith("vit"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes it
    seen: list[tuple[torch.nn.Module, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _a, out: seen.append((mod, out)))
        for m in model.modules()
        if isinstance(m, CHANNEL_MODULES)
    ]
    with observable_attention(model):
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(batch, 3, 224, 224)), torch.randint(0, 1000, (batch,))
        )
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [out for _, out in seen])
    return [(m, out.detach(), g) for (m, out), g in zip(seen, grads)]


def fused_channel_stats(maps) -> list:
    """Ours: each layer's batch reduced for all channels at once (what the channel criteria's hooks do)."""
    from .criteria._channel_stats import ChannelStats

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


def channel_stats_case(model_name: str = "resnet50", batch: int = 8) -> Case:
    """The per-channel feature-map statistics of taylor, fisher, ide and apoz (Σx, Σ∇, Σ xᵀ∇,
    Σ (xᵀ∇)², zero counts) over one batch's feature maps and gradients of every Conv/Linear layer of a
    torchvision model: one whole-tensor pass per layer (ours) vs a Python loop over channels."""
    from .criteria._channel_stats import channel_view

    maps = capture_feature_maps(model_name, batch)
    n = sum(out.numel() for _, out, _ in maps)
    return Case(
        group=f"channel stats {model_name} batch {batch}x224x224 cpu",
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
    from .criteria._channel_stats import map_ranks

    maps = [(m, out, g) for m, out, g in capture_feature_maps(model_name, batch) if isinstance(m, torch.nn.Conv2d)]
    return Case(
        group=f"hrank ranks {model_name} batch {batch}x224x224 cpu",
        ours=lambda: [map_ranks(out, m)[0] for m, out, _ in maps],
        baselines={"loop over channels": lambda: looped_map_ranks(maps)},
        elements=sum(out.numel() for _, out, _ in maps),
        extra={"layers": len(maps)},
    )
