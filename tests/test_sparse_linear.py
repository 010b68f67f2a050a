"""SparseLinear and sparsify: the same outputs as the masked dense layers, state_dict, dtype and device."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune_fast as ppf
from pyprune_fast import masks
from pyprune_fast.sparse import SparseLinear, sparsify


class Net(nn.Module):
    """Eligible layers (fc1, fc2, blocks.0), and ones sparsify must leave alone: a 5-wide head, an
    attention whose out_proj MultiheadAttention reads through .weight, and a weight tied to another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64, bias=False)
        self.blocks = nn.Sequential(nn.Linear(64, 64), nn.GELU())
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.tied = nn.Linear(64, 64)
        self.tied_twin = nn.Linear(64, 64)
        self.tied_twin.weight = self.tied.weight
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = self.fc2(F.relu(self.fc1(x)))
        x = self.blocks(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.tied(x) + self.tied_twin(x))


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def inputs(seed=1):
    return torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(seed))


def test_from_dense_equals_the_masked_linear():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = SparseLinear.from_dense(linear)
    keep = masks.n_m({"w": linear.weight.abs()})["w"]
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight * keep, linear.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dense_weight(), (linear.weight * keep).detach())
    assert layer.values.shape == (64, 64) and layer.meta.dtype == torch.int32 and not layer.values.requires_grad
    assert "in_features=128, out_features=64, bias=True, activation=None" in repr(layer)


def test_from_dense_with_a_criterion_mask_and_activation():
    torch.manual_seed(1)
    linear = nn.Linear(64, 64)
    scores = torch.rand(64, 64)  # any criterion's scores
    keep = masks.n_m({"w": scores})["w"]
    layer = SparseLinear.from_dense(linear, keep, activation="gelu")
    x = torch.randn(9, 64)
    torch.testing.assert_close(layer(x), F.gelu(F.linear(x, linear.weight * keep, linear.bias)), rtol=1e-5, atol=1e-5)


def test_from_compressed_holds_given_values_and_validates_them():
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    keep = masks.n_m({"w": w.abs()})["w"]
    values, meta = ppf.ops.compress_24(w, keep)
    bias = torch.randn(64)
    layer = SparseLinear.from_compressed(values, meta, bias, activation="relu")
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), F.relu(F.linear(x, w * keep, bias)), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.values, values) and torch.equal(layer.meta, meta) and torch.equal(layer.bias, bias)
    assert not layer.values.requires_grad and layer.activation == "relu"
    with pytest.raises(ValueError, match=r"bias must be a \[64\]"):
        SparseLinear.from_compressed(values, meta, torch.randn(65))
    with pytest.raises(ValueError, match="multiples of 64"):
        SparseLinear.from_compressed(values[:48], meta[:3])
    bad = meta.clone()
    bad[0, 0, 0] = 0  # index pairs (0, 0): not an ordered 2:4 pair
    with pytest.raises(ValueError, match="not an ordered 2:4 pair"):
        SparseLinear.from_compressed(values, bad)
    with pytest.raises(TypeError, match="meta must be int32"):
        SparseLinear.from_compressed(values, meta.long())


def test_from_dense_errors():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="in=64, out=5"):
        SparseLinear.from_dense(nn.Linear(64, 5))
    with pytest.raises(ValueError, match="mask must keep exactly 2 of every 4"):
        SparseLinear.from_dense(nn.Linear(64, 64), torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="activation must be"):
        SparseLinear(64, 64, activation="silu")
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 64, got 100"):
        SparseLinear(100, 64)


def test_sparsify_replaces_eligible_layers_and_keeps_outputs():
    model, expected_model = net(), net()
    names = sparsify(model)
    assert names == ["fc1", "fc2", "blocks.0"]
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in names)
    assert type(model.attn.out_proj) is not SparseLinear and type(model.tied) is nn.Linear
    keep = masks.n_m({f"{n}.weight": expected_model.get_submodule(n).weight.abs() for n in names})
    masks.apply_masks(expected_model, keep)
    torch.testing.assert_close(model(inputs()), expected_model(inputs()), rtol=1e-5, atol=1e-5)
    assert model.fc2.bias is None


def test_sparsify_with_scores_and_filter():
    model, expected_model = net(), net()
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters()}  # e.g. ppf.score(...)
    names = sparsify(model, scores, filter=lambda name, m: name != "fc2")
    assert names == ["fc1", "blocks.0"] and type(model.fc2) is nn.Linear
    masks.apply_masks(expected_model, masks.n_m({f"{n}.weight": scores[f"{n}.weight"] for n in names}))
    torch.testing.assert_close(model(inputs()), expected_model(inputs()), rtol=1e-5, atol=1e-5)
    assert sparsify(net(), {"fc1.weight": torch.rand(128, 64)}) == ["fc1"]  # layers without a score stay dense


