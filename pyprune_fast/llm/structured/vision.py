"""Saving and loading structurally pruned timm and torchvision vision transformers (no Hugging Face
config to record their shapes in):

    save_vision(model, "out/vit-w25")                       # model.safetensors + shapes in its metadata
    dense = timm.create_model("vit_base_patch16_224")       # the library's own factory, same arguments
    model = load_vision("out/vit-w25", dense)               # reshaped to the saved widths, weights loaded

The directory holds one `model.safetensors`: every tensor of the state dict, and in the file's metadata
(key "pyprune_fast") a JSON record of the architecture, the number of blocks and each block's MLP width
and heads. `load_vision` takes a dense model built by the same factory call (its weights are not read),
keeps its first `blocks` blocks (depth pruning renumbers the kept blocks: every block has the same
shapes), resizes each block's Linears to the recorded widths and loads the tensors strictly. No
pickles, no remote code. Hugging Face models (BERT, ViT) use llm.save_pretrained / llm.load_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...io import commit_dir, discard, new_temp_dir
from .layout import structure_of
from .load import reshape_

FILE = "model.safetensors"
KEY = "pyprune_fast"


def save_vision(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes `model` (a timm or torchvision ViT, pruned or not) to the directory `path` (module
    docstring), atomically as llm.save_pretrained; FileExistsError when `path` exists unless `overwrite`."""
    s = structure_of(model)
    if s.config is not None:
        raise TypeError(f"model: a Hugging Face {s.arch} model: save it with llm.save_pretrained")
    n = len(s.blocks)
    record = {
        "arch": s.arch,
        "blocks": n,
        "intermediate_size": [s.intermediate(i) for i in range(n)],
        "num_attention_heads": [s.block_heads(i) for i in range(n)],
    }
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    staging = new_temp_dir(path)
    try:
        save_file(state, str(Path(staging) / FILE), metadata={KEY: json.dumps(record)})
        commit_dir(staging, path)
    except BaseException:
        discard(staging)
        raise
    return path


def load_vision(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """`model` (a dense model from the same factory call as the saved one) reshaped to the widths and
    depth saved in `path` and holding its weights, in eval mode. ValueError naming the mismatch when the
    file records another architecture or its tensors do not fit."""
    file = Path(path) / FILE
    if not file.is_file():
        raise ValueError(f"{path} holds no {FILE}")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if KEY not in metadata:
        raise ValueError(f"{file}: no {KEY!r} record (not written by save_vision)")
    record = json.loads(metadata[KEY])
    s = structure_of(model)
    if s.arch != record["arch"]:
        raise ValueError(f"{file} holds a {record['arch']} model; model is a {s.arch}")
    n = int(record["blocks"])
    if n > len(s.blocks):
        raise ValueError(f"{file} holds {n} blocks; model has {len(s.blocks)}")
    if n < len(s.blocks):
        parent_name, _, child = s.prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        kept = list(s.blocks)[:n]
        setattr(parent, child, nn.Sequential(*kept) if isinstance(s.blocks, nn.Sequential) else nn.ModuleList(kept))
    reshape_(model, {k: record[k] for k in ("intermediate_size", "num_attention_heads")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{file}: the weights do not match the recorded shapes: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()
