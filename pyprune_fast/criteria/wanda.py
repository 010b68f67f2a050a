"""Wanda (Sun, Liu, Bair and Kolter 2024, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR): weight magnitude times input activation norm, as a registry criterion (Linear and
Conv layers of any model) and as a method of the block pipeline (per row, the paper's granularity);
both call `wanda_score`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modeling import PRUNABLE_MODULES, capture_inputs, observable_attention
from .engine import Job
from .input_stats import InputStats
from .method import LayerMethod, register_method
from .registry import criterion


def wanda_score(weight: Tensor, scale: Tensor) -> Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ in float32 (one new tensor): `scale` holds ‖X_j‖₂ arranged to broadcast
    against the weight (`_input_scale`)."""
    return weight.detach().to(torch.float32, copy=True).abs_().mul_(scale)


def _weight_owners(job: Job) -> dict[str, nn.Module]:
    """For every scored parameter, the Linear/Conv module whose `.weight` it is, keyed by module name."""
    by_id = {id(m.weight): (name, m) for name, m in job.model.named_modules() if isinstance(m, PRUNABLE_MODULES)}
    owners = {}
    for pname, p in job.params.items():
        if id(p) not in by_id:
            raise ValueError(f"wanda scores the weights of Linear and Conv layers; {pname!r} is not one")
        owners[pname] = by_id[id(p)]
    return owners


def _sum_of_squares(module: nn.Module, x: Tensor) -> Tensor:
    """Σ x_j² per input feature j over every sample and position."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).pow(2).sum(0)
    spatial = module.weight.dim() - 2
    channel_dim = x.dim() - spatial - 1
    dims = [d for d in range(x.dim()) if d != channel_dim]
    return x.pow(2).sum(dim=dims)


def _input_scale(module: nn.Module, norms: Tensor) -> Tensor:
    """‖X_j‖₂ arranged to broadcast against the weight: [1, in] for Linear; for a conv with G groups,
    [out, in/G, 1, ...] where out channel o of group o // (out/G) sees input channels of that group."""
    if isinstance(module, nn.Linear):
        return norms.unsqueeze(0)
    out, per_group = module.weight.shape[:2]
    groups = module.groups
    table = norms.view(groups, per_group).repeat_interleave(out // groups, dim=0)
    return table.view(out, per_group, *([1] * (module.weight.dim() - 2)))


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _reduced_sums(job: Job, modules: dict[str, nn.Module], sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """The Σ x_j² of every layer over the batches of every rank (group=); a layer not called on a rank
    counts zeros there, and is missing only if no rank called it."""
    names = list(modules)
    seen = torch.tensor([float(n in sums) for n in names], dtype=torch.float64)
    full = [sums[n] if n in sums else torch.zeros(_in_features(modules[n]), device=job.device) for n in names]
    job.reduce([*full, seen])
    return {n: s for n, s, flag in zip(names, full, seen.tolist()) if flag}


@criterion(needs=("data",))
def wanda(job: Job) -> list[Tensor]:
    """S(W_ij) = |W_ij| · ‖X_j‖₂, X_j the j-th input feature of the layer over all samples and
    positions of all batches (for a convolution: input channel j over batch and space, broadcast over
    the kernel and mapped through the groups). Needs data, no loss."""
    owners = _weight_owners(job)
    modules = {name: m for name, m in owners.values()}
    sums: dict[str, Tensor] = {}

    def on_input(name: str, x: Tensor) -> None:
        s = _sum_of_squares(modules[name], x)
        sums[name] = sums[name] + s if name in sums else s

    with torch.no_grad(), observable_attention(job.model), capture_inputs(modules, on_input):
        for inputs, _ in job.batches():
            job.run(inputs)
    sums = _reduced_sums(job, modules, sums)
    scores = []
    for pname, p in job.params.items():
        mname, module = owners[pname]
        if mname not in sums:
            raise ValueError(f"wanda: layer {mname!r} (owner of {pname!r}) was not called in the forward pass")
        scores.append(wanda_score(p, _input_scale(module, sums[mname].sqrt())))
    return scores


class Wanda(LayerMethod):
    """S_ij = |W_ij| · ‖X_j‖₂ per Linear, ‖X_j‖ over every calibration token; pruned per output row."""

    name = "wanda"
    granularity = "row"
    observes = frozenset({"norms"})

    def score_layer(self, weight: Tensor, stats: InputStats | None) -> Tensor:
        return wanda_score(weight, stats.norms().to(weight.device).unsqueeze(0))


register_method(Wanda(), as_criterion=False)
