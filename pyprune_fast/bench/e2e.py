"""Criteria end to end: `pyprune_fast.score(model, name, data)` against the straightforward code users
write for the same formula (forward, backward, per-weight arithmetic; forward hooks for features), on
three workloads: torchvision's ViT-B/16 (random weights, one batch of 8 images, eval mode), the
default model all-MiniLM-L6-v2 (pretrained, its first calibration batch, InfoNCE) and, for the
BatchNorm criterion only, ResNet-18 (random weights, batch 8). Both score the same parameters (every
Linear and Conv weight, attention out_proj included) and the same layers."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyprune_fast as ppf

from ..modeling import PRUNABLE_MODULES, observable_attention
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


@dataclass
class Workload:
    """A model, one batch `data = [(inputs, targets)]` and its loss `loss_fn(outputs, targets)`: what
    both ours and the hand-written versions score. `input_shape`: one sample's shape, for SynFlow's
    all-ones input (models of float inputs only)."""

    title: str
    model: nn.Module
    data: list
    loss_fn: Callable[[Any, Any], Tensor]
    input_shape: tuple[int, ...] | None = None

    @property
    def inputs(self) -> Any:
        return self.data[0][0]

    def loss(self, temperature: float = 1.0) -> Tensor:
        x, y = self.data[0]
        outputs = self.model(x)
        return self.loss_fn(outputs / temperature if temperature != 1.0 else outputs, y)


def vit_workload(scale: float = 1.0, batch: int = 8, device: str = "cpu") -> Workload:
    """ViT-B/16 (random weights, `vit`) on one batch of `batch` random images, cross-entropy on random labels."""
    model = vit(scale, device=device)
    title = f"ViT-B/16 batch {batch}" + (f" scale {scale:g}" if scale != 1.0 else "")
    return Workload(
        title,
        model,
        vit_batch(model, batch, device=device),
        F.cross_entropy,
        (3, model.image_size, model.image_size),
    )


def minilm_workload(scale: float = 1.0, device: str = "cpu") -> Workload:
    """The default model (all-MiniLM-L6-v2, pretrained) on its first calibration batch (16 passages as
    32 half-passages of up to 128 tokens), the InfoNCE loss of `pyprune-fast prune`. `scale` < 1 keeps
    that fraction of the batch's passages."""
    model, (inputs, targets), loss_fn = _minilm(str(device))
    half = inputs["input_ids"].shape[0] // 2
    keep = max(2, int(half * scale))  # InfoNCE needs two passages: one is its own only candidate, loss 0
    rows = torch.cat([torch.arange(keep), half + torch.arange(keep)]).to(inputs["input_ids"].device)
    inputs = {k: v[rows] for k, v in inputs.items()}
    tokens = tuple(inputs["input_ids"].shape)
    return Workload(f"MiniLM {tokens[0]}x{tokens[1]} tokens", model, [(inputs, targets)], loss_fn)


@functools.lru_cache(maxsize=1)
def _minilm(device: str) -> tuple[nn.Module, tuple, Callable]:
    """The default model, its first calibration batch and its loss, loaded once per process (with its
    held-out embeddings, which the workloads do not use): every MiniLM workload scores the same model,
    which neither ours nor the hand-written versions change."""
    from ..app import zoo

    bundle = zoo.minilm(device, calibration_batches=1)
    return bundle.model, bundle.calibration[0], bundle.loss_fn


