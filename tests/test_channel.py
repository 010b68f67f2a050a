"""Channel criteria against their formulas written out here channel by channel and sample by sample
(loops, plain autograd), on a small CNN with BatchNorm and a small ViT-shaped model; L_p
normalization (eq. 4.13); channel masks; bad input."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune_fast as ppf
from pyprune_fast import criteria, masks
from pyprune_fast.criteria import channel
from pyprune_fast.modeling import out_channels
from tests.conftest import DEVICES
from tests.models import image_batches, small_cnn, tiny_vit

MODELS = {"cnn": small_cnn, "vit": tiny_vit}
CNN_BN = {"conv1": "bn1", "conv2": "bn2"}


def layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def outputs_and_grads(model, x, y):
    """Each layer's output for the batch and ∂(mean cross-entropy)/∂output, plus BN outputs."""
    modules = dict(model.named_modules())
    seen = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _a, out, n=n: seen.__setitem__(n, out))
        for n in layer_names(model) + [bn for bn in CNN_BN.values() if bn in modules]
    ]
    loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    names = layer_names(model)
    grads = dict(zip(names, torch.autograd.grad(loss, [seen[n] for n in names])))
    return seen, grads


def channel_map(out, n, c, linear):
    """Sample n's feature map of channel c as a flat vector."""
    return (out[n, ..., c] if linear else out[n, c]).reshape(-1).detach()


def per_sample(model, data):
    """{layer: (list over samples of [x_n per channel], list of [∇_n per channel])}."""
    modules = dict(model.named_modules())
    xs = {n: [] for n in layer_names(model)}
    gs = {n: [] for n in layer_names(model)}
    for x, y in data:
        seen, grads = outputs_and_grads(model, x, y)
        for name in layer_names(model):
            linear = isinstance(modules[name], nn.Linear)
            out, grad = seen[name], grads[name]
            channels = out.shape[-1] if linear else out.shape[1]
            for n in range(out.shape[0]):
                xs[name].append([channel_map(out, n, c, linear) for c in range(channels)])
                gs[name].append([channel_map(grad, n, c, linear) for c in range(channels)])
    return xs, gs


def expected_gradient_scores(model, data):
    xs, gs = per_sample(model, data)
    out = {k: {} for k in ("taylor", "fisher", "ide", "ide_trace")}
    for name in xs:
        big_n, channels = len(xs[name]), len(xs[name][0])
        taylor, fisher, ide, trace = [], [], [], []
        for c in range(channels):
            dots = [torch.dot(xs[name][n][c], gs[name][n][c]) for n in range(big_n)]
            x_mean = sum(xs[name][n][c] for n in range(big_n)) / big_n
            g_mean = sum(gs[name][n][c] for n in range(big_n)) / big_n
            taylor.append(abs(sum(dots) / big_n))
            fisher.append(sum(d * d for d in dots) / big_n)
            ide.append(torch.dot(x_mean, g_mean) ** 2)
            hessian = torch.outer(g_mean, g_mean)
            trace.append(sum(xs[name][n][c] @ hessian @ xs[name][n][c] for n in range(big_n)) / big_n)
        for key, values in zip(out, (taylor, fisher, ide, trace)):
            out[key][name] = torch.stack(values)
    return out


def close(got, expected, rtol=1e-5, atol=1e-9):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.float32 and got[name].shape == expected[name].shape, name
        torch.testing.assert_close(got[name], expected[name].float(), rtol=rtol, atol=atol, msg=name)


@pytest.fixture(params=list(MODELS))
def setup(request):
    model = MODELS[request.param](0, torch.float64).eval()
    return model, image_batches(0, dtype=torch.float64)


def test_gradient_criteria_against_formulas(setup):
    model, data = setup
    expected = expected_gradient_scores(model, data)
    for name in ("taylor", "fisher", "ide", "ide_trace"):
        close(getattr(channel, name)(model, data, loss_fn=F.cross_entropy), expected[name])


