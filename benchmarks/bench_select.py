"""Exact global selection: kth_smallest and global masks vs concatenate-and-select, and the
torch.nn.utils.prune drop-in vs torch's global_unstructured."""

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench import select

_CACHE = {}


def case(name, *args):
    key = (name, *args)
    if key not in _CACHE:
        _CACHE.clear()  # one workload's tensors in memory at a time
        _CACHE[key] = getattr(select, name)(*args)
    return _CACHE[key]


KTH_IMPLS = ["ours", "numpy concatenate+partition", "torch.kthvalue(torch.cat)", "torch.quantile(torch.cat)"]


@pytest.mark.parametrize("impl", KTH_IMPLS)
def test_kth_86m(benchmark, impl):
    """ViT-B/16's parameter count."""
    run_case(benchmark, case("kth_case", 86_000_000), impl, rounds=3, memory=True)


@pytest.mark.parametrize("impl", KTH_IMPLS)
def test_kth_200m(benchmark, impl):
    run_case(benchmark, case("kth_case", 200_000_000), impl, rounds=3, memory=True)


@pytest.mark.large
@pytest.mark.parametrize("impl", KTH_IMPLS)
def test_kth_1b(benchmark, impl):
    run_case(benchmark, case("kth_case", 1_000_000_000), impl, rounds=2, memory=True)


@pytest.mark.parametrize("impl", ["ours", "torch.cat + kthvalue + compare"])
def test_global_masks_200m(benchmark, impl):
    run_case(benchmark, case("global_masks_case", 200_000_000), impl, rounds=3, memory=True)


@pytest.mark.large
@pytest.mark.parametrize("impl", ["ours", "torch.cat + kthvalue + compare"])
def test_global_masks_1b(benchmark, impl):
    run_case(benchmark, case("global_masks_case", 1_000_000_000), impl, rounds=2, memory=True)


@pytest.mark.large
@pytest.mark.parametrize("impl", ["ours", "torch.cat + kthvalue + masked_fill_"])
def test_global_apply_1b(benchmark, impl):
    """Pruning in place without masks (apply_to=): for models whose masks would not fit."""
    run_case(benchmark, case("global_apply_case", 1_000_000_000), impl, rounds=2, memory=True)


@pytest.mark.parametrize("impl", ["ours", "torch.nn.utils.prune.global_unstructured"])
def test_torch_prune_vit_b16(benchmark, impl):
    run_case(benchmark, case("torch_prune_case"), impl, rounds=3, memory=True)


@pytest.mark.parametrize("impl", ["ours", "torch.kthvalue(torch.cat)", "torch.topk(torch.cat)"])
def test_kth_200m_cuda(benchmark, cuda_device, impl):
    run_case(benchmark, case("kth_case", 200_000_000, 20, cuda_device), impl, cuda_device)


@pytest.mark.parametrize("impl", ["ours", "torch.cat + kthvalue + compare"])
def test_global_masks_200m_cuda(benchmark, cuda_device, impl):
    run_case(benchmark, case("global_masks_case", 200_000_000, 20, cuda_device), impl, cuda_device)
