"""One exact global threshold over fp32 scores split across 2 gloo ranks: summed radix histograms
(ours) against all_gather of the scores + single-process kth_smallest; seconds and bytes per rank."""

import pytest

from pyprune_fast.bench import distributed

SIZES = [1_000_000, 100_000_000, pytest.param(1_000_000_000, marks=pytest.mark.large)]


@pytest.mark.parametrize("total", SIZES)
def test_global_threshold_2_ranks(benchmark, total):
    result = benchmark.pedantic(distributed.measure, args=(total, 2), rounds=1, iterations=1)
    assert result["same_masks"]
    for impl in distributed.IMPLS:
        benchmark.extra_info[impl] = result[impl]
