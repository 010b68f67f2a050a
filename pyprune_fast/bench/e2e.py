"""Criteria end to end: `pyprune_fast.score(model, name, data)` against the straightforward code users
write for the same formula (forward, backward, per-weight arithmetic; forward hooks for features), on
torchvision's ViT-B/16 (random weights, one batch of 8 images, eval mode). Both score the same
parameters (every Linear and Conv weight, attention out_proj included) and the same layers."""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyprune_fast as ppf

from ..criteria.engine import PRUNABLE_MODULES, observable_attention
from .harness import Case, scaled

GRASP_TEMPERATURE = 200.0


def vit(scale: float = 1.0, seed: int = 0, device: str = "cpu") -> nn.Module:
    """torchvision's ViT-B/16 (224² images, 12 layers, width 768) with random weights in eval mode;
    scale < 1 shrinks the image side, the depth and the width (heads of 64)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    hidden = scaled(768, scale, 64)
    model = VisionTransformer(
        image_size=scaled(224, scale, 16),
        patch_size=16,
        num_layers=max(1, round(12 * scale)),
        num_heads=hidden // 64,
        hidden_dim=hidden,
        mlp_dim=4 * hidden,
    )
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes it
    return model.eval().to(device)


def vit_batch(model: nn.Module, batch: int = 8, seed: int = 0, device: str = "cpu") -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, model.image_size, model.image_size, generator=g)
    y = torch.randint(0, model.heads.head.out_features, (batch,), generator=g)
    return [(x.to(device), y.to(device))]


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)}


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {f"{n}.weight": m.weight for n, m in _layers(model).items()}


def _loss(model: nn.Module, x: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    return F.cross_entropy(model(x) / temperature, y)


def _backward(model: nn.Module, objective: Tensor, **kwargs) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    objective.backward(**kwargs)
    grads = {n: w.grad for n, w in _weights(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


def _features(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every Conv/Linear output of one forward, by forward hooks."""
    seen: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: seen.append(out)) for m in _layers(model).values()]
    try:
        with observable_attention(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def hand_magnitude(model, data):
    return {n: w.detach().abs() for n, w in _weights(model).items()}


def hand_snip(model, data):
    (x, y), weights = data[0], _weights(model)
    grads = _backward(model, _loss(model, x, y))
    return {n: (grads[n] * w).abs().detach() for n, w in weights.items()}


def hand_obd(model, data):
    (x, y), weights = data[0], _weights(model)
    grads = _backward(model, _loss(model, x, y))
    return {n: 0.5 * (grads[n] * w).detach().square() for n, w in weights.items()}


def hand_grasp(model, data):
    (x, y), weights = data[0], _weights(model)
    g = torch.autograd.grad(_loss(model, x, y, GRASP_TEMPERATURE), list(weights.values()))
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(_loss(model, x, y, GRASP_TEMPERATURE), list(weights.values()), create_graph=True)
        hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g)), list(weights.values()))
    return {n: w.detach() * h for (n, w), h in zip(weights.items(), hg)}


def hand_feature_l1(model, data):
    x, weights = data[0][0], _weights(model)
    grads = _backward(model, sum(f.abs().sum() for f in _features(model, x)))
    return {n: (grads[n] * w).abs().detach() for n, w in weights.items()}


def _refer_objective(features: list[Tensor]) -> Tensor:
    return sum(torch.linalg.svdvals(f.reshape(f.shape[0], -1)).mean() for f in features)


def hand_refer(model, data):
    x, weights = data[0][0], _weights(model)
    grads = _backward(model, _refer_objective(_features(model, x)))
    return {n: (grads[n] * w).abs().detach() for n, w in weights.items()}


def hand_afr(model, data):
    (x, y), weights = data[0], _weights(model)
    refer = {
        n: (g * weights[n]).abs().detach() for n, g in _backward(model, _refer_objective(_features(model, x))).items()
    }
    snip = {n: (g * weights[n]).abs().detach() for n, g in _backward(model, _loss(model, x, y)).items()}

    def z(scores):
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        mean, std = flat.mean(), flat.std(unbiased=False)
        return {n: (s - mean) / std for n, s in scores.items()}

    zr, zs = z(refer), z(snip)
    return {n: zr[n] + zs[n] for n in weights}