def test_sparsify_with_criterion_scores_and_gradients_through_it():
    model, expected_model = net(), net()
    data = [(inputs(s), torch.randn(2, 7, 5)) for s in range(2)]
    scores = ppf.score(model, "snip", data, loss_fn=F.mse_loss)
    assert sparsify(model, scores, filter=lambda name, m: name == "fc2") == ["fc2"]
    masks.apply_masks(expected_model, masks.n_m({"fc2.weight": scores["fc2.weight"]}))
    # fc1 stays dense: its gradients flow back through the sparse fc2 (sparse24_linear's autograd)
    got = ppf.score(model, "snip", data, loss_fn=F.mse_loss, params=["fc1.weight", "fc1.bias"])
    expected = ppf.score(expected_model, "snip", data, loss_fn=F.mse_loss, params=["fc1.weight", "fc1.bias"])
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_sparsify_error_leaves_the_model_unchanged():
    model = net()
    before = copy.deepcopy(model.state_dict())
    bad = {"fc1.weight": torch.rand(128, 64), "fc2.weight": torch.full((64, 128), float("nan"))}
    with pytest.raises(ValueError, match=r"scores\['fc2.weight'\] contains NaN"):
        sparsify(model, bad)
    with pytest.raises(ValueError, match=r"scores\['fc1.weight'\] is \(3,\)"):
        sparsify(model, {"fc1.weight": torch.rand(3)})
    assert type(model.fc1) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_round_trip():
    model = net()
    sparsify(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = net(seed=5)  # other weights: sparsify gives the same structure, load_state_dict the values
    sparsify(fresh)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(fresh(inputs()), model(inputs()))
    skeleton = SparseLinear(64, 128)
    skeleton.load_state_dict(model.fc1.state_dict())
    assert torch.equal(skeleton(inputs()), model.fc1(inputs()))


def test_corrupt_meta_is_refused_on_load():
    layer = SparseLinear.from_dense(nn.Linear(64, 64))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["meta"][0, 0, 0] = 0
    target = SparseLinear(64, 64)
    before = target.meta.clone()
    with pytest.raises(ValueError, match="not an ordered 2:4 pair"):
        target.load_state_dict(state)
    assert torch.equal(target.meta, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16(dtype):
    torch.manual_seed(2)
    layer = SparseLinear.from_dense(nn.Linear(128, 64))
    x = torch.randn(4, 128)
    y32 = layer(x)
    converted = layer.half() if dtype == torch.float16 else layer.bfloat16()
    assert converted.values.dtype == dtype and converted.bias.dtype == dtype and converted.meta.dtype == torch.int32
    torch.testing.assert_close(converted(x.to(dtype)).float(), y32, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_cuda(dtype):
    model = net().to(dtype)
    x = inputs().to(dtype)
    names = sparsify(model)
    cpu_out = model(x)
    model.to("cuda")
    assert all(model.get_submodule(n).meta.is_cuda for n in names)
    torch.testing.assert_close(model(x.cuda()).cpu(), cpu_out, rtol=2e-2, atol=2e-2)
    gpu_model = net().to(dtype).cuda()
    assert sparsify(gpu_model) == names  # compressed on the GPU
    torch.testing.assert_close(gpu_model(x.cuda()).cpu(), cpu_out, rtol=2e-2, atol=2e-2)


def test_forward_without_per_call_weight_checks_still_refuses_bad_input():
    """forward checks only x against the validated weights; whatever does not agree goes through
    ops.sparse24_linear's checks and gets their errors, and the results equal the checked op's."""
    torch.manual_seed(3)
    layer = SparseLinear.from_dense(nn.Linear(128, 64), activation="gelu")
    x = torch.randn(3, 5, 128)
    expected = ppf.ops.sparse24_linear(x, layer.values, layer.meta, layer.bias, "gelu")
    assert torch.equal(layer(x), expected)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\]"):
        layer(torch.randn(3, 64))
    with pytest.raises(TypeError, match="x is torch.float16 but values is torch.float32"):
        layer(x.half())
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"^x must be one of float32, float16, bfloat16, got int64$"):
        layer(torch.ones(3, 128, dtype=torch.long))  # a single tensor is named without an index
    layer.values.requires_grad_(True)
    with pytest.raises(ValueError, match="not differentiable in values"):
        layer(x)
