"""Fused saliency |g·w| + statistics on ViT-B/16's weights vs the eager loop users write."""

import pytest
import torch

from benchmarks.conftest import run_case
from pyprune_fast.bench.saliency import saliency_case

_CASES = {}


def case(device, dtype):
    key = (device, dtype)
    if key not in _CASES:
        _CASES.clear()
        _CASES[key] = saliency_case(device, dtype)
    return _CASES[key]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["ours", "torch eager"])
def test_saliency_cpu(benchmark, dtype, impl):
    run_case(benchmark, case("cpu", dtype), impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["ours", "torch eager"])
def test_saliency_cuda(benchmark, cuda_device, dtype, impl):
    run_case(benchmark, case(cuda_device, dtype), impl, cuda_device)