def hand_synflow(model, data):
    linear = copy.deepcopy(model).double()
    with torch.no_grad():
        for v in linear.state_dict().values():
            v.abs_()
    ones = torch.ones((1, *data[0][0].shape[1:]), dtype=torch.float64, device=data[0][0].device)
    linear(ones).sum().backward()
    return {n: (w.grad * w).abs().float().detach() for n, w in _weights(linear).items()}


def hand_l1(model, data):
    return {n: m.weight.detach().flatten(1).abs().sum(1) for n, m in _layers(model).items()}


def hand_l2(model, data):
    return {n: m.weight.detach().flatten(1).norm(dim=1) for n, m in _layers(model).items()}


def _channels_last(out: Tensor, module: nn.Module) -> Tensor:
    """(N, positions, C): a Linear's output N × ... × C, a conv's N × C × ... moved channels last."""
    if isinstance(module, nn.Linear):
        return out.reshape(out.shape[0], -1, out.shape[-1])
    return out.flatten(2).transpose(1, 2)


def _outputs_and_grads(model, data):
    (x, y), layers = data[0], _layers(model)
    outs: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o)) for n, m in layers.items()]
    try:
        with observable_attention(model):
            loss = _loss(model, x, y)
    finally:
        for h in hooks:
            h.remove()
    names = list(outs)
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    return {
        n: (_channels_last(outs[n].detach(), layers[n]), _channels_last(g, layers[n])) for n, g in zip(names, grads)
    }


def hand_taylor(model, data):
    return {n: (x * g).sum(1).mean(0).abs() for n, (x, g) in _outputs_and_grads(model, data).items()}


def hand_fisher(model, data):
    return {n: (x * g).sum(1).square().mean(0) for n, (x, g) in _outputs_and_grads(model, data).items()}


def hand_ide(model, data):
    return {n: (x.mean(0) * g.mean(0)).sum(0).square() for n, (x, g) in _outputs_and_grads(model, data).items()}


def hand_apoz(model, data):
    x = data[0][0]
    layers = _layers(model)
    scores: dict[str, Tensor] = {}

    def hook(_m, _a, out, n):
        scores[n] = 1.0 - (_channels_last(out, layers[n]) <= 0).float().mean((0, 1))

    hooks = [m.register_forward_hook(functools.partial(hook, n=n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), observable_attention(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return scores


HAND_WRITTEN = {
    "magnitude": hand_magnitude,
    "snip": hand_snip,
    "obd": hand_obd,
    "grasp": hand_grasp,
    "feature_l1": hand_feature_l1,
    "refer": hand_refer,
    "afr": hand_afr,
    "synflow": hand_synflow,
    "l1": hand_l1,
    "l2": hand_l2,
    "taylor": hand_taylor,
    "fisher": hand_fisher,
    "ide": hand_ide,
    "apoz": hand_apoz,
}
GRADIENT_CRITERIA = ("snip", "obd", "grasp", "taylor", "fisher", "ide")
FEATURE_CRITERIA = ("feature_l1", "refer", "afr")


def ours(model: nn.Module, data, name: str) -> dict[str, Tensor]:
    if name == "synflow":
        return ppf.score(model, name, input_shape=tuple(data[0][0].shape[1:]))
    return ppf.score(model, name, data)


def criterion_case(name: str, device: str = "cpu", scale: float = 1.0, batch: int = 8) -> Case:
    """`ppf.score(model, name, data)` against the hand-written version of the criterion on ViT-B/16
    (random weights, one batch of `batch` images); scale < 1 shrinks the model (see `vit`)."""
    if name not in HAND_WRITTEN:
        raise ValueError(f"no hand-written version of criterion {name!r}; available: {sorted(HAND_WRITTEN)}")
    model = vit(scale, device=device)
    data = vit_batch(model, batch, device=device)
    return Case(
        group=f"{name} end to end ViT-B/16 batch {batch} scale {scale:g} {device}",
        ours=lambda: ours(model, data, name),
        baselines={"hand-written": lambda: HAND_WRITTEN[name](model, data)},
        elements=sum(w.numel() for w in _weights(model).values()),
    )
