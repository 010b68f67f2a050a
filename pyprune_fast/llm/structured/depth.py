"""Depth pruning: whole decoder blocks removed by one of DEPTH_SCORES (`depth_score=`):

    influence   BI_i = 1 − E_t[ cos(x_t^(i), x_t^(i+1)) ]   over every calibration token t, x^(i) the
                input of block i, x^(i+1) its output, on the dense model (one pass of the blocks):
                ShortGPT's block influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models
                are More Redundant Than You Expect")
    loss        ΔL_i = L(model without block i) − L(model), L the mean next-token cross-entropy of the
                calibration windows, each block dropped alone from the dense model (block i's output
                replaced by its input): the perplexity criterion of Kim et al. 2024 ("Shortened LLaMA:
                Depth Pruning for Large Language Models with Comparison of Retraining Methods").
                Causal LMs only; blocks + 1 forwards of the whole model over the calibration windows

The blocks with the lowest score go first (ties: the lower index), round(ratio × blocks) of them
(every block of a decoder has the same size, so that is the fraction of the decoder's parameters).
The remaining blocks are renumbered: each module's `layer_idx` (the KV cache slot of its attention),
config.num_hidden_layers and every per-layer list of the config (`layer_types`, ...), so that
generate() with a KV cache works and save_pretrained writes a standard config. Encoders alike (BERT's
config, a timm / torchvision nn.Sequential of blocks stays an nn.Sequential)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockInputs, input_device, on_device
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


DEPTH_SCORES = ("influence", "loss")


def calibration_loss(model: nn.Module, batches: list[Tensor]) -> float:
    """The mean next-token cross-entropy of a causal LM over every predicted token of the batches
    [b, T] of token ids (no KV cache)."""
    total, count = 0.0, 0
    where = input_device(model)
    for ids in batches:
        ids = ids.to(where)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total / max(count, 1)


def _skipped(_module: nn.Module, args: tuple, kwargs: dict, output):
    """A forward hook that makes a block the identity: its output hidden states are its input."""
    x = args[0] if args else kwargs["hidden_states"]
    return x if isinstance(output, Tensor) else (x, *output[1:])


@torch.no_grad()
def loss_increase(model: nn.Module, structure: Structure, batches: list[Tensor]) -> Tensor:
    """ΔL_i of every block (float64 [blocks], module docstring)."""
    dense = calibration_loss(model, batches)
    increase = []
    for block in structure.blocks:
        handle = block.register_forward_hook(_skipped, with_kwargs=True)
        try:
            increase.append(calibration_loss(model, batches) - dense)
        finally:
            handle.remove()
    return torch.tensor(increase, dtype=torch.float64)


def blocks_to_remove(scores: Tensor, count: int) -> list[int]:
    """The `count` blocks of lowest score (ties: lower index first), ascending."""
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


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
