"""The coupled groups of each decoder block, by architecture: which rows and columns of which Linears
go together when one MLP channel or one attention head is removed.

    MLP channel j      rows j of the producers (gate_proj and up_proj; OPT: fc1), with their bias
                       entries, and column j of the consumer (down_proj; OPT: fc2)
    query head h       rows h·d … h·d + d − 1 of q_proj (d = head_dim) and the same columns of the
                       consumer o_proj (OPT: out_proj); Qwen3's q_norm/k_norm act on one head_dim and stay

Grouped-query attention (GQA, g = heads / key-value heads > 1): we remove **the same number of query
heads from every key/value group**; the key/value heads stay. Chosen over removing whole key/value
groups because (1) a key/value head serves g query heads, so a whole group is a coarse unit (SmolLM2 has
3 groups: one group is a third of its attention), while query heads are scored one by one; (2) the
key/value projections, the KV cache layout and the rotary embedding stay as they are, and the config
stays a standard one (num_attention_heads = num_key_value_heads × g', head_dim written out). Its cost:
the KV cache does not shrink. With g = 1 (multi-head attention: OPT, a Llama without GQA) every head is
its own group, and heads are removed whole: rows of q_proj, k_proj and v_proj, columns of o_proj.

GPT-NeoX (multi-head attention, every head removed whole; parallel attention + MLP residual, which
changes nothing here: each block is still calibrated and refitted on its own inputs):

    gpt_neox         mlp.dense_h_to_4h rows + mlp.dense_4h_to_h columns; attention.query_key_value is ONE
                     Linear [3·H·d, D] whose rows are heads × (q | k | v) × head_dim (interleaved per head:
                     a head's 3·d rows are contiguous) + attention.dense columns. GPTNeoXAttention derives
                     head_size = hidden / heads, so a GPT-NeoX with heads removed is not a standard config
                     (llm.load_pretrained rebuilds it); MLP channels only keep it standard

Encoders and vision transformers (multi-head attention: every head removed whole):

    bert             BertModel (also inside a wrapper such as the default MiniLM's SentenceEncoder):
                     intermediate.dense rows + output.dense columns; attention.self.query/key/value rows +
                     attention.output.dense columns. BERT derives its head size as hidden / heads, so a
                     BERT with heads removed is not a standard config (llm.load_pretrained rebuilds it)
    vit              Hugging Face ViTModel: mlp.fc1 / mlp.fc2; attention.q_proj/k_proj/v_proj + o_proj;
                     ViTConfig reads head_dim, so uniform widths stay a standard config
    timm_vit         timm VisionTransformer blocks: mlp.fc1 / mlp.fc2; attn.qkv is ONE Linear [3·H·d, D]
                     whose rows are (q | k | v) × heads × head_dim: a head's rows are sliced in all
                     three parts; attn.proj columns; Attention.num_heads / attn_dim updated
    torchvision_vit  torchvision VisionTransformer EncoderBlocks: MLP channels only (mlp.0 rows, mlp.3
                     columns). Its nn.MultiheadAttention requires embed_dim == num_heads · head_dim and
                     its out_proj width is embed_dim, so heads cannot be removed from it: head removal is
                     refused by name

HF models are recognized by config.model_type (the first submodule holding a config of a known type),
timm and torchvision by the class of their blocks. Only the architectures below are known; any other is
refused by name before anything is touched (a Linear's rows are never removed without knowing which
head they belong to)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UsageError
from ..blocks import find_blocks


@dataclass(frozen=True)
class Layout:
    """Module names, relative to a decoder block, of one architecture's coupled groups.

    `mlp_bias` / `attention_bias`: the config flag with which the stock class gives the MLP / the
    attention Linears a bias (None: the class has no such flag, and a consumer without a bias gets none:
    no bias compensation there). `standard_heads`: whether a model with fewer heads is still a standard
    config of the stock class (OPT derives head_dim = hidden / heads, so it is not). `packed_qkv`: q, k
    and v are one Linear (timm's attn.qkv), rows (q | k | v) × heads × head_dim, or with `qkv_per_head`
    heads × (q | k | v) × head_dim (GPT-NeoX's query_key_value). `heads_removable`: False
    where the attention cannot take fewer heads (nn.MultiheadAttention). `intermediate_key`: the config
    field of the MLP width (None: the model has no Hugging Face config)."""

    producers: tuple[str, ...]
    consumer: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    intermediate_key: str | None
    mlp_bias: str | None = None
    attention_bias: str | None = None
    standard_heads: bool = False
    packed_qkv: bool = False
    heads_removable: bool = True
    qkv_per_head: bool = False


_LLAMA_LIKE = dict(
    producers=("mlp.gate_proj", "mlp.up_proj"),
    consumer="mlp.down_proj",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    intermediate_key="intermediate_size",
    standard_heads=True,
)

# The flags checked against transformers 5.25: LlamaMLP / LlamaAttention build their Linears with
# bias=config.mlp_bias / config.attention_bias; Qwen3Attention with config.attention_bias (its MLP has
# no bias); Mistral's and Qwen2's o_proj and MLP are bias-free with no flag (Qwen2's q/k/v have biases).
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(**_LLAMA_LIKE, mlp_bias="mlp_bias", attention_bias="attention_bias"),
    "mistral": Layout(**_LLAMA_LIKE),
    "qwen2": Layout(**_LLAMA_LIKE),
    "qwen3": Layout(**_LLAMA_LIKE, attention_bias="attention_bias"),
    "opt": Layout(
        producers=("fc1",),
        consumer="fc2",
        attention="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        intermediate_key="ffn_dim",
    ),
    "gpt_neox": Layout(
        producers=("mlp.dense_h_to_4h",),
        consumer="mlp.dense_4h_to_h",
        attention="attention",
        q="attention.query_key_value",
        k="attention.query_key_value",
        v="attention.query_key_value",
        o="attention.dense",
        intermediate_key="intermediate_size",
        attention_bias="attention_bias",
        packed_qkv=True,
        qkv_per_head=True,
    ),
    "bert": Layout(
        producers=("intermediate.dense",),
        consumer="output.dense",
        attention="attention.self",
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
        intermediate_key="intermediate_size",
    ),
    "vit": Layout(
        producers=("mlp.fc1",),
        consumer="mlp.fc2",
        attention="attention",
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        o="attention.o_proj",
        intermediate_key="intermediate_size",
        standard_heads=True,
    ),
    "timm_vit": Layout(
        producers=("mlp.fc1",),
        consumer="mlp.fc2",
        attention="attn",
        q="attn.qkv",
        k="attn.qkv",
        v="attn.qkv",
        o="attn.proj",
        intermediate_key=None,
        packed_qkv=True,
    ),
    "torchvision_vit": Layout(
        producers=("mlp.0",),
        consumer="mlp.3",
        attention="self_attention",
        q="self_attention.out_proj",
        k="self_attention.out_proj",
        v="self_attention.out_proj",
        o="self_attention.out_proj",
        intermediate_key=None,
        heads_removable=False,
    ),
}

# Blocks recognized by their class (models without a Hugging Face config): (module, class name) -> arch
_BLOCK_CLASSES = {
    ("timm.models.vision_transformer", "Block"): "timm_vit",
    ("torchvision.models.vision_transformer", "EncoderBlock"): "torchvision_vit",
}


@dataclass
class Structure:
    """A decoder LLM as the structured pruner sees it: its architecture, blocks, layout and head geometry
    (`heads` query heads in `kv` key/value groups of `heads // kv`, each `head_dim` wide)."""

    arch: str
    prefix: str
    blocks: nn.ModuleList
    layout: Layout
    hidden: int
    heads: int
    kv: int
    head_dim: int
    config: Any = None

    @property
    def group(self) -> int:
        """Query heads per key/value group (1: multi-head attention)."""
        return self.heads // self.kv

    def linear(self, i: int, name: str) -> nn.Linear:
        return self.blocks[i].get_submodule(name)

    def intermediate(self, i: int) -> int:
        return self.linear(i, self.layout.consumer).in_features

    def block_heads(self, i: int) -> int:
        if not self.layout.heads_removable:
            return self.heads
        parts = 3 if self.layout.packed_qkv else 1
        return self.linear(i, self.layout.q).out_features // (parts * self.head_dim)

    def qkv_rows(self, i: int, cols: Tensor) -> Tensor:
        """The rows of the (packed) q/k/v Linear that hold the head columns `cols` (of o's input): the
        same indices, or with a packed qkv those of q, k and v (each part block_heads(i)·d rows; per
        head: each head's 3·d contiguous rows)."""
        if not self.layout.packed_qkv:
            return cols
        d = self.head_dim
        if self.layout.qkv_per_head:
            heads = cols.reshape(-1, d)[:, 0] // d
            return (heads.unsqueeze(1) * 3 * d + torch.arange(3 * d)).flatten()
        width = self.block_heads(i) * d
        return torch.cat([cols + part * width for part in range(3)])


def set_head_attrs(set_: Any, attention: nn.Module, heads: int, structure: Structure) -> None:
    """The attention module's head bookkeeping for `heads` kept heads, through `set_(owner, name, value)`:
    num_key_value_groups (GQA), num_heads / num_attention_heads, all_head_size / attn_dim (BERT, timm)."""
    values = {
        "num_key_value_groups": heads // structure.kv,
        "num_heads": heads,
        "num_attention_heads": heads,
        "all_head_size": heads * structure.head_dim,
        "attn_dim": heads * structure.head_dim,
    }
    for name, value in values.items():
        if isinstance(getattr(attention, name, None), int):
            set_(attention, name, value)


def shared_parameters(model: nn.Module, prefix: str) -> list[str]:
    """Parameters of the blocks that are shared with another module (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return sorted(n for names in owners.values() if len(names) > 1 for n in names if n.startswith(prefix + "."))


def _architecture(model: nn.Module) -> tuple[str | None, Any]:
    """(arch, Hugging Face config or None): the model's own config, else the first submodule's config of
    a known type (a BertModel inside a wrapper), else the class of the blocks (timm, torchvision)."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch is not None:
        return arch, config
    for module in model.modules():
        inner = getattr(module, "config", None)
        if getattr(inner, "model_type", None) in LAYOUTS:
            return inner.model_type, inner
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return None, None
    kind = type(blocks[0])
    return _BLOCK_CLASSES.get((kind.__module__, kind.__name__)), None


def geometry(arch: str, config: Any, blocks: nn.ModuleList) -> tuple[int, int, int, int]:
    """(hidden, heads, key/value heads, head_dim) from the config, or from the attention module."""
    if config is not None:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        hidden = int(config.hidden_size)
        return hidden, heads, kv, int(getattr(config, "head_dim", None) or hidden // heads)
    attention = blocks[0].get_submodule(LAYOUTS[arch].attention)
    if arch == "timm_vit":
        if not isinstance(attention.norm, nn.Identity) or getattr(attention, "gate", None) is not None:
            raise UsageError("`model`: architecture timm_vit: an Attention with scale_norm or a gate is not known")
        heads, head_dim = int(attention.num_heads), int(attention.head_dim)
        return attention.qkv.in_features, heads, heads, head_dim
    heads = int(attention.num_heads)
    return int(attention.embed_dim), heads, heads, int(attention.head_dim)


def structure_of(model: nn.Module) -> Structure:
    """The Structure of a Hugging Face decoder LLM, a BERT / Hugging Face ViT encoder, or a timm /
    torchvision ViT; UsageError naming `model` (the model untouched) for an architecture whose attention
    is not known, a block that does not hold the expected Linears, query heads that do not split into the
    key/value groups (in the config or in any block), or weights shared inside the blocks (tied or shared
    Linears)."""
    arch, config = _architecture(model)
    if arch not in LAYOUTS:
        name = arch or type(model).__name__
        raise UsageError(
            f"`model`: architecture {name}: its attention is not known to the structured pruner "
            f"(known: {', '.join(LAYOUTS)})"
        )
    layout = LAYOUTS[arch]
    prefix, blocks = find_blocks(model)
    shared = shared_parameters(model, prefix)
    if shared:
        raise UsageError(f"`model`: the structured pruner refuses weights shared inside the decoder blocks: {shared}")
    hidden, heads, kv, head_dim = geometry(arch, config, blocks)
    if heads % kv:
        raise UsageError(f"`model`: architecture {arch}: {heads} query heads do not split into {kv} key/value groups")
    for i, block in enumerate(blocks):
        names = (*layout.producers, layout.consumer, layout.q, layout.k, layout.v, layout.o)
        for n in names:
            try:
                m = block.get_submodule(n)
            except AttributeError:
                m = None
            if not isinstance(m, nn.Linear):
                raise UsageError(
                    f"`model`: architecture {arch}: block {i} has no nn.Linear {n!r} (a layout it does not know)"
                )
    structure = Structure(arch, prefix, blocks, layout, hidden, heads, kv, head_dim, config)
    gqa = layout.heads_removable and structure.group > 1  # (multi-head attention: any head count)
    rows = [structure.linear(i, layout.q).out_features for i in range(len(blocks))] if gqa else []
    uneven = [i for i, r in enumerate(rows) if r % (head_dim * kv)]
    if uneven:
        raise UsageError(
            f"`model`: architecture {arch}: the query heads of blocks {uneven} do not split into its {kv} key/value "
            f"groups of {head_dim}-wide heads (grouped-query attention keeps the same number in every group)"
        )
    return structure
