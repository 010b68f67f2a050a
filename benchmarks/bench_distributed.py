"""One exact global threshold over fp32 scores split across 2 gloo ranks: summed radix histograms
(ours) against all_gather of the scores + single-process kth_smallest; seconds and bytes per rank."""

import pytest

from pyprune_fast.bench import distributed

SIZES = [1_000_000, 100_000_000]


@pytest.mark.parametrize("total", SIZES)
def test_global_threshold_2_ranks(benchmark, total):
    result = benchmark.pedantic(distributed.measure, args=(total, 2), rounds=1, iterations=1)
    assert result["same_masks"]
    for impl in distributed.IMPLS:
        benchmark.extra_info[impl] = result[impl]


@pytest.mark.large
def test_global_threshold_1b_scores_2_ranks(benchmark):
    """1 B fp32 scores, 500 M a rank: ours only (gathering them would put 4 GB of scores, plus the
    concatenation and the masks, on each of the 2 ranks: more than this 24 GB machine holds)."""
    result = benchmark.pedantic(
        distributed.measure, args=(1_000_000_000, 2), kwargs={"impls": distributed.IMPLS[:1]}, rounds=1, iterations=1
    )
    benchmark.extra_info[distributed.IMPLS[0]] = result[distributed.IMPLS[0]]