def resnet_workload(scale: float = 1.0, batch: int = 8, device: str = "cpu") -> Workload:
    """torchvision's ResNet-18 (random weights, eval mode) on `batch` random images (224², shrunk by
    `scale`): the workload of the BatchNorm criterion, which ViT and MiniLM do not have."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18().eval().to(device)
    side = scaled(224, scale, 32)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch, 3, side, side, generator=g).to(device),
            torch.randint(0, 1000, (batch,), generator=g).to(device),
        )
    ]
    return Workload(f"ResNet-18 batch {batch}", model, data, F.cross_entropy, (3, side, side))


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)}


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {f"{n}.weight": m.weight for n, m in _layers(model).items()}


def _backward(model: nn.Module, objective: Tensor, **kwargs) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    objective.backward(**kwargs)
    grads = {n: w.grad for n, w in _weights(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


def _features(model: nn.Module, x: Any) -> list[Tensor]:
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


def hand_magnitude(w: Workload):
    return {n: p.detach().abs() for n, p in _weights(w.model).items()}


def hand_snip(w: Workload):
    weights = _weights(w.model)
    grads = _backward(w.model, w.loss())
    return {n: (grads[n] * p).abs().detach() for n, p in weights.items()}


def hand_obd(w: Workload):
    weights = _weights(w.model)
    grads = _backward(w.model, w.loss())
    return {n: 0.5 * (grads[n] * p).detach().square() for n, p in weights.items()}


def hand_grasp(w: Workload):
    weights = _weights(w.model)
    g = torch.autograd.grad(w.loss(GRASP_TEMPERATURE), list(weights.values()))
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(w.loss(GRASP_TEMPERATURE), list(weights.values()), create_graph=True)
        hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g)), list(weights.values()))
    return {n: p.detach() * h for (n, p), h in zip(weights.items(), hg)}


def hand_feature_l1(w: Workload):
    weights = _weights(w.model)
    grads = _backward(w.model, sum(f.abs().sum() for f in _features(w.model, w.inputs)))
    return {n: (grads[n] * p).abs().detach() for n, p in weights.items()}


def _refer_objective(features: list[Tensor]) -> Tensor:
    return sum(torch.linalg.svdvals(f.reshape(f.shape[0], -1)).mean() for f in features)


def hand_refer(w: Workload):
    weights = _weights(w.model)
    grads = _backward(w.model, _refer_objective(_features(w.model, w.inputs)))
    return {n: (grads[n] * p).abs().detach() for n, p in weights.items()}


def hand_afr(w: Workload):
    weights = _weights(w.model)
    refer = {
        n: (g * weights[n]).abs().detach()
        for n, g in _backward(w.model, _refer_objective(_features(w.model, w.inputs))).items()
    }
    snip = {n: (g * weights[n]).abs().detach() for n, g in _backward(w.model, w.loss()).items()}

    def z(scores):
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        mean, std = flat.mean(), flat.std(unbiased=False)
        return {n: (s - mean) / std for n, s in scores.items()}

    zr, zs = z(refer), z(snip)
    return {n: zr[n] + zs[n] for n in weights}


def hand_synflow(w: Workload):
    linear = copy.deepcopy(w.model).double()
    with torch.no_grad():
        for v in linear.state_dict().values():
            v.abs_()
    ones = torch.ones((1, *w.input_shape), dtype=torch.float64, device=next(linear.parameters()).device)
    linear(ones).sum().backward()
    return {n: (p.grad * p).abs().float().detach() for n, p in _weights(linear).items()}


def hand_wanda(w: Workload):
    layers = _layers(w.model)
    squares: dict[str, Tensor] = {}

    def hook(module, args, _out, n):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
        squares[n] = x.square().sum(0)

    _forward_hooked(w, hook)
    scores = {}
    for n, m in layers.items():
        norms = squares[n].sqrt()
        scores[f"{n}.weight"] = m.weight.detach().abs() * norms.view(1, -1, *([1] * (m.weight.dim() - 2)))
    return scores


def hand_l1(w: Workload):
    return {n: m.weight.detach().flatten(1).abs().sum(1) for n, m in _layers(w.model).items()}


def hand_l2(w: Workload):
    return {n: m.weight.detach().flatten(1).norm(dim=1) for n, m in _layers(w.model).items()}


def hand_bn_scale(w: Workload):
    modules = list(w.model.named_modules())
    return {
        n: after.weight.detach().abs()
        for (n, m), (_, after) in zip(modules, modules[1:])
        if isinstance(m, nn.Conv2d) and isinstance(after, nn.BatchNorm2d)
    }


def _channels_last(out: Tensor, module: nn.Module) -> Tensor:
    """(N, positions, C): a Linear's output N × ... × C, a conv's N × C × ... moved channels last."""
    if isinstance(module, nn.Linear):
        return out.reshape(out.shape[0], -1, out.shape[-1])
    return out.flatten(2).transpose(1, 2)


def _outputs_and_grads(w: Workload):
    layers = _layers(w.model)
    outs: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o)) for n, m in layers.items()]
    try:
        with observable_attention(w.model):
            loss = w.loss()
    finally:
        for h in hooks:
            h.remove()
    names = list(outs)
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    return {
        n: (_channels_last(outs[n].detach(), layers[n]), _channels_last(g, layers[n])) for n, g in zip(names, grads)
    }


def hand_taylor(w: Workload):
    return {n: (x * g).sum(1).mean(0).abs() for n, (x, g) in _outputs_and_grads(w).items()}


def hand_fisher(w: Workload):
    return {n: (x * g).sum(1).square().mean(0) for n, (x, g) in _outputs_and_grads(w).items()}


def hand_ide(w: Workload):
    return {n: (x.mean(0) * g.mean(0)).sum(0).square() for n, (x, g) in _outputs_and_grads(w).items()}


def _forward_hooked(w: Workload, hook: Callable[..., None]) -> None:
    """One no-grad forward of the workload's inputs with hook(module, args, output, name) on every layer."""
    hooks = [m.register_forward_hook(functools.partial(hook, n=n)) for n, m in _layers(w.model).items()]
    try:
        with torch.no_grad(), observable_attention(w.model):
            w.model(w.inputs)
    finally:
        for h in hooks:
            h.remove()


