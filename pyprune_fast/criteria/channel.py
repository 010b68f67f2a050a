"""Channel criteria: one score per output channel of each Conv/Linear layer, keyed by module name;
higher = kept.

    NAME(model, data=None, *, loss_fn=None, layers=None, normalize=None, p=1.0) -> {module name: (C,) float32}

Notation: x_n is channel c's feature map for sample n, the layer's output restricted to that channel
(H·W values for a Conv2d; for a Linear applied to N × T × C, batch first, the T token values);
∇_n = ∂L/∂x_n with L = loss_fn(outputs, targets) of the batch holding sample n (the default loss is
the batch-mean cross-entropy, so ∇_n is the per-sample gradient / batch size); E_n is the mean over
every sample of `data`. The model runs in eval mode and is given back unchanged. Layers: every
Conv1d/2d/3d and Linear by default (nn.MultiheadAttention's out_proj included), or `layers=` (names
or types, Conv/Linear only); with the default, layers never called in the forward pass get no score.
The statistics are accumulated by one forward hook per layer that reduces the whole batch for all
channels at once (see channel_stats.py), never by a loop over channels.

`normalize="lp"` (seed 004, eq. 4.13) returns √S / ‖√S‖_p over the channels of each layer,
‖v‖_p = (Σ_c |v_c|^p)^(1/p), p > 0 (p ≤ 1 recommended); a layer whose scores are all 0 stays 0."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._compat import BatchNorm
from .channel_stats import ChannelStats
from .engine import PRUNABLE_MODULES, Job, first_tensor, make_job, observable_attention, preserved, select_layers

CHANNEL_CRITERIA: dict[str, Callable[..., dict[str, Tensor]]] = {}


def following_batchnorm(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, BatchNorm]:
    """The BatchNorm that follows each layer: the leaf module registered right after it (in
    `named_modules()` order) when it is a BatchNorm with as many features as the layer has output
    channels (Conv → BN as torchvision, timm and most CNNs register them)."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    found = {}
    for (name, module), (_, after) in zip(leaves, leaves[1:]):
        if name in layers and isinstance(after, BatchNorm) and after.num_features == out_channels(module):
            found[name] = after
    return found


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def channel_layers(model: nn.Module, layers) -> dict[str, nn.Module]:
    """Every Conv/Linear by default, else the named or typed layers, which must be Conv/Linear."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layers is None:
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)}
        if not chosen:
            raise ValueError("the model has no Conv1d/2d/3d or Linear layer to score")
        return chosen
    chosen = select_layers(model, layers, {})
    wrong = [n for n, m in chosen.items() if not isinstance(m, PRUNABLE_MODULES)]
    if wrong:
        raise ValueError(f"layers must be Conv1d/2d/3d or Linear modules; these are not: {wrong}")
    return chosen


def _check_normalize(normalize, p) -> None:
    if normalize not in (None, "lp"):
        raise ValueError(f"normalize must be None or 'lp', got {normalize!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p!r}")


def lp_normalize(score: Tensor, p: float) -> Tensor:
    """Eq. 4.13: √S / ‖√S‖_p over one layer's channels (0 where the norm is 0)."""
    root = score.double().sqrt()
    norm = root.pow(p).sum().pow(1.0 / p)
    return torch.where(norm > 0, root / norm, torch.zeros_like(root))


@dataclass
class Request:
    """A channel criterion's resolved arguments; `explicit` when the user named the layers."""

    model: nn.Module
    data: Iterable | None
    loss_fn: Callable | None
    layers: dict[str, nn.Module]
    explicit: bool

    def job(self) -> Job:
        ids = {id(m.weight) for m in self.layers.values()}
        return make_job(self.model, self.data, loss_fn=self.loss_fn, params=lambda _n, w: id(w) in ids)

    def check_seen(self, seen: Iterable[str]) -> None:
        seen = set(seen)
        missing = [n for n in self.layers if n not in seen]
        if missing and self.explicit:
            raise ValueError(f"these layers produced no output in the forward pass: {missing}")
        if len(missing) == len(self.layers):
            raise ValueError("none of the scored layers was called in the forward pass")


