"""The LLM pipeline: the SparseGPT solve per Linear vs a straightforward transcription of the published
algorithm, Wanda's metric + per-row masks vs its published loop, and the time to prune one LLaMA-7B-shaped
decoder block with llm.prune. Each comparison first checks that ours and the baseline agree."""

import pytest
import torch

from benchmarks.conftest import run_case
from pyprune_fast.bench import llm

# The straightforward SparseGPT needs ~rows·cols²/2 rank-1 updates: LLaMA-7B's shapes (4096×4096,
# 4096×11008) take minutes per call on 2 cores, so the default run uses them scaled by 1/4.
SCALE = 0.25

_CACHE = {}


def case(name, *args, **kwargs):
    key = (name, *args, *kwargs.items())
    if key not in _CACHE:
        _CACHE.clear()  # one workload's tensors in memory at a time
        _CACHE[key] = built = getattr(llm, name)(*args, **kwargs)
        if name == "sparsegpt_case":
            llm.check_sparsegpt()  # same masks and weights (float64, small case), 50 % and 2:4
        elif name == "wanda_case":
            ours, published = built.ours(), next(iter(built.baselines.values()))()
            assert all(torch.equal(ours[n], published[n]) for n in ours), "Wanda masks differ"
    return _CACHE[key]


SPARSEGPT_IMPLS = ["ours", "straightforward SparseGPT"]


@pytest.mark.parametrize("sparsity", ["50%", "2:4"])
@pytest.mark.parametrize("impl", SPARSEGPT_IMPLS)
def test_sparsegpt_q_proj(benchmark, impl, sparsity):
    """LLaMA-7B's q_proj 4096×4096 × SCALE."""
    run_case(benchmark, case("sparsegpt_case", 4096, 4096, sparsity, scale=SCALE), impl, rounds=3)


@pytest.mark.parametrize("sparsity", ["50%", "2:4"])
@pytest.mark.parametrize("impl", SPARSEGPT_IMPLS)
def test_sparsegpt_down_proj(benchmark, impl, sparsity):
    """LLaMA-7B's down_proj 4096×11008 × SCALE."""
    run_case(benchmark, case("sparsegpt_case", 4096, 11008, sparsity, scale=SCALE), impl, rounds=3)


@pytest.mark.large
@pytest.mark.parametrize("sparsity", ["50%", "2:4"])
@pytest.mark.parametrize("impl", SPARSEGPT_IMPLS)
def test_sparsegpt_q_proj_full(benchmark, impl, sparsity):
    run_case(benchmark, case("sparsegpt_case", 4096, 4096, sparsity), impl, rounds=1)


@pytest.mark.parametrize("impl", ["ours", "published Wanda loop (sort + scatter)"])
def test_wanda_llama7b_block(benchmark, impl):
    """The 7 Linears of one LLaMA-7B block at full size (202 M weights)."""
    run_case(benchmark, case("wanda_case"), impl, rounds=3, memory=True)


@pytest.mark.parametrize(
    ("method", "sparsity"), [("wanda", 0.5), ("wanda", "2:4"), ("sparsegpt", 0.5), ("sparsegpt", "2:4")]
)
def test_prune_llama7b_block(benchmark, method, sparsity):
    """llm.prune of one LLaMA-7B-shaped block (4 × 256 calibration tokens), one timed run; the dense weights
    are restored before it, untimed."""
    if "block" not in _CACHE:
        _CACHE.clear()
        _CACHE["block"] = llm.BlockPruning()
    job = _CACHE["block"]
    benchmark.group = "llm.prune one LLaMA-7B block (4 x 256 tokens) cpu"
    benchmark.extra_info.update({"method": method, "sparsity": str(sparsity)})
    result = benchmark.pedantic(job.prune, (method, sparsity), setup=job.restore, rounds=1, warmup_rounds=0)
    assert abs(result.overall_sparsity - 0.5) < 1e-6
