"""Each criterion against its formula written out here with plain autograd (independently of the
production code), plus laws that need no reference."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune_fast as ppf
from pyprune_fast import criteria, modeling
from tests.models import bias_free_net, image_batches, tiny_vit

WEIGHT_CRITERIA = sorted(criteria.of_kind("weight"))

SEEDS = [0, 1]
DTYPES = [torch.float32, torch.float64]


def weight_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def scored(model):
    return {f"{n}.weight": dict(model.named_modules())[n].weight for n in weight_names(model)}


def loss_grads(model, batches, params, temperature=1.0):
    total = None
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), params)
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    return total


def close(got: dict, expected: dict, dtype, rtol=None, atol=None):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.float32 and got[name].shape == expected[name].shape
        tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-5, "atol": 1e-8}
        if rtol is not None:
            tol = {"rtol": rtol, "atol": atol}
        torch.testing.assert_close(got[name], expected[name].float(), **tol, msg=name)


def setup(seed, dtype):
    model = tiny_vit(seed, dtype)
    return model, image_batches(seed, dtype=dtype), scored(model)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude(seed, dtype):
    model, _, params = setup(seed, dtype)
    close(criteria.magnitude(model), {n: p.detach().abs() for n, p in params.items()}, dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_snip(seed, dtype):
    model, data, params = setup(seed, dtype)
    g = loss_grads(model, data, list(params.values()))
    expected = {n: (gi * p).abs().detach() for (n, p), gi in zip(params.items(), g)}
    close(criteria.snip(model, data, loss_fn=F.cross_entropy), expected, dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_snip_is_mask_gradient_at_one(seed):
    model, data, params = setup(seed, torch.float64)
    masks = {n: torch.ones_like(p, requires_grad=True) for n, p in params.items()}
    total = 0
    for x, y in data:
        masked = {n: p * masks[n] for n, p in params.items()}
        total = total + F.cross_entropy(torch.func.functional_call(model, masked, (x,)), y)
    dm = torch.autograd.grad(total, list(masks.values()))
    close(criteria.snip(model, data), {n: g.abs() for n, g in zip(masks, dm)}, torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grasp(seed, dtype):
    model, data, params = setup(seed, dtype)
    names, plist = list(params), list(params.values())
    T = 200.0

    def total_loss(*ws):
        return sum(
            F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (x,)) / T, y) for x, y in data
        )

    g = torch.autograd.grad(total_loss(*plist), plist)
    _, hg = torch.autograd.functional.hvp(total_loss, tuple(p.detach() for p in plist), tuple(g))
    expected = {n: p.detach() * h for n, p, h in zip(names, plist, hg)}
    scale = max(e.abs().max().item() for e in expected.values())
    close(criteria.grasp(model, data), expected, dtype, rtol=1e-3, atol=1e-4 * scale)


def test_grasp_hessian_vector_against_finite_differences():
    model, data, params = setup(0, torch.float64)
    names, plist = list(params), list(params.values())
    T = 200.0

    def grad_at(ws):
        total = sum(
            F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (x,)) / T, y) for x, y in data
        )
        return torch.autograd.grad(total, ws)

    base = [p.detach().clone().requires_grad_(True) for p in plist]
    g = [t.detach() for t in grad_at(base)]
    # a step of 1e-5 of the parameters' norm along g: central differences are then accurate to ~1e-7
    eps = 1e-5 * torch.sqrt(sum((p.detach() ** 2).sum() for p in plist)) / torch.sqrt(sum((t**2).sum() for t in g))
    plus = grad_at([(p + eps * gi).requires_grad_(True) for p, gi in zip(base, g)])
    minus = grad_at([(p - eps * gi).requires_grad_(True) for p, gi in zip(base, g)])
    hg_fd = {n: (a - b) / (2 * eps) for n, a, b in zip(names, plus, minus)}
    scores = criteria.grasp(model, data)
    for n, p in params.items():
        expected = (p.detach() * hg_fd[n]).float()
        scale = expected.abs().max().item()
        torch.testing.assert_close(scores[n], expected, rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_obd(seed, dtype):
    model, data, params = setup(seed, dtype)
    plist = list(params.values())
    fisher = [torch.zeros_like(p) for p in plist]
    for x, y in data:
        for f, g in zip(fisher, torch.autograd.grad(F.cross_entropy(model(x), y), plist)):
            f += g * g / len(data)
    expected = {n: 0.5 * f * p.detach() ** 2 for (n, p), f in zip(params.items(), fisher)}
    close(criteria.obd(model, data), expected, dtype, rtol=1e-4, atol=1e-12)


def feature_objective_grads(model, data, params, layer_names, objective):
    modules = dict(model.named_modules())
    total = None
    for x, _ in data:
        feats = []
        hooks = [modules[n].register_forward_hook(lambda m, a, o, feats=feats: feats.append(o)) for n in layer_names]
        model(x)
        for h in hooks:
            h.remove()
        value = sum(objective(f.reshape(f.shape[0], -1)) for f in feats)
        g = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params.values())]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return {n: (gi * p).abs().detach() for (n, p), gi in zip(params.items(), total)}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_l1(seed, dtype):
    model, data, params = setup(seed, dtype)
    expected = feature_objective_grads(model, data, params, weight_names(model), lambda f: f.abs().sum())
    close(criteria.feature_l1(model, data), expected, dtype)


def mean_singular_value(f):
    return torch.linalg.svdvals(f).sum() / min(f.shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_refer(seed, dtype):
    model, data, params = setup(seed, dtype)
    expected = feature_objective_grads(model, data, params, weight_names(model), mean_singular_value)
    close(criteria.refer(model, data), expected, dtype, rtol=2e-3, atol=1e-5)


def test_refer_with_chosen_layers():
    model, data, params = setup(0, torch.float64)
    expected = feature_objective_grads(model, data, params, ["blocks.0", "blocks.1"], mean_singular_value)
    close(criteria.refer(model, data, layers=["blocks.0", "blocks.1"]), expected, torch.float64)
    by_type = criteria.refer(model, data, layers=[type(model.blocks[0])])
    close(by_type, expected, torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_afr(seed, dtype):
    model, data, params = setup(seed, dtype)
    refer = feature_objective_grads(model, data, params, weight_names(model), mean_singular_value)
    g = loss_grads(model, data, list(params.values()))
    snip = {n: (gi * p).abs().detach() for (n, p), gi in zip(params.items(), g)}

    def z(scores):
        flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
        mean, std = flat.mean(), flat.std(unbiased=False)
        return {n: (s.double() - mean) / std for n, s in scores.items()}

    zr, zs = z(refer), z(snip)
    close(criteria.afr(model, data), {n: zr[n] + zs[n] for n in params}, dtype, rtol=2e-3, atol=2e-3)


def wanda_expected(model, data):
    sums = {}
    modules = {n: m for n, m in model.named_modules() if n in weight_names(model)}

    def make_hook(name):
        def hook(m, args):
            x = args[0].detach().double()
            if isinstance(m, nn.Linear):
                s = (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
            else:
                s = (x**2).sum(dim=(0, 2, 3))
            sums[name] = sums.get(name, 0) + s

        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    expected = {}
    for n, m in modules.items():
        norm = sums[n].sqrt()
        w = m.weight.detach().double().abs()
        if isinstance(m, nn.Linear):
            expected[f"{n}.weight"] = w * norm[None, :]
        else:
            out, per_group = w.shape[:2]
            e = torch.empty_like(w)
            for o in range(out):  # written out channel by channel: group of o, its input channels
                grp = o // (out // m.groups)
                e[o] = w[o] * norm[grp * per_group : (grp + 1) * per_group].view(-1, 1, 1)
            expected[f"{n}.weight"] = e
    return expected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_wanda(seed, dtype):
    model, data, _ = setup(seed, dtype)
    close(criteria.wanda(model, data), wanda_expected(model, data), dtype, rtol=1e-5, atol=1e-6)


def test_wanda_grouped_conv():
    model = bias_free_net(0)
    data = [(torch.randn(2, 3, 8, 8, dtype=torch.float64), None)]
    close(criteria.wanda(model, data), wanda_expected(model, data), torch.float64)


def synflow_expected(model, shape):
    linear = copy.deepcopy(model).double()
    with torch.no_grad():
        for t in linear.state_dict().values():
            t.copy_(t.abs())
    linear.eval()
    ws = {n: dict(linear.named_parameters())[n] for n in scored(model)}
    r = linear(torch.ones(1, *shape, dtype=torch.float64)).sum()
    g = torch.autograd.grad(r, list(ws.values()))
    return {n: (gi * w).abs().detach() for (n, w), gi in zip(ws.items(), g)}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_synflow(seed, dtype):
    model, data, _ = setup(seed, dtype)
    close(criteria.synflow(model, data), synflow_expected(model, (3, 8, 8)), dtype, rtol=1e-5, atol=1e-7)
    close(
        criteria.synflow(model, input_shape=(3, 8, 8)), synflow_expected(model, (3, 8, 8)), dtype, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_synflow_leaves_the_model_as_it_was(dtype):
    model, data, _ = setup(0, dtype)  # float64: its |θ| must be a copy, not the parameters made absolute
    before = snapshot(model)
    criteria.synflow(model, input_shape=(3, 8, 8))
    after = snapshot(model)
    assert before["values"].keys() == after["values"].keys()
    for n, v in before["values"].items():
        assert torch.equal(v, after["values"][n]), n
    assert before["grads"] == after["grads"] and before["training"] == after["training"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synflow_conserves_flow_per_layer(seed):
    model = bias_free_net(seed)
    scores = criteria.synflow(model, input_shape=(3, 8, 8))
    sums = [s.double().sum().item() for s in scores.values()]
    assert len(sums) == 4
    assert sums == pytest.approx([sums[0]] * 4, rel=1e-5)


def snapshot(model):
    return {
        "values": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


@pytest.mark.parametrize("name", WEIGHT_CRITERIA)
def test_model_comes_back_exactly(name):
    model, data, _ = setup(0, torch.float32)
    model.train()
    model.blocks[0].train(False)  # a mixed train/eval state
    model.head.weight.requires_grad_(False)
    model.patch.weight.grad = torch.full_like(model.patch.weight, 3.0)
    calls = []
    model.blocks[1].register_forward_hook(lambda m, a, o: calls.append(1))
    before = snapshot(model)
    hooks_before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    ppf.score(model, name, data)
    after = snapshot(model)
    for key in ("requires_grad", "training"):
        assert after[key] == before[key], key
    for n, v in before["values"].items():
        assert torch.equal(after["values"][n], v), n
    for n, g in before["grads"].items():
        assert (g is None and after["grads"][n] is None) or torch.equal(after["grads"][n], g), n
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
    calls.clear()
    model(data[0][0])
    assert calls == [1]


@pytest.mark.parametrize("name", WEIGHT_CRITERIA)
def test_keys_shapes_and_params_selection(name):
    model, data, _ = setup(0, torch.float32)
    chosen = ["blocks.0.fc1.weight", "head.weight"]
    scores = ppf.score(model, name, data, params=chosen)
    assert list(scores) == chosen
    assert all(s.shape == dict(model.named_parameters())[n].shape for n, s in scores.items())
    by_predicate = ppf.score(model, name, data, params=lambda n, p: n.endswith("fc2.weight"))
    assert list(by_predicate) == ["blocks.0.fc2.weight", "blocks.1.fc2.weight"]


class _Tied(nn.Module):
    """An embedding tied to the output Linear (registered first, so named_parameters() names the
    shared weight after the embedding), a Linear registered twice and one without a weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.again = self.body
        self.plain = nn.Linear(4, 4)
        del self.plain.weight
        self.plain.weight = torch.ones(4, 4)  # a buffer-like tensor, not a Parameter
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.conv = nn.Conv1d(4, 4, 1)


