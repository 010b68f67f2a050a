"""masks.keep's overhead on a training step of the default model (all-MiniLM-L6-v2): the step with
90 % global masks kept, the plain step, and the keep hooks alone."""

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench.schedule import keep_step_case

_CASES = {}


def case(device):
    if device not in _CASES:
        _CASES[device] = keep_step_case(device)
    return _CASES[device]


@pytest.mark.parametrize("impl", ["ours", "plain step (no masks kept)", "the keep hooks alone"])
def test_keep_step_cpu(benchmark, impl):
    run_case(benchmark, case("cpu"), impl, rounds=5)


@pytest.mark.parametrize("impl", ["ours", "plain step (no masks kept)", "the keep hooks alone"])
def test_keep_step_cuda(benchmark, cuda_device, impl):
    run_case(benchmark, case(cuda_device), impl, cuda_device, rounds=5)
