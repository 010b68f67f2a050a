"""Per-channel feature-map statistics (taylor, fisher, ide, apoz sums) over ResNet-50's and
ViT-B/16's feature maps and gradients: one whole-tensor pass per layer vs a loop over channels; and
HRank's per-channel ranks over ResNet-50's Conv2d maps."""

import pytest

from benchmarks.conftest import run_case
from pyprune_fast.bench import channel

_CACHE = {}


def case(name, *args):
    key = (name, *args)
    if key not in _CACHE:
        _CACHE.clear()  # one model's feature maps in memory at a time
        _CACHE[key] = getattr(channel, name)(*args)
    return _CACHE[key]


@pytest.mark.parametrize("model", ["resnet50", "vit_b_16"])
@pytest.mark.parametrize("impl", ["ours", "loop over channels"])
def test_channel_stats(benchmark, model, impl):
    run_case(benchmark, case("channel_stats_case", model), impl)


@pytest.mark.parametrize("impl", ["ours", "loop over channels"])
def test_hrank_ranks(benchmark, impl):
    run_case(benchmark, case("hrank_case", "resnet50"), impl, rounds=3)
