"""The Torch-Pruning importance adapter: Torch-Pruning removes the channels our criteria pick, across
dependent layers, from a torchvision ResNet-18 and from a ViT's MLPs; the pruned models run and have
the parameter counts their pruned widths imply."""

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (pip install torch-pruning)")
torchvision = pytest.importorskip("torchvision")

import pyprune_fast as ppf  # noqa: E402
from pyprune_fast.criteria import channel  # noqa: E402
from pyprune_fast.integrations.torch_pruning import Importance  # noqa: E402


def data(classes=10, size=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g))]


def resnet18_params(w, classes):
    """Parameters of a torchvision ResNet-18 whose four stages have widths w[0..3] (the stem has
    w[0], the width of the first stage's residual stream)."""

    def conv_bn(cin, cout, k):
        return cin * cout * k * k + 2 * cout

    total = conv_bn(3, w[0], 7) + 2 * 2 * conv_bn(w[0], w[0], 3)
    for before, width in zip(w, w[1:]):
        total += conv_bn(before, width, 3) + conv_bn(width, width, 3) + conv_bn(before, width, 1)
        total += 2 * conv_bn(width, width, 3)
    return total + w[3] * classes + classes


def test_resnet18_parameter_formula():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == resnet18_params([64, 128, 256, 512], 10)


@pytest.mark.parametrize(("criterion", "ratio"), [("taylor", 0.5), ("l1", 0.25), ("hrank", 0.5)])
def test_prunes_resnet18(criterion, ratio):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    imp = Importance(criterion, data())
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=ratio, ignored_layers=[model.fc]
    )
    pruner.step()
    widths = [w - int(w * ratio) for w in (64, 128, 256, 512)]
    for stage, width in zip((model.layer1, model.layer2, model.layer3, model.layer4), widths):
        for block in stage:
            assert block.conv1.out_channels == width and block.conv2.out_channels == width
    assert sum(p.numel() for p in model.parameters()) == resnet18_params(widths, 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes the head: no gradient would flow
    return model


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
# criteria with continuous scores: Torch-Pruning's argsort orders equal scores arbitrarily
@pytest.mark.parametrize("criterion", ["fisher", "ide", "taylor"])
def test_prunes_vit_mlp_channels_our_scores_pick(criterion):
    model = tiny_vit()
    scores = ppf.score(model, criterion, data())
    mlps = [layer.mlp for layer in model.encoder.layers]
    fc1 = [mlp[0].weight.detach().clone() for mlp in mlps]
    count = sum(p.numel() for p in model.parameters())
    ignored = [model.conv_proj, model.heads] + [layer.self_attention for layer in model.encoder.layers]
    ignored += [mlp[3] for mlp in mlps]  # only the MLP hidden channels (fc1 out = fc2 in) are pruned
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(1, 3, 32, 32),
        importance=Importance(criterion, data()),
        pruning_ratio=0.5,
        ignored_layers=ignored,
    )
    pruner.step()
    hidden, kept = 32, 32
    assert all(mlp[0].out_features == kept and mlp[3].in_features == kept for mlp in mlps)
    assert count - sum(p.numel() for p in model.parameters()) == 2 * (hidden * kept + kept + kept * hidden)
    for i, (mlp, w) in enumerate(zip(mlps, fc1)):
        s = scores[f"encoder.layers.encoder_layer_{i}.mlp.0"]
        top = torch.sort(torch.sort(s, stable=True).indices[-kept:]).values
        assert torch.equal(mlp[0].weight, w[top])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_group_importance_is_the_mean_of_the_coupled_layers():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    scores = channel.l2(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(64)))
    coupled = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]  # tied by the residual sums
    expected = torch.stack([scores[n] for n in coupled]).mean(0)
    got = Importance("l2", normalizer=None)(group)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(Importance("l2")(group), expected / expected.mean())


def test_group_without_scored_layer_and_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[0, 1, 2, 3])
    assert Importance("l1", layers=["3"])(group) is None
    with pytest.raises(ValueError, match="unknown channel criterion 'snip'"):
        Importance("snip")
    with pytest.raises(TypeError, match="criterion must be"):
        Importance(3)
    with pytest.raises(ValueError, match="group_reduction must be"):
        Importance("l1", group_reduction="median")