@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_default_loss_is_cross_entropy_and_model_is_given_back(make):
    model, data = make(0), image_batches(0)
    model.train()
    before = copy.deepcopy(model.state_dict())
    list(model.parameters())[-2].requires_grad_(False)  # a frozen head weight stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    expected = channel.taylor(model, data, loss_fn=F.cross_entropy)
    model.train()
    close(channel.taylor(model, data), expected, rtol=0, atol=0)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weight_criteria(setup):
    model, data = setup
    modules = dict(model.named_modules())
    rows = {n: modules[n].weight.detach() for n in layer_names(model)}
    l1 = {n: torch.stack([w[c].abs().sum() for c in range(w.shape[0])]) for n, w in rows.items()}
    l2 = {n: torch.stack([w[c].pow(2).sum().sqrt() for c in range(w.shape[0])]) for n, w in rows.items()}
    close(channel.l1(model), l1)
    close(channel.l2(model, data), l2)


@pytest.mark.parametrize("rows", [1000, 3000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_l1_over_row_blocks(dtype, rows):
    """ℓ1 is summed in one go up to 2^20 values and over blocks of rows (2^20 values each) above:
    1000 rows of 700 are one block, 3000 rows of 700 take three, the last one short; every row's
    norm matches the float64 sum, in every dtype."""
    torch.manual_seed(0)
    fc = nn.Linear(700, rows).to(dtype)
    with torch.no_grad():
        fc.weight[3] = 0.0
        fc.weight[374, :5] = -0.0
        fc.weight[-1] *= 1e3  # the last block's short tail
    expected = fc.weight.detach().double().abs().sum(1)
    got = channel.l1(nn.Sequential(fc))["0"]
    assert got.dtype == torch.float32 and got.shape == (rows,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert got[3] == 0


def test_bn_scale():
    model = small_cnn(1)
    close(channel.bn_scale(model), {"conv1": model.bn1.weight.detach().abs(), "conv2": model.bn2.weight.detach().abs()})
    with pytest.raises(ValueError, match="followed by a BatchNorm"):
        channel.bn_scale(tiny_vit())


def test_apoz(setup):
    model, data = setup
    modules = dict(model.named_modules())
    zeros, counts = {}, {}
    for x, y in data:
        seen, _ = outputs_and_grads(model, x, y)
        for name in layer_names(model):
            linear = isinstance(modules[name], nn.Linear)
            a = seen[CNN_BN.get(name, name)] if "bn1" in modules else seen[name]
            channels = a.shape[-1] if linear else a.shape[1]
            for c in range(channels):
                for n in range(a.shape[0]):
                    v = channel_map(a, n, c, linear)
                    zeros.setdefault(name, [0] * channels)[c] += int((v <= 0).sum())
                    counts.setdefault(name, [0] * channels)[c] += v.numel()
    expected = {n: 1 - torch.tensor(zeros[n], dtype=torch.float64) / torch.tensor(counts[n]) for n in zeros}
    close(channel.apoz(model, data), expected)


def test_apoz_counts_relu_zeros_after_batchnorm():
    model = small_cnn(2)
    with torch.no_grad():
        model.bn1.bias[0] = -1e6  # channel 0 of conv1: always zeroed by the ReLU
        model.bn1.bias[1] = 1e6  # channel 1: never
    scores = channel.apoz(model, image_batches(2))
    assert scores["conv1"][0] == 0.0 and scores["conv1"][1] == 1.0


def test_hrank(setup):
    model, data = setup
    modules = dict(model.named_modules())
    with torch.no_grad():  # rank-deficient maps: a zero filter (rank 0 + bias → constant map, rank ≤ 1)
        first = modules[layer_names(model)[0]]
        first.weight[0] = 0
        first.bias[0] = 0
        first.weight[1] = 0
    ranks, counts = {}, {}
    for x, y in data:
        seen, _ = outputs_and_grads(model, x, y)
        for name in layer_names(model):
            out = seen[name].detach().float()
            if isinstance(modules[name], nn.Linear):  # the channel's samples × tokens matrix per batch
                values = [torch.linalg.matrix_rank(out[..., c].reshape(out.shape[0], -1)) for c in range(out.shape[-1])]
                count = 1
            else:  # each sample's H × W map
                values = [
                    sum(torch.linalg.matrix_rank(out[n, c]) for n in range(out.shape[0])) for c in range(out.shape[1])
                ]
                count = out.shape[0]
            ranks[name] = ranks.get(name, 0) + torch.stack(values).double()
            counts[name] = counts.get(name, 0) + count
    expected = {n: ranks[n] / counts[n] for n in ranks}
    got = channel.hrank(model, data)
    close(got, expected)
    first_name = layer_names(model)[0]
    assert got[first_name][0] == 0 and got[first_name][1] == 1


class InplaceNet(nn.Module):
    """Conv → ReLU(inplace) (the activation overwrites the conv's output), a Linear applied twice, and
    a Linear whose output the loss does not use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        h = nn.functional.relu(self.conv(x), inplace=True).mean((2, 3))
        self.unused(h)
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def test_outputs_modified_in_place_shared_layers_and_unused_outputs():
    """The documented x_n and ∇_n are the layer's output and its gradient before an in-place
    activation overwrites them; each call of a shared layer is a sample; an unused output has ∇ = 0."""
    torch.manual_seed(0)
    model = InplaceNet().double().eval()
    data = image_batches(6, count=2, dtype=torch.float64)
    calls = {n: [] for n in ("conv", "shared", "head", "unused")}  # per batch: [(x, ∇)] of every call
    for x, y in data:
        outs = {n: [] for n in calls}  # each output as the layer returned it; a copy goes on
        handles = [
            getattr(model, n).register_forward_hook(lambda _m, _a, o, n=n, outs=outs: outs[n].append(o) or o.clone())
            for n in calls
        ]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        flat = [(n, o) for n, os in outs.items() for o in os]
        grads = torch.autograd.grad(loss, [o for _, o in flat], allow_unused=True)
        for (n, o), g in zip(flat, grads):
            calls[n].append((o.detach(), torch.zeros_like(o) if g is None else g))
    for name, pairs in calls.items():
        linear = name != "conv"
        xs = [(x.reshape(x.shape[0], -1, x.shape[-1]) if linear else x.flatten(2).transpose(1, 2)) for x, _ in pairs]
        gs = [(g.reshape(g.shape[0], -1, g.shape[-1]) if linear else g.flatten(2).transpose(1, 2)) for _, g in pairs]
        dots = torch.cat([(x * g).sum(1) for x, g in zip(xs, gs)])  # (samples, C)
        fisher = channel.fisher(model, data)[name]
        torch.testing.assert_close(fisher, dots.square().mean(0).float(), rtol=1e-5, atol=1e-12)
        taylor = channel.taylor(model, data)[name]
        torch.testing.assert_close(taylor, dots.mean(0).abs().float(), rtol=1e-5, atol=1e-12)
        if name == "unused":
            assert taylor.eq(0).all() and fisher.eq(0).all()
    assert channel.fisher(model, data)["conv"].gt(0).all()
    g_mean = torch.cat([g for _, g in calls["conv"]]).mean(0)
    x_mean = torch.cat([x for x, _ in calls["conv"]]).mean(0)  # before the ReLU: negative entries kept
    assert x_mean.lt(0).any()
    torch.testing.assert_close(channel.ide(model, data)["conv"], (x_mean * g_mean).sum((1, 2)).square().float())


class TupleLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x), "extra"


def test_layer_returning_a_tuple_is_scored_through_its_first_tensor():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": TupleLinear(4, 4), "b": nn.Linear(4, 3)}).double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    run = lambda m, x: m["b"](torch.tanh(m["a"](x)[0]))  # noqa: E731
    seen = {}
    handle = model["a"].register_forward_hook(lambda _m, _a, out: seen.__setitem__("a", out[0]))
    grad = torch.autograd.grad(F.cross_entropy(run(model, data[0][0]), data[0][1]), seen["a"])[0]
    handle.remove()
    got = ppf.score(model, "fisher", data, forward=run)
    torch.testing.assert_close(got["a"], (seen["a"] * grad).square().mean(0).float())


def test_gradient_pass_saves_no_layer_input_for_weight_gradients_and_scores_frozen_layers():
    """The backward goes to the layer outputs only, so no Conv/Linear weight needs a gradient: a
    Linear's input that nothing but its weight gradient needs (GELU's output) is not saved for the
    backward. A first layer frozen by the user (its output needs no gradient by itself) is scored
    like any other; every requires_grad flag is given back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double()
    model[0].requires_grad_(False)
    data = [(torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    flags = [p.requires_grad for p in model.parameters()]
    gelu_out, saved = [], []
    hook = model[1].register_forward_hook(lambda _m, _a, out: gelu_out.append(out.data_ptr()))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        got = channel.taylor(model, data, loss_fn=F.cross_entropy)
    hook.remove()
    assert len(gelu_out) == 1 and gelu_out[0] not in saved
    assert [p.requires_grad for p in model.parameters()] == flags
    x, y = data[0]
    h = model[0](x).requires_grad_(True)
    out = model[2](F.gelu(h))
    grad_h, grad_out = torch.autograd.grad(F.cross_entropy(out, y), [h, out])
    expected = {"0": (h * grad_h).mean(0).abs().detach(), "2": (out * grad_out).mean(0).abs().detach()}
    close(got, expected)


def test_output_gradients_are_consumed_one_at_a_time():
    """A deep chain of Linears: when a layer's output gradient reaches its statistics, the gradients
    of the layers after it have been freed (autograd.grad over all outputs would hold all of them)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 3))
    data = [(torch.randn(4, 16), torch.randint(0, 3, (4,)))]
    alive, refs = [], []
    real = channel.ChannelStats.add_gradient

    def counting(self, output, grad):
        alive.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(grad))
        real(self, output, grad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(channel.ChannelStats, "add_gradient", counting)
        channel.fisher(model, data)
    assert len(alive) == 9 and max(alive) <= 1, alive


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_lp_normalization_eq_4_13(setup, p):
    model, data = setup
    for name in ("l1", "fisher", "apoz"):
        raw = getattr(channel, name)(model, data)
        got = getattr(channel, name)(model, data, normalize="lp", p=p)
        expected = {}
        for layer, s in raw.items():
            roots = [float(v) ** 0.5 for v in s.double()]
            norm = sum(r**p for r in roots) ** (1 / p)
            expected[layer] = torch.tensor([r / norm for r in roots])
        close(got, expected, rtol=1e-5, atol=1e-7)


def test_lp_normalization_of_an_all_zero_layer():
    model = small_cnn(0)
    with torch.no_grad():
        model.conv2.weight.zero_()
    got = channel.l1(model, normalize="lp", p=0.5)
    assert torch.equal(got["conv2"], torch.zeros(8))
    assert torch.isfinite(got["conv1"]).all()


def test_layers_selection_and_accumulation_over_batches():
    model, data = small_cnn(3, torch.float64).eval(), image_batches(3, count=3, dtype=torch.float64)
    got = channel.fisher(model, data, layers=["conv2"])
    assert list(got) == ["conv2"]
    expected = expected_gradient_scores(model, data)["fisher"]["conv2"]
    torch.testing.assert_close(got["conv2"], expected.float())
    assert list(channel.l1(model, layers=nn.Linear)) == ["fc"]


@pytest.mark.parametrize("name", sorted(criteria.of_kind("channel")))
def test_every_channel_criterion_through_score_gives_the_model_back_exactly(name):
    model, data = small_cnn(4).train(), image_batches(4)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 3.0)
    model.fc.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    scores = ppf.score(model, name, data)
    assert criteria.CRITERIA[name].kind == "channel"
    modules = dict(model.named_modules())
    assert scores and all(
        s.shape == (out_channels(modules[n]),) and s.dtype == torch.float32 for n, s in scores.items()
    )
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_channel_criteria_take_the_shared_arguments():
    model, data = small_cnn(5, torch.float64).eval(), image_batches(5, count=3, dtype=torch.float64)
    expected = expected_gradient_scores(model, data[:1])["fisher"]
    by_params = ppf.score(model, "fisher", data, params=["conv2.weight"], num_batches=1)
    assert list(by_params) == ["conv2"]
    torch.testing.assert_close(by_params["conv2"], expected["conv2"].float())
    by_predicate = ppf.score(model, "fisher", data, params=lambda n, p: n.startswith("conv"), num_batches=1)
    assert list(by_predicate) == ["conv1", "conv2"]
    # forward= maps whatever a batch holds to the model's outputs
    wrapped = [({"pixels": x}, y) for x, y in data]
    got = ppf.score(model, "fisher", wrapped, forward=lambda m, inputs: m(inputs["pixels"]), num_batches=1)
    for n, s in expected.items():
        torch.testing.assert_close(got[n], s.float())
    with pytest.raises(ValueError, match="layers= or params="):
        ppf.score(model, "l1", params=["conv2.weight"], layers=["conv2"])
    with pytest.raises(ValueError, match="must be Conv1d/2d/3d or Linear"):
        ppf.score(model, "l1", params=["bn1.weight"])
    with pytest.raises(TypeError, match="unexpected options"):
        ppf.score(model, "l1", temperature=2.0)


def test_vit_attention_out_proj_is_scored():
    model = nn.Sequential()
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    head = nn.Linear(8, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = attn, head

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    model = Net()
    data = [(torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))]
    got = channel.taylor(model, data)
    assert set(got) == {"attn.out_proj", "head"} and got["attn.out_proj"].shape == (8,)
    assert got["attn.out_proj"].abs().sum() > 0


def test_bad_input():
    model, data = small_cnn(), image_batches()
    with pytest.raises(ValueError, match="normalize must be None or 'lp'"):
        channel.l1(model, normalize="l2")
    for p in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="p must be a finite number > 0"):
            channel.l1(model, normalize="lp", p=p)
    with pytest.raises(ValueError, match="Conv1d/2d/3d or Linear.*bn1"):
        channel.l1(model, layers=["bn1"])
    with pytest.raises(ValueError, match="not in model.named_modules"):
        channel.l1(model, layers=["nope"])
    with pytest.raises(ValueError, match="needs data"):
        channel.taylor(model, None)
    with pytest.raises(ValueError, match="re-iterable"):
        channel.ide_trace(model, iter(data))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        channel.fisher(model, data, loss_fn=3)
    with pytest.raises(ValueError, match="needs a loss"):
        channel.taylor(model, [(x, y.float()) for x, y in data])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        channel.l1("model")
    with pytest.raises(ValueError, match="no Conv1d/2d/3d or Linear"):
        channel.l1(nn.ReLU())


def test_unused_named_layer_is_an_error():
    model = small_cnn()
    model.extra = nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match=r"produced no output.*extra"):
        channel.apoz(model, image_batches(), layers=["conv1", "extra"])
    assert "extra" not in channel.apoz(model, image_batches())


def test_channel_masks_exact_counts_and_ties():
    scores = {"a": torch.tensor([1.0, 0.0, 1.0, 0.0]), "b": torch.tensor([0.0, 2.0, 1.0])}
    got = masks.channels(scores, 3 / 7)
    # the three zeros are pruned: a[1], a[3], b[0]
    assert got["a"].tolist() == [True, False, True, False] and got["b"].tolist() == [False, True, True]
    got = masks.channels(scores, 4 / 7)  # then the lowest-index 1.0: a[0]
    assert got["a"].tolist() == [False, False, True, False] and got["b"].tolist() == [False, True, True]
    got = masks.channels(scores, 0.5, scope="layer")  # 2 of a (its zeros), round(1.5) = 2 of b
    assert got["a"].tolist() == [True, False, True, False] and got["b"].tolist() == [False, True, False]
    assert all(m.all() for m in masks.channels(scores, 0.0).values())
    assert not any(m.any() for m in masks.channels(scores, 1.0, scope="layer").values())


def test_channel_masks_bad_input():
    with pytest.raises(ValueError, match="scope must be 'global' or 'layer'"):
        masks.channels({"a": torch.ones(3)}, 0.5, scope="row")
    with pytest.raises(ValueError, match="must be 1-D"):
        masks.channels({"a": torch.ones(3, 2)}, 0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        masks.channels({"a": torch.ones(3)}, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        masks.channels({"a": torch.tensor([1.0, float("nan")])}, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_every_criterion_on_device_matches_cpu(device):
    model, data = small_cnn(4, torch.float64).eval(), image_batches(4, dtype=torch.float64)
    on_device = copy.deepcopy(model).to(device)
    moved = [(x.to(device), y.to(device)) for x, y in data]
    for name, fn in criteria.of_kind("channel").items():
        expected = fn(model, data)
        got = fn(on_device, moved)
        assert all(s.device.type == device for s in got.values()), name
        close({n: s.cpu() for n, s in got.items()}, expected)
