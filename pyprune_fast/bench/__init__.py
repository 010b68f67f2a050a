"""Benchmark workloads, apart from the library: each op next to what a user would write today, built
once and shared by the pytest-benchmark suite (benchmarks/) and `pyprune-fast bench`. One module per op
family (`saliency`, `select`, `nm_mask`, `sparse24`, `svd_mean`, `channel`), each with its cases and
baselines; `harness` holds the one timing harness (Case, time_case, the peak-memory sampler, the ratio
table); `registry.WORKLOADS` names the workloads `pyprune-fast bench` runs. The library never imports
this package.
"""
