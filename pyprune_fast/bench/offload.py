"""Pruning a checkpoint larger than we want in memory: `llm.prune(path, offload="disk")` streaming a
synthetic Llama-architecture checkpoint (random weights, written here block by block, so that making
it never holds the model in memory either) against what users run today, `from_pretrained` and
pruning in memory. Each run is a fresh process, so its peak RSS (ru_maxrss) is the run's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ..llm.checkpoint import shard_name, write_index, write_shard

# ≈ 3.3 B parameters, 6.6 GB in bfloat16: 28 blocks of hidden 3072, MLP 8192, 24 heads (8 KV heads).
BIG = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
       "num_key_value_heads": 8, "vocab_size": 32000}  # fmt: skip
# ≈ 3.5 B parameters, 7.0 GB in bfloat16: a Mixtral of 16 blocks, hidden 2048, 8 experts of width 4096
# (top-2), 16 heads (4 KV heads); the experts hold 95 % of each block.
BIG_MOE = {"hidden_size": 2048, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000}  # fmt: skip


def synthetic_checkpoint(
    path: str | os.PathLike, *, moe: bool = False, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **sizes: int
) -> int:
    """Writes a LlamaForCausalLM checkpoint (moe=True: a MixtralForCausalLM, its experts stored as the
    model's fused 3-D parameters, as `save_pretrained(save_original_format=False)` writes them) with
    random weights (N(0, 0.02)) to the directory `path`: config.json, one shard per decoder block plus
    one for the rest, the index. Returns its size in bytes. `sizes`: config fields (default BIG or
    BIG_MOE). Memory: one block at a time (each expert drawn on its own)."""
    from transformers import LlamaConfig, MixtralConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kind, defaults = (MixtralConfig, BIG_MOE) if moe else (LlamaConfig, BIG)
    config = kind(
        **{**defaults, **sizes}, tie_word_embeddings=False, architectures=[kind.__name__[:-6] + "ForCausalLM"]
    )
    config.save_pretrained(path)
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    weight_map, total = {}, 0
    front = {
        "model.embed_tokens.weight": rand(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
        "lm_head.weight": rand(config.vocab_size, h),
    }
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
    }
    if moe:
        shapes["mlp.gate"] = (config.num_local_experts, h)
    else:
        shapes.update({"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)})
    for index in range(n + 1):
        if index == 0:
            tensors = front
        else:
            prefix = f"model.layers.{index - 1}."
            tensors = {f"{prefix}{name}.weight": rand(*shape) for name, shape in shapes.items()}
            if moe:
                experts = range(config.num_local_experts)
                tensors[f"{prefix}mlp.experts.gate_up_proj"] = torch.stack([rand(2 * i, h) for _ in experts])
                tensors[f"{prefix}mlp.experts.down_proj"] = torch.stack([rand(h, i) for _ in experts])
            tensors[f"{prefix}input_layernorm.weight"] = torch.ones(h, dtype=dtype)
            tensors[f"{prefix}post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        shard = shard_name(index + 1, n + 1)
        write_shard(path / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    write_index(path, weight_map, total)
    return total


_CHILD = r"""
import json, resource, sys, time
import torch
from pyprune_fast import llm
path, out, mode, method, samples, seq_len = sys.argv[1:7]
vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
calibration = torch.randint(0, vocab, (int(samples) * int(seq_len),), generator=torch.Generator().manual_seed(0))
options = dict(method=method, sparsity=0.5, num_samples=int(samples), seq_len=int(seq_len), progress=False)
start = time.perf_counter()
if mode == "disk":
    result = llm.prune(path, calibration, offload="disk", out=out, **options)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    result = llm.prune(model, calibration, **options)
    llm.save_pretrained(model, None, out)
print(json.dumps({"seconds": time.perf_counter() - start, "block_seconds": result.block_seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "sparsity": result.overall_sparsity}))
"""


def run_prune(path, out, mode: str, method: str = "wanda", samples: int = 4, seq_len: int = 128) -> dict:
    """Prunes the checkpoint at `path` into `out` in a fresh process — mode "disk" (offload="disk") or
    "memory" (from_pretrained, llm.prune, save_pretrained) — and returns {seconds, block_seconds,
    peak_rss_bytes, sparsity}."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(out), mode, method, str(samples), str(seq_len)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
