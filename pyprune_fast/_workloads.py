"""Benchmark workloads: each op next to what a user would write today, built once and shared by the
pytest-benchmark suite (benchmarks/) and `pyprune-fast bench`."""

from __future__ import annotations

import functools
import math
import statistics
import time
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


def global_masks_case(
    total: int, pieces: int = 20, device: str = "cpu", sparsity: float = 0.9, scale: float = 1.0
) -> Case:
    """Global keep-masks at `sparsity` vs the threshold-by-concatenation users write."""
    from . import masks

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
    from . import masks

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
        return max(1, int(n * scale))

    mods = [torch.nn.Conv2d(3, out(768), 16, 16)]
    for _ in range(12):
        mods += [torch.nn.Linear(768, out(768)), torch.nn.Linear(768, out(3072)), torch.nn.Linear(3072, out(768))]
    mods.append(torch.nn.Linear(768, out(1000)))
    return torch.nn.ModuleList(mods).to(device)


def torch_prune_case(device: str = "cpu", amount: float = 0.9, scale: float = 1.0) -> Case:
    """Global L1 pruning of ViT-B/16's weights through torch.nn.utils.prune, ours (the drop-in) vs
    torch's; each round starts from the same unpruned weights."""
    from torch.nn.utils import prune

    from .integrations import torch_prune

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


# --- N:M masks and 2:4 semi-structured sparsity (issue 5) ---------------------------------------

# Weight shapes [out, in] of the Linear layers of ViT-B/16 and of one LLaMA-7B decoder layer.
VIT_B16_LINEARS = {"vit_b_16": [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(1000, 768)]}
LLAMA7B_LAYER = {"llama_7b_layer": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]}
SPARSE24_SHAPES = {"vit_b_16": [(3072, 768), (768, 3072)], "llama_7b": [(4096, 4096), (11008, 4096), (4096, 11008)]}


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
    from . import masks

    shapes = [(max(1, int(o * scale)), i) for o, i in {**VIT_B16_LINEARS, **LLAMA7B_LAYER}[model]]
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


