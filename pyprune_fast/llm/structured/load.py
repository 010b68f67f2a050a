"""Loading a structurally pruned model saved by `llm.save_pretrained`.

Uniform widths and depth pruning give a standard config: stock `AutoModelForCausalLM.from_pretrained`
loads the directory (`load_pretrained` then does just that). Non-uniform widths (allocation="global",
or OPT and BERT with heads removed: their attention derives head_dim = hidden / heads, so fewer heads
is not a standard config of theirs) are recorded in the config as `pyprune_fast_widths` (per block: MLP channels,
query heads); transformers 5.25 has no per-layer widths for these architectures, so stock
from_pretrained refuses the directory (its tensors do not match the config's shapes) and
`load_pretrained` rebuilds the shapes: the stock class from the config, each block's Linears resized to
the recorded widths, then the safetensors weights loaded strictly. Expert removal with global allocation
(llm.prune_experts) leaves MoE layers with different expert counts, recorded as `pyprune_fast_experts`
(per MoE layer; the config's expert count is the largest): `load_pretrained` resizes each layer's
router and experts the same way. Mixture-of-experts width pruning with blocks that differ (allocation="global")
records per block the routed experts' (dense blocks: the MLP's) width, the shared experts' width and the
query heads in `pyprune_fast_widths` (moe_width.finish_config): `load_pretrained` resizes each block's
fused expert tensors, shared experts, MLP and attention (moe_width.reshape_). No pickles, no remote code. An
encoder (config.architectures a class such as BertModel or ViTModel) is built by that class."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .edit import Edits
from .layout import set_head_attrs, structure_of
from .moe_width import has_moe
from .moe_width import reshape_ as moe_reshape_


def _empty_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, dtype=like.weight.dtype)


def reshape_(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Every block's Linears resized to `widths` (uninitialized weights: loaded next); the attention's
    head bookkeeping set (layout.set_head_attrs)."""
    s = structure_of(model)
    layout, d = s.layout, s.head_dim
    intermediate, heads = widths["intermediate_size"], widths["num_attention_heads"]
    if len(intermediate) != len(s.blocks) or len(heads) != len(s.blocks):
        raise ValueError(f"pyprune_fast_widths lists {len(intermediate)} blocks; the config has {len(s.blocks)}")
    edits = Edits()
    for i, block in enumerate(s.blocks):
        width, h = int(intermediate[i]), int(heads[i])
        for p in layout.producers:
            lin = s.linear(i, p)
            edits.replace(block, p, _empty_linear(lin, lin.in_features, width))
        lin = s.linear(i, layout.consumer)
        edits.replace(block, layout.consumer, _empty_linear(lin, width, lin.out_features))
        if not layout.heads_removable:
            continue
        parts = 3 if layout.packed_qkv else 1
        for p in (layout.q,) if s.group > 1 else dict.fromkeys((layout.q, layout.k, layout.v)):
            lin = s.linear(i, p)
            edits.replace(block, p, _empty_linear(lin, lin.in_features, parts * h * d))
        lin = s.linear(i, layout.o)
        edits.replace(block, layout.o, _empty_linear(lin, h * d, lin.out_features))
        set_head_attrs(edits.set, block.get_submodule(layout.attention), h, s)


def _model_names(model: nn.Module, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The saved tensors under the model's own names: stock save_pretrained writes some under their
    checkpoint names (GPT-NeoX's lm_head as embed_out, Mixtral's experts one tensor each as
    block_sparse_moe.experts.3.w1.weight), which stock from_pretrained renames and stacks back by
    transformers' conversion mapping; llm.offload.checkpoint_names applies it the same way."""
    from ..offload import checkpoint_names

    names = checkpoint_names(model, list(state), path)
    out = {}
    for key in list(state):
        if key in state:  # (the other experts of a stack are taken with the first)
            name = names.model[key]
            out[name] = names.fuse(name, state)
    return out


def reshape_experts_(model: nn.Module, counts: list[int]) -> None:
    """Every MoE layer given its recorded count of routed experts (`pyprune_fast_experts`, in
    llm.structured.experts.moe_layers order; uninitialized tensors: loaded next)."""
    from .experts import moe_layers, resize_experts

    layers = moe_layers(model)
    if len(counts) != len(layers):
        raise ValueError(f"pyprune_fast_experts lists {len(counts)} MoE layers; the config has {len(layers)}")
    edits = Edits()
    for (_, _, m), count in zip(layers, counts):
        resize_experts(m, int(count), lambda t, n=int(count): t.new_empty((n, *t.shape[1:])), edits)


def _model_class(config: Any) -> Any:
    """The class that builds `config`: its recorded architecture when transformers has it and it is not
    a causal LM (an encoder: BertModel, ViTModel), else AutoModelForCausalLM."""
    import transformers

    name = (getattr(config, "architectures", None) or [""])[0]
    if name and not name.endswith("ForCausalLM") and hasattr(transformers, name):
        return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def _encoder_options(cls: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The constructor options a config does not record: add_pooling_layer=False when the saved weights
    hold no pooler (the default MiniLM's BertModel is built without one)."""
    takes = inspect.signature(cls.__init__).parameters
    if "add_pooling_layer" in takes and not any(k.startswith("pooler.") for k in state):
        return {"add_pooling_layer": False}
    return {}


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """The (pruned) causal LM of a directory written by `llm.save_pretrained`, and its tokenizer (None
    when the directory has none); the model in eval mode.

    A standard config: stock `from_pretrained`. A config with `pyprune_fast_widths` (per-block widths)
    or `pyprune_fast_experts` (per-layer routed expert counts, expert removal with global allocation):
    the stock class built from the config, its blocks resized, the `*.safetensors` weights loaded (every
    tensor must match; experts stored one tensor each are stacked as from_pretrained stacks them; the
    tied output embedding re-tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    widths = getattr(config, "pyprune_fast_widths", None)
    experts = getattr(config, "pyprune_fast_experts", None)
    if widths is None and experts is None:
        model = _model_class(config).from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path} holds no *.safetensors weights")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        cls = _model_class(config)
        model = cls.from_config(config) if cls is AutoModelForCausalLM else cls(config, **_encoder_options(cls, state))
        if widths is not None:
            (moe_reshape_ if has_moe(model) else reshape_)(model, widths)
        if experts is not None:
            reshape_experts_(model, experts)
        missing, unexpected = model.load_state_dict(_model_names(model, state, path), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(
                f"{path}: the weights do not match the recorded widths or expert counts: missing {missing}, "
                f"unexpected {unexpected}"
            )
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        if dtype is not None:
            model = model.to(dtype)
    from ..models import TOKENIZER_FILES

    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    return model.to(device).eval(), tokenizer
