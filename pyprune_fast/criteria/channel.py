"""Channel criteria: one score per output channel of each Conv/Linear layer, keyed by module name;
higher = kept.

    NAME(model, data=None, *, loss_fn=None, params=None, layers=None, num_batches=None, forward=None,
         normalize=None, p=1.0) -> {module name: (C,) float32}

(the signature of every criterion, see registry.py; also `pyprune_fast.score(model, "taylor", data)`).

Notation: x_n is channel c's feature map for sample n, the layer's output restricted to that channel
(H·W values for a Conv2d; for a Linear applied to N × T × C, batch first, the T token values);
∇_n = ∂L/∂x_n with L = loss_fn(outputs, targets) of the batch holding sample n (the default loss is
the batch-mean cross-entropy, so ∇_n is the per-sample gradient / batch size); E_n is the mean over
every sample of `data`. The model runs in eval mode and is given back unchanged. Layers: every
Conv1d/2d/3d and Linear by default (nn.MultiheadAttention's out_proj included), or `layers=` (names
or types, Conv/Linear only), or the owners of the weights `params=` selects; with the default, layers
never called in the forward pass get no score.
The statistics are accumulated by one forward hook per layer that reduces the whole batch for all
channels at once (see channel_stats.py), never by a loop over channels.

Several criteria and the normalization follow Ide's thesis on feature-map pruning, chapter 4 (its
equation numbers are quoted; the journal version: Ide, Kobayashi, Watanabe and Kurita 2020, "Robust
pruning for efficient CNNs", Pattern Recognition Letters). `normalize="lp"` (eq. 4.13) returns
√S / ‖√S‖_p over the channels of each layer, ‖v‖_p = (Σ_c |v_c|^p)^(1/p), p > 0 (p ≤ 1
recommended); a layer whose scores are all 0 stays 0."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._compat import BatchNorm
from ..modeling import PRUNABLE_MODULES, observable_attention, on_outputs, out_channels, preserved
from .backward import check_objective
from .channel_stats import ChannelStats, reduce_stats
from .engine import ChannelRequest, Job, require_reiterable
from .registry import criterion


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


def _weight_rows(layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    return {n: m.weight.detach().flatten(1) for n, m in layers.items()}


_ROW_CHUNK = 1 << 20  # values per ℓ1 block: its |W| temporary (4 MiB in float32) stays in cache


def _row_norms(rows: Tensor, order: int) -> Tensor:
    """The ℓ1 or ℓ2 norm of each row, as float64 scores, accumulated in float32 (the rows of fp16/bf16
    weights converted, of float64 weights kept in float64), no temporary of more than 2^20 values.
    ℓ2: one fused `vector_norm`. ℓ1: `|W|.sum(1)`, over blocks of rows of at most 2^20 values for
    larger weights, so that each block's |W| is still in cache when it is summed (`vector_norm(ord=1)`
    has no vectorized CPU kernel). The float32 sums stay within a few 1e-7 of float64 ones at a
    fraction of their cost. Timings and errors: benchmarks/README.md, "Fixed costs of the data-free
    criteria"."""
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if order == 2:
        return torch.linalg.vector_norm(rows, 2, dim=1, dtype=dtype).double()
    if rows.numel() <= _ROW_CHUNK:
        return rows.abs().sum(1, dtype=dtype).double()
    norms = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
    step = max(1, _ROW_CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        torch.sum(rows[start : start + step].abs(), 1, dtype=dtype, out=norms[start : start + step])
    return norms.double()


@criterion(needs=(), kind="channel")
def l1(req: ChannelRequest) -> dict[str, Tensor]:
    """S_c = ‖W_c‖₁, W_c the weights of output channel c (a filter, or a row of a Linear)."""
    return {n: _row_norms(w, 1) for n, w in _weight_rows(req.layers).items()}


@criterion(needs=(), kind="channel")
def l2(req: ChannelRequest) -> dict[str, Tensor]:
    """S_c = ‖W_c‖₂, W_c the weights of output channel c (a filter, or a row of a Linear)."""
    return {n: _row_norms(w, 2) for n, w in _weight_rows(req.layers).items()}


@criterion(needs=(), kind="channel")
def bn_scale(req: ChannelRequest) -> dict[str, Tensor]:
    """Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network
    Slimming", ICCV): S_c = |γ_c| of the BatchNorm that follows the layer (see
    `following_batchnorm`); layers with no BatchNorm after them get no score."""
    bns = following_batchnorm(req.model, req.layers)
    scores = {n: bn.weight.detach().abs().double() for n, bn in bns.items() if bn.weight is not None}
    if not scores:
        raise ValueError("bn_scale: none of the layers is followed by a BatchNorm (with affine weights)")
    return scores


@contextlib.contextmanager
def _observing(
    job: Job, watched: dict[str, nn.Module], on_output: Callable[[str, Tensor], Tensor | None]
) -> Iterator[None]:
    """Forward hooks passing `watched[name]`'s output to on_output(name, output) (a tensor it returns
    replaces the output, see `on_outputs`); attention out_proj made observable."""
    with observable_attention(job.model), on_outputs(watched, on_output):
        yield


def forward_stats(
    req: ChannelRequest, needs: set[str], watched: dict[str, nn.Module] | None = None
) -> dict[str, ChannelStats]:
    """One no-grad forward per batch; each watched module's output is reduced in its hook."""
    job = req.job
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
    return reduce_stats(job, stats, seen)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output, tied to an anchor leaf: one backward into the anchor reaches
    every tapped output, and each tap's backward hands ∂L/∂output to its callback and passes it on
    unchanged. The output comes back as a new tensor on the same storage (not a view: code after the
    layer may still modify it in place)."""

    @staticmethod
    def forward(ctx, output: Tensor, anchor: Tensor, on_grad: Callable[[Tensor], None]) -> Tensor:
        ctx.on_grad = on_grad
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        on_grad, ctx.on_grad = ctx.on_grad, None  # what the callback holds (the output) goes with it
        on_grad(grad)
        return grad, None, None


def _module_params(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of every Conv/Linear module of the model."""
    return [p for m in model.modules() if isinstance(m, PRUNABLE_MODULES) for p in m.parameters(recurse=False)]


def gradient_stats(req: ChannelRequest, needs: set[str]) -> dict[str, ChannelStats]:
    """One forward and one backward per batch, towards the layer outputs only (no parameter .grad).

    Each layer's output is tapped in its forward hook (`_Tap`): the forward-only sums are taken
    there, and the output's gradient ∂L/∂output is consumed inside the backward pass the moment
    autograd has computed it, then released. The gradients of the outputs are never resident
    together (`torch.autograd.grad(loss, outputs)` holds all of them until it returns), and an
    output is held only for the sums that need it with its gradient (dot, dot_sq), until that
    gradient arrives. A layer called several times in one forward contributes each call's output as
    samples; an output the loss does not depend on gets a zero gradient.

    No weight gradient is computed, so the weights and biases of every Conv/Linear module are frozen
    during the pass (the taps make the outputs require a gradient): autograd then does not save the
    layers' inputs that only a weight gradient needs, which keeps the peak memory below that of
    `autograd.grad(loss, outputs)` with the weights trainable (benchmarks/README.md, "Channel gradient
    criteria"). Bare parameters used functionally (an nn.MultiheadAttention's in_proj_weight) keep
    their flags: torch's matmul of a non-contiguous 3-D input by a weight that needs no gradient runs
    as a batched matmul, slower on CPU than the folded one it runs otherwise (a Linear module fed a
    non-contiguous 3-D input, which the models here do not have, runs that way in this pass)."""
    job = req.job
    stats = {n: ChannelStats(m, needs) for n, m in req.layers.items()}
    keep_output = bool(needs & {"dot", "dot_sq"})
    anchor = torch.zeros((), requires_grad=True)
    tapped: list[str] = []  # this batch's tapped outputs, in call order
    pending: dict[int, Tensor] = {}  # call index -> zeros shaped like the output, until its gradient arrives

    def tap(name: str, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled():  # the model's forward ran this layer under no_grad
            return None
        stats[name].add_output(output)
        call = len(tapped)
        tapped.append(name)
        pending[call] = output.new_zeros(()).expand(output.shape)
        kept = output.detach() if keep_output else None

        def on_grad(grad: Tensor) -> None:
            del pending[call]
            stats[name].add_gradient(grad if kept is None else kept, grad)

        return _Tap.apply(output, anchor, on_grad)

    seen: set[str] = set()
    with preserved(job.model, job.tensors), _observing(job, req.layers, tap):
        for p in _module_params(job.model):  # preserved() puts the flags back
            p.requires_grad_(False)
        for inputs, targets in job.batches():
            tapped.clear()
            loss = job.loss(job.run(inputs), targets)
            req.check_seen(tapped)
            if tapped:
                torch.autograd.grad(check_objective(loss), [anchor], allow_unused=True)
            del loss
            for call, zeros in pending.items():  # not on the loss's path: its gradient is 0
                stats[tapped[call]].add_gradient(zeros, zeros)
            pending.clear()
            seen.update(tapped)
    return reduce_stats(job, stats, seen)


@criterion(needs=("data",), kind="channel")
def apoz(req: ChannelRequest) -> dict[str, Tensor]:
    """Network trimming (Hu et al. 2016, arXiv:1607.03250): S_c = 1 − APoZ_c,
    APoZ_c = E_n[mean_s [a_{n,s} ≤ 0]] the fraction of the channel's post-activation outputs that
    are zero, a the input of the activation: the output of the
    BatchNorm that follows the layer if there is one (see `following_batchnorm`), else the layer's
    output; a ReLU zeroes exactly the entries a ≤ 0."""
    bns = following_batchnorm(req.model, req.layers)
    watched = {n: bns.get(n, m) for n, m in req.layers.items()}
    stats = forward_stats(req, {"zeros"}, watched)
    return {n: 1.0 - s.total("zeros") / s.positions for n, s in stats.items()}


@criterion(needs=("data",), kind="channel")
def hrank(req: ChannelRequest) -> dict[str, Tensor]:
    """HRank (Lin et al. 2020, "HRank: Filter Pruning using High-Rank Feature Map", CVPR):
    S_c = E_n[rank(X_{n,c})], X_{n,c} sample n's H × W feature map of channel c (Conv2d; D·H × W for
    Conv3d). For Linear and Conv1d layers a sample's map is a vector, so the rank is
    taken of the channel's samples × positions matrix over each batch (tokens for a ViT's Linear)
    and averaged over batches. Ranks from torch.linalg.matrix_rank in float32 (default tolerance)."""
    stats = forward_stats(req, {"ranks"})
    return {n: s.total("ranks") / s.rank_count for n, s in stats.items()}


class StatsFormula(NamedTuple):
    """A gradient criterion's formula on accumulated ChannelStats: the sums it needs and the score."""

    needs: frozenset[str]
    score: Callable[[ChannelStats], Tensor]


def _ide_score(s: ChannelStats) -> Tensor:
    return (s.mean("x_sum") * s.mean("g_sum")).sum(s.position_dim).square()


# The formulas of taylor, fisher and ide (their docstrings below), also applied by structured pruning
# to the units of a decoder block (llm.structured.scores): written once here.
FROM_GRADIENTS: dict[str, StatsFormula] = {
    "taylor": StatsFormula(frozenset({"dot"}), lambda s: s.mean("dot").abs()),
    "fisher": StatsFormula(frozenset({"dot_sq"}), lambda s: s.mean("dot_sq")),
    "ide": StatsFormula(frozenset({"x_sum", "g_sum"}), _ide_score),
}


def _from_gradients(req: ChannelRequest, name: str) -> dict[str, Tensor]:
    formula = FROM_GRADIENTS[name]
    return {n: formula.score(s) for n, s in gradient_stats(req, set(formula.needs)).items()}


@criterion(needs=("data", "loss"), kind="channel")
def taylor(req: ChannelRequest) -> dict[str, Tensor]:
    """First-order Taylor (Molchanov et al. 2017, "Pruning Convolutional Neural Networks for Resource
    Efficient Inference", ICLR): S_c = |E_n[x_nᵀ ∇_n]|."""
    return _from_gradients(req, "taylor")


@criterion(needs=("data", "loss"), kind="channel")
def fisher(req: ChannelRequest) -> dict[str, Tensor]:
    """Fisher pruning (Theis et al. 2018, "Faster gaze prediction with dense networks and Fisher
    pruning", arXiv:1801.05787): S_c = E_n[(x_nᵀ ∇_n)²]."""
    return _from_gradients(req, "fisher")


@criterion(needs=("data", "loss"), kind="channel")
def ide(req: ChannelRequest) -> dict[str, Tensor]:
    """Ide's thesis, eq. 4.10: S_c = (E_n[x_n]ᵀ E_n[∇_n])²."""
    return _from_gradients(req, "ide")


@criterion(needs=("data", "loss"), kind="channel")
def ide_trace(req: ChannelRequest) -> dict[str, Tensor]:
    """Ide's thesis, eq. 4.12: S_c = E_n[x_nᵀ Ĥ x_n] with Ĥ = ḡḡᵀ, ḡ = E_n[∇_n], i.e. E_n[(x_nᵀ ḡ)²].
    Two passes over `data` (ḡ first, then the projections), so data must be re-iterable (a list or a
    DataLoader, not a generator)."""
    require_reiterable(req.data, "ide_trace", "the mean gradient ḡ, then the projections x_nᵀ ḡ")
    first = gradient_stats(req, {"g_sum"})
    g_mean = {n: s.mean("g_sum") for n, s in first.items()}
    stats = {n: ChannelStats(s.module, set()) for n, s in first.items()}

    def on_output(name: str, output: Tensor) -> None:
        stats[name].add_output(output)
        stats[name].add_projection(output, g_mean[name])

    job = req.job
    watched = {n: s.module for n, s in first.items()}
    with preserved(job.model, job.tensors), _observing(job, watched, on_output), torch.no_grad():
        for inputs, _ in job.batches():
            job.run(inputs)
    stats = reduce_stats(job, stats, {n for n, s in stats.items() if s.samples})
    return {n: s.mean("proj_sq") for n, s in stats.items()}
