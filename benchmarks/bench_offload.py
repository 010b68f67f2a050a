"""Disk-streamed pruning of a synthetic Llama-architecture checkpoint of 6.6 GB (bfloat16, random
weights, written by the benchmark): peak RSS and time per block of `llm.prune(path, offload="disk")`
against from_pretrained + in-memory pruning + save_pretrained, each in a fresh process; a 7.0 GB
mixture-of-experts checkpoint (Mixtral, fused experts) streamed the same way; and the whole CLI run
(evaluations and report included) phase by phase. Marked large (about 15 minutes and 20 GB of disk on
2 cores for the first, more for the others): `pytest benchmarks/bench_offload.py --run-large -s`."""

import pytest

from pyprune_fast.bench import offload

pytestmark = pytest.mark.large


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload") / "llama-3b"
    size = offload.synthetic_checkpoint(path)
    assert size >= 6e9
    return path, size


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_stream_a_6gb_checkpoint(benchmark, checkpoint, mode, tmp_path):
    path, size = checkpoint
    run = benchmark.pedantic(offload.run_prune, args=(path, tmp_path / mode, mode), rounds=1, iterations=1)
    blocks = run["block_seconds"]
    benchmark.group = "prune a 6.6 GB Llama checkpoint (wanda 50 %, 4 × 128 tokens)"
    per_block = sum(blocks) / len(blocks)
    benchmark.extra_info.update(
        {"checkpoint_bytes": size, "peak_rss_bytes": run["peak_rss_bytes"], "seconds_per_block": per_block}
    )
    print(f"\n{mode}: {run['seconds']:.0f} s, {per_block:.1f} s per block, "
          f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, checkpoint {size / 2**30:.2f} GiB")  # fmt: skip
    assert run["sparsity"] == pytest.approx(0.5, abs=1e-6)
    if mode == "disk":
        assert run["peak_rss_bytes"] < 1.5 * 2**30


@pytest.fixture(scope="module", params=["fused", "per_expert"])
def moe_checkpoint(tmp_path_factory, request):
    """The 7 GB Mixtral, its experts stored fused (3-D tensors) or one tensor per expert (the hub's layout)."""
    path = tmp_path_factory.mktemp("offload") / f"mixtral-3.5b-{request.param}"
    size = offload.synthetic_checkpoint(path, moe=True, per_expert=request.param == "per_expert")
    assert size >= 6e9
    return path, size


def test_stream_a_7gb_moe_checkpoint(benchmark, moe_checkpoint, tmp_path):
    """The mixture-of-experts case: one block's experts (95 % of it) in memory at a time."""
    path, size = moe_checkpoint
    run = benchmark.pedantic(offload.run_prune, args=(path, tmp_path / "disk", "disk"), rounds=1, iterations=1)
    blocks = run["block_seconds"]
    benchmark.group = "prune a 7.0 GB Mixtral checkpoint (wanda 50 %, 4 × 128 tokens, experts on their tokens)"
    benchmark.extra_info.update({"checkpoint_bytes": size, "peak_rss_bytes": run["peak_rss_bytes"],
                                 "seconds_per_block": sum(blocks) / len(blocks)})  # fmt: skip
    print(f"\nmoe disk: {run['seconds']:.0f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
          f"checkpoint {size / 2**30:.2f} GiB")  # fmt: skip
    assert run["peak_rss_bytes"] < 1.75 * 2**30  # measured 1.59 GiB; a second block would add 0.39 GiB


def test_the_cli_run_phase_by_phase(tmp_path_factory, tmp_path):
    """`pyprune-fast prune --offload disk --save-model` on a 6.1 GB checkpoint of 32 blocks with SmolLM2's
    tokenizer: the peak RSS and the seconds of each phase (load, dense evaluation, pruning block by
    block, pruned evaluation, report), 1 thread. The whole run must stay below 1.5 GiB."""
    from pyprune_fast import llm

    path = tmp_path_factory.mktemp("offload-cli") / "llama-32"
    size = offload.synthetic_checkpoint(path, tokenizer=llm.smollm2_checkpoint(), **offload.CLI)
    assert size >= 6e9
    args = ["--criterion", "wanda", "--sparsity", "0.5", "--samples", "4", "--eval-tokens", "512", "--save-model"]
    run = offload.run_cli(path, tmp_path / "out", *args, "--quiet")
    for name, phase in run["phases"].items():
        print(f"{name:50s} {phase['peak_rss_bytes'] / 2**20:7.0f} MiB {phase['seconds']:8.1f} s ×{phase['count']}")
    assert run["exit"] == 0
    assert run["peak_rss_bytes"] < 1.5 * 2**30
