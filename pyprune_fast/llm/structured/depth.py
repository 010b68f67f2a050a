"""Depth pruning: whole decoder blocks removed by their block influence (ShortGPT: Men et al. 2024,
"ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):

    BI_i = 1 − E_t[ cos(x_t^(i), x_t^(i+1)) ]   over every calibration token t,
           x^(i) the input of block i, x^(i+1) its output, on the dense model (one pass)

The blocks with the lowest influence go first (ties: the lower index), round(ratio × blocks) of them
(every block of a decoder has the same size, so that is the fraction of the decoder's parameters).
The remaining blocks are renumbered: each module's `layer_idx` (the KV cache slot of its attention),
config.num_hidden_layers and every per-layer list of the config (`layer_types`, ...), so that
generate() with a KV cache works and save_pretrained writes a standard config. Encoders alike (BERT's
config, a timm / torchvision nn.Sequential of blocks stays an nn.Sequential)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockInputs, on_device
from .edit import Edits
from .layout import Structure


@torch.no_grad()
def block_influence(structure: Structure, inputs: BlockInputs, device: torch.device) -> Tensor:
    """BI_i of every block (float64 [blocks]); the inputs end as the last block's outputs."""
    influence = []
    for block in structure.blocks:
        total, count = 0.0, 0
        with on_device(block, device):
            for j in range(len(inputs)):
                x = inputs.hidden[j]
                y = inputs.run(block, j)
                cos = F.cosine_similarity(
                    x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1]), dim=-1
                )
                total += float(cos.sum())
                count += cos.numel()
                inputs.hidden[j] = y
        influence.append(1.0 - total / max(count, 1))
    return torch.tensor(influence, dtype=torch.float64)


def blocks_to_remove(influence: Tensor, count: int) -> list[int]:
    """The `count` blocks of lowest influence (ties: lower index first), ascending."""
    return sorted(torch.argsort(influence, stable=True)[:count].tolist())


def per_layer_lists(config, layers: int) -> list[str]:
    """Names of the config's per-layer lists: list/tuple attributes with one entry per block."""
    return [
        k for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == layers and k != "architectures"
    ]


def remove_blocks_(model: nn.Module, structure: Structure, removed: list[int], edits: Edits) -> None:
    """Blocks `removed` taken out; the rest renumbered (module docstring)."""
    gone = set(removed)
    kept = [b for i, b in enumerate(structure.blocks) if i not in gone]
    config = structure.config
    layers = len(structure.blocks)
    for name in per_layer_lists(config, layers) if config is not None else ():
        value = getattr(config, name)
        edits.set(config, name, type(value)(v for i, v in enumerate(value) if i not in gone))
    widths = getattr(config, "pyprune_fast_widths", None)
    if isinstance(widths, dict):
        edits.set(
            config, "pyprune_fast_widths", {k: [v for i, v in enumerate(x) if i not in gone] for k, x in widths.items()}
        )
    if config is not None:
        edits.set(config, "num_hidden_layers", len(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                edits.set(module, "layer_idx", new_index)
    parent_name, _, child = structure.prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    container = structure.blocks  # torchvision / timm call an nn.Sequential: it stays one
    edits.set(parent, child, nn.Sequential(*kept) if isinstance(container, nn.Sequential) else nn.ModuleList(kept))
