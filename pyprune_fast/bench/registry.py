"""The workloads `pyprune-fast bench` runs, by name."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .channel import channel_stats_case
from .e2e import WORKLOADS as E2E_WORKLOADS
from .e2e import criterion_case, workload_criteria
from .harness import Case
from .llm import block_case, sparsegpt_case, wanda_case
from .nm_mask import n_m_case
from .nm_swap import nm_swap_case
from .saliency import saliency_case
from .select import global_masks_case, kth_case, torch_prune_case
from .sparse24 import compress_case
from .svd_mean import svd_mean_case

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
    "SparseGPT 50% q_proj 4096x4096": functools.partial(sparsegpt_case, 4096, 4096, "50%"),
    "SparseGPT 2:4 down_proj 4096x11008": functools.partial(sparsegpt_case, 4096, 11008, "2:4"),
    "Wanda masks LLaMA-7B block": wanda_case,
    "llm.prune sparsegpt LLaMA-7B block": functools.partial(block_case, "sparsegpt", 0.5),
    "N:M swap gains SmolLM2 down_proj": functools.partial(nm_swap_case, "smollm2_down_proj", False),
    "N:M permutation search SmolLM2 down_proj": functools.partial(nm_swap_case, "smollm2_down_proj", True),
}
WORKLOADS.update(
    {
        f"criterion {name} {workload}": functools.partial(criterion_case, name, workload)
        for workload in E2E_WORKLOADS
        for name in workload_criteria(workload)
    }
)