def test_default_params_follow_named_parameters():
    """The default scored weights are named and ordered as named_parameters() has them: a tied weight
    once, under the name of the module that registered it first; a shared layer once; a weight that is
    not a Parameter is not scored."""
    model = _Tied()
    owned = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))}
    expected = [n for n, p in model.named_parameters() if id(p) in owned]
    assert expected == ["embed.weight", "body.weight", "conv.weight"]
    assert modeling.default_param_names(model) == expected
    assert list(ppf.score(model, "magnitude")) == expected
    assert ppf.score(model, "magnitude")["embed.weight"].equal(model.embed.weight.detach().abs())


def test_data_free_criterion_leaves_module_modes_alone():
    """magnitude reads the weights only: no train/eval switch, no requires_grad change on any module."""
    model, _, _ = setup(0, torch.float32)
    model.train()
    model.head.weight.requires_grad_(False)
    seen = []
    for m in model.modules():
        m.register_forward_hook(lambda *_: seen.append(1))
    scores = ppf.score(model, "magnitude")
    assert seen == [] and model.training and all(m.training for m in model.modules())
    assert not model.head.weight.requires_grad and scores["head.weight"].equal(model.head.weight.detach().abs())


def test_num_batches_limits_data():
    model, data, params = setup(0, torch.float64)
    g = loss_grads(model, data[:1], list(params.values()))
    expected = {n: (gi * p).abs().detach() for (n, p), gi in zip(params.items(), g)}
    close(criteria.snip(model, data, num_batches=1), expected, torch.float64)


