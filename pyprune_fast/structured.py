"""Filter replacement before channel pruning: the lowest-scored filters of a layer are overwritten with
copies of the highest-scored ones, so that what pruning later removes are duplicates ("filter
duplication": Ikuta, Yata and Manabe 2024, "A study of filter duplication for CNNs filter pruning",
Proc. SPIE 13164, IWAIT 2024)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .criteria.channel import following_batchnorm
from .modeling import PRUNABLE_MODULES, out_channels

MODES = ("duplicate", "best")


def _order(score: Tensor) -> Tensor:
    """Channel indices from lowest to highest score; among equal scores the lower index is lower."""
    return torch.sort(score.detach().cpu().double(), stable=True).indices


@torch.no_grad()
def _copy_channel(module: nn.Module, bn: nn.Module | None, dst: Tensor, src: Tensor) -> None:
    tensors = [module.weight, module.bias]
    if bn is not None:
        tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    for t in tensors:
        if t is not None:
            t[dst.to(t.device)] = t[src.to(t.device)]


def replace_filters(
    model: nn.Module, scores: Mapping[str, Tensor], ratio: float, mode: str = "duplicate"
) -> dict[str, list[tuple[int, int]]]:
    """In each layer named in `scores` ({Conv/Linear module name: (C,) scores}, e.g. from
    criteria.channel.hrank), the k = round(ratio × C) lowest-scored output channels are replaced, in
    place, by copies of high-scored ones: the filter (weight[c] and bias[c]) and, when a BatchNorm
    follows the layer (see criteria.channel.following_batchnorm), its γ, β, running mean and running
    variance of that channel, so the copy computes the same feature map as its source.

    mode="duplicate": the i-th lowest channel gets the i-th highest (ratio ≤ 0.5 and k ≤ C // 2, so
    that no channel is both a source and replaced); mode="best": every replaced channel gets the single
    highest. Order: by score, among equal scores the lower index is lower. Returns, per layer, the
    (replaced channel, source channel) pairs.

    Args:
        model: the model, changed in place.
        scores: {Conv/Linear module name: (C,) scores}.
        ratio: the fraction of each layer's channels to replace.
        mode: "duplicate" or "best".

    Returns:
        {layer name: [(replaced channel, source channel), ...]}.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    limit = 0.5 if mode == "duplicate" else 1.0
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= limit:
        raise ValueError(f"ratio must be in [0, {limit}] for mode={mode!r}, got {ratio!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict of layer name -> Tensor, got {type(scores).__name__}")
    modules = dict(model.named_modules())
    layers = {}
    for name, score in scores.items():
        if name not in modules:
            raise ValueError(f"scores names a layer the model does not have: {name!r}")
        module = modules[name]
        if not isinstance(module, PRUNABLE_MODULES):
            raise ValueError(f"{name!r} is a {type(module).__name__}; filters are replaced in Conv/Linear layers only")
        if not isinstance(score, Tensor) or score.shape != (out_channels(module),):
            shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"scores[{name!r}] must have shape ({out_channels(module)},), got {shape}")
        if torch.isnan(score).any():
            raise ValueError(f"scores[{name!r}] holds NaN")
        layers[name] = module
    bns = following_batchnorm(model, layers)
    report = {}
    for name, module in layers.items():
        order = _order(scores[name])
        k = round(float(ratio) * order.numel())
        if mode == "duplicate":
            k = min(k, order.numel() // 2)
        dst = order[:k]
        src = order.flip(0)[:k] if mode == "duplicate" else order[-1:].expand(k)
        _copy_channel(module, bns.get(name), dst, src)
        report[name] = list(zip(dst.tolist(), src.tolist()))
    return report
