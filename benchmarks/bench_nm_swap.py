"""Kept-score gains of N:M channel swaps and the permutation search on them against pure PyTorch."""

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench.nm_swap import nm_swap_case

_CASES = {}


def case(*key):
    if key not in _CASES:
        _CASES.clear()
        _CASES[key] = nm_swap_case(*key)
    return _CASES[key]


@pytest.mark.parametrize("impl", ["ours", "pure PyTorch"])
def test_nm_swap_gains_cpu(benchmark, impl):
    run_case(benchmark, case("smollm2_down_proj", False, "cpu"), impl)


@pytest.mark.parametrize("impl", ["ours", "pure-PyTorch search"])
def test_nm_permutation_cpu(benchmark, impl):
    run_case(benchmark, case("smollm2_down_proj", True, "cpu"), impl)


@pytest.mark.parametrize("impl", ["ours", "pure PyTorch"])
@pytest.mark.parametrize("model", ["smollm2_down_proj", "llama7b_down_proj"])
def test_nm_swap_gains_cuda(benchmark, cuda_device, model, impl):
    run_case(benchmark, case(model, False, cuda_device), impl, cuda_device)