def channel_criterion(fn: Callable[[Request], dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
    """Turns `fn(request) -> {name: per-channel score}` into the public criterion
    with the shared argument checks, L_p normalization and float32 results, and registers it."""

    def wrapper(
        model: nn.Module,
        data: Iterable | None = None,
        *,
        loss_fn: Callable | None = None,
        layers=None,
        normalize: str | None = None,
        p: float = 1.0,
    ) -> dict[str, Tensor]:
        _check_normalize(normalize, p)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        scores = fn(Request(model, data, loss_fn, channel_layers(model, layers), layers is not None))
        if normalize == "lp":
            scores = {n: lp_normalize(s, p) for n, s in scores.items()}
        return {n: s.float() for n, s in scores.items()}

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__module__ = fn.__module__
    CHANNEL_CRITERIA[fn.__name__] = wrapper
    return wrapper


def _weight_rows(layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    return {n: m.weight.detach().flatten(1) for n, m in layers.items()}


@channel_criterion
def l1(req: Request) -> dict[str, Tensor]:
    """S_c = ‖W_c‖₁, W_c the weights of output channel c (a filter, or a row of a Linear)."""
    return {n: w.abs().sum(1, dtype=torch.float64) for n, w in _weight_rows(req.layers).items()}


@channel_criterion
def l2(req: Request) -> dict[str, Tensor]:
    """S_c = ‖W_c‖₂, W_c the weights of output channel c (a filter, or a row of a Linear)."""
    return {n: w.double().square().sum(1).sqrt() for n, w in _weight_rows(req.layers).items()}


@channel_criterion
def bn_scale(req: Request) -> dict[str, Tensor]:
    """Network slimming: S_c = |γ_c| of the BatchNorm that follows the layer (see
    `following_batchnorm`); layers with no BatchNorm after them get no score."""
    bns = following_batchnorm(req.model, req.layers)
    scores = {n: bn.weight.detach().abs().double() for n, bn in bns.items() if bn.weight is not None}
    if not scores:
        raise ValueError("bn_scale: none of the layers is followed by a BatchNorm (with affine weights)")
    return scores


@contextlib.contextmanager
def _observing(job: Job, watched: dict[str, nn.Module], on_output: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Forward hooks passing `watched[name]`'s output to on_output(name, output); attention out_proj
    made observable."""
    handles = []
    with observable_attention(job.model):
        for name, module in watched.items():

            def hook(_module, _args, output, name=name):
                on_output(name, first_tensor(output))

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def forward_stats(
    req: Request, needs: set[str], watched: dict[str, nn.Module] | None = None
) -> dict[str, ChannelStats]:
    """One no-grad forward per batch; each watched module's output is reduced in its hook."""
    job = req.job()
    watched = req.layers if watched is None else watched
    stats = {n: ChannelStats(m, needs) for n, m in req.layers.items()}
    seen: set[str] = set()

    def on_output(name: str, output: Tensor) -> None:
        seen.add(name)
        stats[name].add_output(output)

    with preserved(job.model, job.tensors), _observing(job, watched, on_output), torch.no_grad():
        for inputs, _ in job.batches():
            job.run(inputs)
    req.check_seen(seen)
    return {n: s for n, s in stats.items() if n in seen}


def gradient_stats(req: Request, needs: set[str]) -> dict[str, ChannelStats]:
    """One forward and one backward (∂L/∂outputs only, no parameter .grad) per batch."""
    job = req.job()
    stats = {n: ChannelStats(m, needs) for n, m in req.layers.items()}
    outputs: dict[str, Tensor] = {}

    def on_output(name: str, output: Tensor) -> None:
        outputs[name] = output

    seen: set[str] = set()
    with preserved(job.model, job.tensors), _observing(job, req.layers, on_output):
        for inputs, targets in job.batches():
            outputs.clear()
            loss = job.loss(job.run(inputs), targets)
            req.check_seen(outputs)
            names = [n for n in outputs if outputs[n].requires_grad]
            grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                out = outputs[name]
                stats[name].add_output(out)
                stats[name].add_gradient(out, torch.zeros_like(out) if grad is None else grad)
                seen.add(name)
            outputs.clear()
    return {n: s for n, s in stats.items() if n in seen}


@channel_criterion
def apoz(req: Request) -> dict[str, Tensor]:
    """S_c = 1 − APoZ_c, APoZ_c = E_n[mean_s [a_{n,s} ≤ 0]] the fraction of the channel's
    post-activation outputs that are zero, a the input of the activation: the output of the
    BatchNorm that follows the layer if there is one (see `following_batchnorm`), else the layer's
    output; a ReLU zeroes exactly the entries a ≤ 0."""
    bns = following_batchnorm(req.model, req.layers)
    watched = {n: bns.get(n, m) for n, m in req.layers.items()}
    stats = forward_stats(req, {"zeros"}, watched)
    return {n: 1.0 - s.sums["zeros"] / s.positions for n, s in stats.items()}


@channel_criterion
def hrank(req: Request) -> dict[str, Tensor]:
    """HRank: S_c = E_n[rank(X_{n,c})], X_{n,c} sample n's H × W feature map of channel c (Conv2d;
    D·H × W for Conv3d). For Linear and Conv1d layers a sample's map is a vector, so the rank is
    taken of the channel's samples × positions matrix over each batch (tokens for a ViT's Linear)
    and averaged over batches. Ranks from torch.linalg.matrix_rank in float32 (default tolerance)."""
    stats = forward_stats(req, {"ranks"})
    return {n: s.sums["ranks"] / s.rank_count for n, s in stats.items()}


@channel_criterion
def taylor(req: Request) -> dict[str, Tensor]:
    """Molchanov et al.: S_c = |E_n[x_nᵀ ∇_n]|."""
    return {n: s.mean("dot").abs() for n, s in gradient_stats(req, {"dot"}).items()}


@channel_criterion
def fisher(req: Request) -> dict[str, Tensor]:
    """Theis et al.: S_c = E_n[(x_nᵀ ∇_n)²]."""
    return {n: s.mean("dot_sq") for n, s in gradient_stats(req, {"dot_sq"}).items()}


@channel_criterion
def ide(req: Request) -> dict[str, Tensor]:
    """Seed 004, eq. 4.10: S_c = (E_n[x_n]ᵀ E_n[∇_n])²."""
    stats = gradient_stats(req, {"x_sum", "g_sum"})
    return {n: (s.mean("x_sum") * s.mean("g_sum")).sum(s.position_dim).square() for n, s in stats.items()}


@channel_criterion
def ide_trace(req: Request) -> dict[str, Tensor]:
    """Seed 004, eq. 4.12: S_c = E_n[x_nᵀ Ĥ x_n] with Ĥ = ḡḡᵀ, ḡ = E_n[∇_n], i.e. E_n[(x_nᵀ ḡ)²].
    Two passes over `data` (ḡ first, then the projections), so data must be re-iterable (a list or a
    DataLoader, not a generator)."""
    if req.data is not None and iter(req.data) is req.data:
        raise ValueError(
            "ide_trace passes over data twice: data must be re-iterable (a list, a DataLoader), not an iterator"
        )
    first = gradient_stats(req, {"g_sum"})
    g_mean = {n: s.mean("g_sum") for n, s in first.items()}
    stats = {n: ChannelStats(s.module, set()) for n, s in first.items()}

    def on_output(name: str, output: Tensor) -> None:
        stats[name].add_output(output)
        stats[name].add_projection(output, g_mean[name])

    job = req.job()
    watched = {n: s.module for n, s in first.items()}
    with preserved(job.model, job.tensors), _observing(job, watched, on_output), torch.no_grad():
        for inputs, _ in job.batches():
            job.run(inputs)
    return {n: s.mean("proj_sq") for n, s in stats.items()}