def hand_hrank(w: Workload):
    ranks: dict[str, Tensor] = {}

    def hook(module, _args, out, n):
        if isinstance(module, nn.Conv2d):  # each sample's H x W map
            ranks[n] = torch.linalg.matrix_rank(out).double().mean(0)
        else:  # a Linear: each channel's samples x tokens matrix
            ranks[n] = torch.linalg.matrix_rank(_channels_last(out, module).permute(2, 0, 1)).double()

    _forward_hooked(w, hook)
    return ranks


def hand_ide_trace(w: Workload):
    g_mean = {n: g.mean(0) for n, (_, g) in _outputs_and_grads(w).items()}
    scores: dict[str, Tensor] = {}

    def hook(module, _args, out, n):
        scores[n] = (_channels_last(out, module) * g_mean[n]).sum(1).square().mean(0)

    _forward_hooked(w, hook)
    return scores


def hand_apoz(w: Workload):
    scores: dict[str, Tensor] = {}

    def hook(module, _args, out, n):
        scores[n] = 1.0 - (_channels_last(out, module) <= 0).float().mean((0, 1))

    _forward_hooked(w, hook)
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
    "wanda": hand_wanda,
    "l1": hand_l1,
    "l2": hand_l2,
    "taylor": hand_taylor,
    "fisher": hand_fisher,
    "ide": hand_ide,
    "ide_trace": hand_ide_trace,
    "apoz": hand_apoz,
    "hrank": hand_hrank,
    "bn_scale": hand_bn_scale,
}
GRADIENT_CRITERIA = ("snip", "obd", "grasp", "taylor", "fisher", "ide", "ide_trace")
FEATURE_CRITERIA = ("feature_l1", "refer", "afr")


def ours(w: Workload, name: str) -> dict[str, Tensor]:
    if name == "synflow":
        return ppf.score(w.model, name, input_shape=w.input_shape)
    return ppf.score(w.model, name, w.data, loss_fn=w.loss_fn)


# the workloads by the name `pyprune-fast bench` gives them: factory(scale, device) -> Workload
WORKLOADS: dict[str, Callable[..., Workload]] = {
    "ViT-B/16": lambda scale=1.0, device="cpu": vit_workload(scale, device=device),
    "MiniLM": minilm_workload,
    "ResNet-18": lambda scale=1.0, device="cpu": resnet_workload(scale, device=device),
}


def workload_criteria(workload: str) -> tuple[str, ...]:
    """The criteria the e2e workload `workload` runs."""
    if workload == "ResNet-18":
        return ("bn_scale",)
    skip = {"bn_scale"} | ({"synflow"} if workload == "MiniLM" else set())
    return tuple(n for n in HAND_WRITTEN if n not in skip)


def criterion_case(name: str, workload: str = "ViT-B/16", device: str = "cpu", scale: float = 1.0) -> Case:
    """`ppf.score(model, name, data)` against the hand-written version of the criterion on one workload
    (ViT-B/16 batch 8, MiniLM's first calibration batch, ResNet-18 batch 8); scale < 1 shrinks it."""
    if name not in HAND_WRITTEN:
        raise ValueError(f"no hand-written version of criterion {name!r}; available: {sorted(HAND_WRITTEN)}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; available: {sorted(WORKLOADS)}")
    if name not in workload_criteria(workload):
        runs = ", ".join(workload_criteria(workload))
        raise ValueError(f"criterion {name!r} is not run on {workload}; its criteria: {runs}")
    w = WORKLOADS[workload](scale=scale, device=device)
    return Case(
        group=f"{name} end to end {w.title} {device}",
        ours=lambda: ours(w, name),
        baselines={"hand-written": lambda: HAND_WRITTEN[name](w)},
        elements=sum(p.numel() for p in _weights(w.model).values()),
    )