def test_forward_option_for_dict_batches():
    model, data, _ = setup(0, torch.float32)
    dict_data = [({"pixels": x}, y) for x, y in data]
    got = criteria.snip(model, dict_data, forward=lambda m, inputs: m(inputs["pixels"]))
    assert all(torch.equal(got[n], s) for n, s in criteria.snip(model, data).items())


def test_errors_are_clear():
    model, data, _ = setup(0, torch.float32)
    with pytest.raises(ValueError, match="unknown criterion 'snipp'; valid criteria: afr, apoz, bn_scale, feature_l1"):
        ppf.score(model, "snipp", data)
    with pytest.raises(ValueError, match="needs data"):
        criteria.snip(model)
    with pytest.raises(ValueError, match="needs a loss"):
        criteria.snip(model, [(x, y.float()) for x, y in data])
    with pytest.raises(ValueError, match="params names not in model"):
        criteria.magnitude(model, params=["nope.weight"])
    with pytest.raises(TypeError, match=r"got unexpected options \['temprature'\]"):
        criteria.grasp(model, data, temprature=3)
    with pytest.raises(ValueError, match="data yielded no batches"):
        criteria.snip(model, [])
    with pytest.raises(ValueError, match="wanda scores the weights of Linear and Conv layers; 'pos' is not one"):
        criteria.wanda(model, data, params=["pos"])
    with pytest.raises(ValueError, match="synflow needs input_shape"):
        criteria.synflow(model)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        criteria.grasp(model, data, temperature=0)


