"""Value + gradient of Σ_l mean σ(F_l) (ReFer's objective): ops.svd_mean / svd_mean_list vs
torch.linalg.svdvals with autograd, at ViT-B/16 (12 blocks × 64 images × 197·768) and LLM-like
(24 layers × 16 sequences × 256·4096, 1.6 GB of features) sizes."""

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench.svd_mean import svd_mean_case

SIZES = {"vit_b_16": (12, 64, 197 * 768, False), "llm": (24, 16, 256 * 4096, True)}
_CASES = {}


def case(name, device):
    key = (name, device)
    if key not in _CASES:
        _CASES.clear()  # one case's features in memory at a time
        _CASES[key] = svd_mean_case(*SIZES[name], device=device)
    return _CASES[key]


@pytest.mark.parametrize("impl", ["ours", "torch svdvals autograd"])
@pytest.mark.parametrize("size", list(SIZES))
def test_svd_mean_cpu(benchmark, size, impl):
    run_case(benchmark, case(size, "cpu"), impl)


@pytest.mark.parametrize("impl", ["ours", "torch svdvals autograd"])
@pytest.mark.parametrize("size", list(SIZES))
def test_svd_mean_cuda(benchmark, cuda_device, size, impl):
    run_case(benchmark, case(size, cuda_device), impl, cuda_device)
