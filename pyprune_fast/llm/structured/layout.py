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

Only the architectures below are known; any other is refused by name before anything is touched (a
Linear's rows are never removed without knowing which head they belong to)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..blocks import find_blocks


@dataclass(frozen=True)
class Layout:
    """Module names, relative to a decoder block, of one architecture's coupled groups.

    `mlp_bias` / `attention_bias`: the config flag with which the stock class gives the MLP / the
    attention Linears a bias (None: the class has no such flag, and a consumer without a bias gets none:
    no bias compensation there). `standard_heads`: whether a model with fewer heads is still a standard
    config of the stock class (OPT derives head_dim = hidden / heads, so it is not)."""

    producers: tuple[str, ...]
    consumer: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    intermediate_key: str
    mlp_bias: str | None
    attention_bias: str | None
    standard_heads: bool


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
    "mistral": Layout(**_LLAMA_LIKE, mlp_bias=None, attention_bias=None),
    "qwen2": Layout(**_LLAMA_LIKE, mlp_bias=None, attention_bias=None),
    "qwen3": Layout(**_LLAMA_LIKE, mlp_bias=None, attention_bias="attention_bias"),
    "opt": Layout(
        producers=("fc1",),
        consumer="fc2",
        attention="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        intermediate_key="ffn_dim",
        mlp_bias=None,
        attention_bias=None,
        standard_heads=False,
    ),
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

    @property
    def group(self) -> int:
        """Query heads per key/value group (1: multi-head attention)."""
        return self.heads // self.kv

    def linear(self, i: int, name: str) -> nn.Linear:
        return self.blocks[i].get_submodule(name)

    def intermediate(self, i: int) -> int:
        return self.linear(i, self.layout.consumer).in_features

    def block_heads(self, i: int) -> int:
        return self.linear(i, self.layout.q).out_features // self.head_dim


def _shared_parameters(model: nn.Module, prefix: str) -> list[str]:
    """Parameters of the blocks that are shared with another module (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return sorted(n for names in owners.values() if len(names) > 1 for n in names if n.startswith(prefix + "."))


def structure_of(model: nn.Module) -> Structure:
    """The Structure of a Hugging Face decoder LLM; ValueError (the model untouched) for an architecture
    whose attention is not known, a block that does not hold the expected Linears, inconsistent head
    geometry, or weights shared inside the blocks (tied or shared Linears)."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in LAYOUTS:
        name = arch or type(model).__name__
        raise ValueError(
            f"architecture {name}: its attention is not known to the structured pruner (known: {', '.join(LAYOUTS)})"
        )
    layout = LAYOUTS[arch]
    prefix, blocks = find_blocks(model)
    shared = _shared_parameters(model, prefix)
    if shared:
        raise ValueError(f"model: the structured pruner refuses weights shared inside the decoder blocks: {shared}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if heads % kv:
        raise ValueError(f"architecture {arch}: {heads} query heads do not split into {kv} key/value groups")
    for i, block in enumerate(blocks):
        names = (*layout.producers, layout.consumer, layout.q, layout.k, layout.v, layout.o)
        for n in names:
            try:
                m = block.get_submodule(n)
            except AttributeError:
                m = None
            if not isinstance(m, nn.Linear):
                raise ValueError(f"architecture {arch}: block {i} has no nn.Linear {n!r} (a layout it does not know)")
    return Structure(arch, prefix, blocks, layout, hidden, heads, kv, head_dim)