def test_vit_b_16_every_criterion():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    data = [(torch.randn(2, 3, 224, 224), torch.tensor([1, 2]))]
    expected = {
        n: p.shape
        for n, p in model.named_parameters()
        if n.endswith("weight")
        and p.dim() >= 2
        and ("mlp" in n or "out_proj" in n or "conv_proj" in n or n.startswith("heads"))
    }
    for name in WEIGHT_CRITERIA:
        scores = ppf.score(model, name, data)
        assert {n: s.shape for n, s in scores.items()} == expected, name
        assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in scores.values()), name


class AttentionNet(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_attention_out_proj_is_observed():
    """nn.MultiheadAttention applies out_proj functionally; its input (Wanda) and output (feature
    criteria) are still observed, and the model computes the same values meanwhile."""
    torch.manual_seed(0)
    model = AttentionNet().double()
    data = [(torch.randn(3, 5, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))]
    x = data[0][0]
    # what out_proj sees, recomputed by hand: softmax(QK^T/sqrt(d)) V per head
    h = model.inp(x)
    q, k, v = F.linear(h, model.attn.in_proj_weight, model.attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t):
        return t.reshape(3, 5, 2, 4).transpose(1, 2)

    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, dim=-1) @ heads(v)
    pre_proj = att.transpose(1, 2).reshape(3, 5, 8).detach()
    norm = (pre_proj.reshape(-1, 8) ** 2).sum(0).sqrt()
    scores = criteria.wanda(model, data)
    expected = model.attn.out_proj.weight.detach().abs() * norm[None, :]
    torch.testing.assert_close(scores["attn.out_proj.weight"], expected.float(), rtol=1e-5, atol=1e-7)
    refer = criteria.refer(model, data, params=["attn.out_proj.weight"])
    out = F.linear(pre_proj, model.attn.out_proj.weight, model.attn.out_proj.bias)
    w = model.attn.out_proj.weight
    g = torch.autograd.grad(mean_singular_value(F.linear(pre_proj, w, model.attn.out_proj.bias).reshape(3, -1)), w)[0]
    assert out.shape == (3, 5, 8)
    torch.testing.assert_close(refer["attn.out_proj.weight"], (g * w).abs().detach().float(), rtol=1e-5, atol=1e-7)
    assert isinstance(model.attn.out_proj, nn.Linear) and "attn.out_proj.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("one_shot", [iter, lambda data: (batch for batch in data)], ids=["iterator", "generator"])
