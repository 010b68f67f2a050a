"""Filter replacement (filter duplication, Ikuta et al. 2024): which channels are overwritten by
which, in both modes, with the filter, its bias and the following BatchNorm's channel copied; bad input."""

import pytest
import torch
from torch import nn

from pyprune_fast.structured import replace_filters
from tests.models import image_batches, small_cnn

SCORES = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0, 0.5, 7.0, 3.0])  # conv2: 8 channels


def channel_params(model, c):
    return [t[c].clone() for t in (model.conv2.weight, model.conv2.bias, model.bn2.weight, model.bn2.bias)] + [
        model.bn2.running_mean[c].clone(),
        model.bn2.running_var[c].clone(),
    ]


def feature_maps(model, x):
    return torch.relu(model.bn2(model.conv2(torch.relu(model.bn1(model.conv1(x)))))).detach()


@pytest.mark.parametrize(
    ("mode", "ratio", "pairs"),
    [
        # ascending (ties: lower index lower): 5, 1, 3, 2, 7, 0, 6, 4
        ("duplicate", 0.25, [(5, 4), (1, 6)]),
        ("duplicate", 0.5, [(5, 4), (1, 6), (3, 0), (2, 7)]),
        ("best", 0.375, [(5, 4), (1, 4), (3, 4)]),
        ("best", 0.0, []),
    ],
)
def test_replace_filters(mode, ratio, pairs):
    model = small_cnn(0).eval()
    before = [channel_params(model, c) for c in range(8)]
    conv1 = model.conv1.weight.clone()
    report = replace_filters(model, {"conv2": SCORES}, ratio, mode=mode)
    assert report == {"conv2": pairs}
    sources = dict(pairs)
    for c in range(8):
        expected = before[sources.get(c, c)]
        for got, want in zip(channel_params(model, c), expected):
            assert torch.equal(got, want)
    assert torch.equal(model.conv1.weight, conv1)
    maps = feature_maps(model, image_batches(0)[0][0])
    for dst, src in pairs:
        assert torch.equal(maps[:, dst], maps[:, src])


def test_replace_filters_linear_without_batchnorm():
    model = small_cnn(1)
    weight = model.fc.weight.clone()
    report = replace_filters(model, {"fc": torch.tensor([0.0, 4.0, 2.0, 3.0, 1.0])}, 0.4)
    assert report == {"fc": [(0, 1), (4, 3)]}
    assert torch.equal(model.fc.weight[0], weight[1]) and torch.equal(model.fc.weight[4], weight[3])


def test_replace_filters_bad_input():
    model = small_cnn()
    with pytest.raises(ValueError, match="mode must be one of"):
        replace_filters(model, {"conv2": SCORES}, 0.25, mode="worst")
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.5\] for mode='duplicate'"):
        replace_filters(model, {"conv2": SCORES}, 0.75)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1.0\]"):
        replace_filters(model, {"conv2": SCORES}, -0.1, mode="best")
    with pytest.raises(ValueError, match="does not have: 'conv9'"):
        replace_filters(model, {"conv9": SCORES}, 0.25)
    with pytest.raises(ValueError, match="Conv/Linear layers only"):
        replace_filters(model, {"bn2": SCORES}, 0.25)
    with pytest.raises(ValueError, match=r"must have shape \(8,\), got \(7,\)"):
        replace_filters(model, {"conv2": SCORES[:7]}, 0.25)
    with pytest.raises(ValueError, match="NaN"):
        replace_filters(model, {"conv2": torch.full((8,), float("nan"))}, 0.25)
    with pytest.raises(TypeError, match="scores must be a dict"):
        replace_filters(model, SCORES, 0.25)
    assert isinstance(model.conv2, nn.Conv2d)
