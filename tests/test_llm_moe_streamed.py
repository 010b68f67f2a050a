"""Disk-streamed pruning (offload="disk") of mixture-of-experts checkpoints that store their experts one
tensor per expert (Mixtral's `block_sparse_moe.experts.3.w1.weight`, Qwen's `mlp.experts.3.gate_proj.weight`,
what stock save_pretrained writes): each block's experts are read and fused as the model holds them, and
written back in the layout the input had; the result equals the in-memory run's, and a checkpoint written
with fused experts gives the same."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pyprune_fast import llm
from pyprune_fast.errors import UsageError
from pyprune_fast.llm.offload import checkpoint_names
from tests.test_llm_moe import OPTIONS, calibration, tiny_moe

transformers = pytest.importorskip("transformers")


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_per_expert_checkpoints_stream_and_keep_their_layout(arch, tmp_path):
    model = tiny_moe(arch)
    model.save_pretrained(tmp_path / "unfused")  # stock: the experts one tensor each
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    unfused = _tensors(tmp_path / "unfused")
    per_expert = "block_sparse_moe.experts.3.w1.weight" if arch == "mixtral" else "mlp.experts.3.gate_proj.weight"
    assert f"model.layers.1.{per_expert}" in unfused and "model.layers.1.mlp.experts.gate_up_proj" not in unfused
    options = dict(method="wanda", sparsity=0.5, **OPTIONS)
    want = llm.prune(model, calibration(), **options)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(tokens).logits
    for layout in ("unfused", "fused"):
        out = tmp_path / f"out-{layout}"
        got = llm.prune(tmp_path / layout, calibration(), offload="disk", out=out, **options)
        assert got.layer_sparsity == want.layer_sparsity, layout
        written = _tensors(out)
        assert set(written) == set(_tensors(tmp_path / layout)), layout  # the input's layout, key for key
        with open(out / "model.safetensors.index.json") as f:
            assert set(json.load(f)["weight_map"]) == set(written)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        for name, p in model.named_parameters():
            assert torch.equal(loaded.get_parameter(name), p), (layout, name)
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, logits), layout


def test_the_per_expert_keys_are_fused_in_expert_order_and_split_back():
    model = tiny_moe("mixtral")
    keys = [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in (1, 0) for w in ("w1", "w2", "w3")]
    names = checkpoint_names(model, keys, "here")
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert names.keys(gate_up) == [keys[3], keys[0], keys[5], keys[2]]  # w1 of experts 0, 1, then w3
    stored = {k: torch.full((2, 3), float(i)) for i, k in enumerate(keys)}
    fused = names.fuse(gate_up, dict(stored))
    assert fused.shape == (2, 4, 3) and fused[0, 0, 0] == 3 and fused[1, 0, 0] == 0 and fused[0, 2, 0] == 5
    assert all(torch.equal(v, stored[k]) for k, v in names.split(gate_up, fused).items())
    with pytest.raises(UsageError, match=r"the experts of model.layers.0.mlp.experts.down_proj lack 1 tensors"):
        checkpoint_names(model, [k for k in keys if k != keys[4]], "here")  # expert 0 of w2