def test_two_pass_criteria_refuse_one_shot_data(one_shot):
    """GraSP's g and Hg (and ide_trace's ḡ and projections) come from two passes over `data`; an iterator
    would give the second pass other batches or none, so it is refused before any pass."""
    model, data, _ = setup(0, torch.float32)
    with pytest.raises(ValueError, match=r"grasp passes over data twice .*pass a list of batches or a DataLoader"):
        criteria.grasp(model, one_shot(data))
    with pytest.raises(ValueError, match="ide_trace passes over data twice"):
        criteria.CRITERIA["ide_trace"](model, one_shot(data))

    class Reiterable:  # a fresh iterator per pass, as a DataLoader gives
        def __iter__(self):
            return iter(data)

    expected = criteria.grasp(model, data)
    got = criteria.grasp(model, Reiterable())
    assert all(torch.equal(got[n], s) for n, s in expected.items())


def test_num_batches_must_be_a_positive_int():
    model, data, _ = setup(0, torch.float64)
    for bad in (2.5, True, "2", 1.0):
        with pytest.raises(TypeError, match=f"num_batches must be a positive int or None, got {bad!r}"):
            criteria.snip(model, data, num_batches=bad)
    with pytest.raises(TypeError, match="num_batches must be a positive int"):
        criteria.magnitude(model, num_batches=2.5)  # refused even where no data is read
    with pytest.raises(TypeError, match="num_batches must be a positive int"):
        criteria.CRITERIA["taylor"](model, data, num_batches=2.5)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"num_batches must be a positive int or None, got {bad}"):
            criteria.snip(model, data, num_batches=bad)
    one = criteria.snip(model, data, num_batches=1)
    got = criteria.snip(model, data, num_batches=np.int64(1))
    assert all(torch.equal(got[n], s) for n, s in one.items())


def test_synflow_refuses_token_inputs_up_front():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    tokens = [(torch.randint(0, 10, (2, 3)), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=r"synflow .* inputs are torch.int64 \(token ids\?\): synflow needs .*float"):
        criteria.synflow(model, tokens)
