"""Writing a (pruned) Hugging Face model as a directory that `from_pretrained` loads, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..io import commit_dir, discard, new_temp_dir


def save_pretrained(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes `model` (safetensors weights, config, generation config) and `tokenizer` (None: none)
    to the directory `path`, which `AutoModelForCausalLM.from_pretrained(path)` then loads.

    Args:
        model: a Hugging Face PreTrainedModel.
        tokenizer: its tokenizer, or None.
        path: the output directory.
        overwrite: replace an existing `path` (else FileExistsError).

    Returns:
        `path` as a Path.

    Atomic: everything is written into a temporary directory beside `path` and renamed into place
    only when complete, so `path` never holds a half-written model; on an error the temporary
    directory is removed and an existing `path` is left as it was. FileExistsError when `path`
    exists, unless `overwrite` (the old directory is then replaced)."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    staging = new_temp_dir(path)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        commit_dir(staging, path)
    except BaseException:
        discard(staging)
        raise
    return path