def random_24_weight(out: int, cols: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """A random weight made 2:4 by magnitude."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out, cols, generator=g) / cols**0.5).to(device=device, dtype=dtype)
    return w * vectorized_n_m({"w": w.abs()})["w"]


def compress_case(
    model: str = "llama_7b", device: str = "cpu", dtype: torch.dtype = torch.float16, scale: float = 1.0
) -> Case:
    """compress_24 of 2:4 weights at the model's Linear shapes against torch's own conversion to the
    CUTLASS layout (what to_sparse_semi_structured runs, in torch ops)."""
    from ._compat import dense_to_cutlass_24

    sparse_semi_structured_from_dense_cutlass = dense_to_cutlass_24()

    shapes = [(max(16, int(o * scale) // 16 * 16), i) for o, i in SPARSE24_SHAPES[model]]
    weights = [random_24_weight(o, i, dtype, device, seed=k) for k, (o, i) in enumerate(shapes)]
    n = sum(w.numel() for w in weights)
    return Case(
        group=f"compress_24 {model} {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: [ops.compress_24(w) for w in weights],
        baselines={"torch cutlass conversion": lambda: [sparse_semi_structured_from_dense_cutlass(w) for w in weights]},
        elements=n,
        bytes_moved=n * weights[0].element_size() * 3 // 2 + n // 8,
    )


def sparse24_linear_case(out: int, cols: int, tokens: int, dtype: torch.dtype, device: str = "cuda") -> Case:
    """ops.sparse24_linear (x [tokens, in] @ Wᵀ + b) against dense F.linear (cuBLAS on CUDA) and torch's
    own 2:4 path (F.linear with to_sparse_semi_structured(W): cuSPARSELt or CUTLASS), same inputs."""
    from torch.sparse import to_sparse_semi_structured

    w = random_24_weight(out, cols, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, cols, generator=g).to(device=device, dtype=dtype)
    bias = torch.randn(out, generator=g).to(device=device, dtype=dtype)
    values, meta = ops.compress_24(w)
    baselines = {"dense F.linear": lambda: torch.nn.functional.linear(x, w, bias)}
    try:
        w_torch = to_sparse_semi_structured(w)
        torch.nn.functional.linear(x, w_torch, bias)
        baselines["torch 2:4 (semi_structured)"] = lambda: torch.nn.functional.linear(x, w_torch, bias)
    except (RuntimeError, NotImplementedError, ValueError):
        pass  # torch's 2:4 path does not cover this GPU, dtype or shape: compared against dense only
    flops = 2 * tokens * out * cols
    return Case(
        group=f"sparse24_linear {out}x{cols} t{tokens} {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: ops.sparse24_linear(x, values, meta, bias),
        baselines=baselines,
        elements=flops,
        bytes_moved=(out * cols // 2 + tokens * (cols + out)) * x.element_size() + out * cols // 8,
        extra={"tokens": tokens, "out": out, "in": cols},
    )


# --- batched SVD-mean feature score (issue 4) ----------------------------------------------------


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


# --- channel criteria: per-channel feature-map statistics (issue 7) ---------------------------------

CHANNEL_NEEDS = {"zeros", "x_sum", "g_sum", "dot", "dot_sq"}


def capture_feature_maps(
    model_name: str, batch: int = 8, device: str = "cpu", seed: int = 0
) -> list[tuple[torch.nn.Module, Tensor, Tensor]]:
    """(layer, output, ∂loss/∂output) of every Conv/Linear of a randomly initialized torchvision model
    (weights=None, nothing downloaded) for one batch of random 224 × 224 images and labels."""
    import torchvision

    from .criteria.engine import PRUNABLE_MODULES, observable_attention

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
    from .criteria.channel_stats import ChannelStats

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
    from .criteria.channel_stats import channel_view

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
    from .criteria.channel_stats import map_ranks

    maps = [(m, out, g) for m, out, g in capture_feature_maps(model_name, batch) if isinstance(m, torch.nn.Conv2d)]
    return Case(
        group=f"hrank ranks {model_name} batch {batch}x224x224 cpu",
        ours=lambda: [map_ranks(out, m)[0] for m, out, _ in maps],
        baselines={"loop over channels": lambda: looped_map_ranks(maps)},
        elements=sum(out.numel() for _, out, _ in maps),
        extra={"layers": len(maps)},
    )


# Every workload by name: `factory(device="cpu", scale=1.0) -> Case`, sizes named at scale 1 (scale < 1
# shrinks them). `pyprune-fast bench` runs each one found here; add a workload by adding its factory.
WORKLOADS: dict[str, Callable[..., Case]] = {
    "saliency fp32": functools.partial(saliency_case, dtype=torch.float32),
    "saliency bf16": functools.partial(saliency_case, dtype=torch.bfloat16),
    "kth_smallest 200M scores": functools.partial(kth_case, 200_000_000),
    "global masks 200M scores": functools.partial(global_masks_case, 200_000_000),
    "prune global L1 ViT-B/16": torch_prune_case,
    "2:4 masks ViT-B/16": functools.partial(n_m_case, "vit_b_16"),
    "2:4 compress LLaMA-7B": functools.partial(compress_case, "llama_7b"),
    "svd_mean 12x64x151296": functools.partial(svd_mean_case, 12, 64, 197 * 768, False),
    "channel stats ResNet-50": functools.partial(channel_stats_case, "resnet50"),
    "channel stats ViT-B/16": functools.partial(channel_stats_case, "vit_b_16"),
}


def time_call(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones; each call waits for the GPU
    (torch.cuda.synchronize) when the device is CUDA."""

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


@dataclass
class Timing:
    """One implementation of a case: best and median wall seconds."""

    impl: str
    best: float
    median: float


def time_case(case: Case, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> list[Timing]:
    """Ours, then each baseline, timed in turn in the same process on the same inputs."""
    impls = {"ours": case.ours, **case.baselines}
    out = []
    for impl, fn in impls.items():
        times = time_call(fn, device, repeats, warmup)
        out.append(Timing(impl, min(times), statistics.median(times)))
    return out
