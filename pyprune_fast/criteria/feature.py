"""Feature-preserving criteria: the gradient of an objective on the layers' outputs F^l.

F^l is the output of each chosen layer, viewed as an N x D matrix with N the batch size. By default
the layers are the modules that own a scored weight and are called in the forward pass
(nn.MultiheadAttention's out_proj is made observable; other weights used functionally are not);
with `layers=` every named layer must produce an output."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _compat, ops
from ..modeling import capture_outputs, observable_attention
from .backward import RunningSum
from .engine import Job, as_float32
from .registry import criterion


def l1_objective(features: list[Tensor]) -> Tensor:
    """Σ_l ‖F^l‖₁ (feature_l1's objective)."""
    return sum(f.float().abs().sum() for f in features)


def refer_objective(features: list[Tensor], rows: str = "samples") -> Tensor:
    """Σ_l mean σ(F^l) (ReFer's objective), F^l viewed as a matrix whose rows are the samples of the batch
    (rows="samples": [N, -1], the criterion's definition) or every token of every sample (rows="tokens":
    [N·T, D], the block-local form of llm.local, where a batch may hold a single sequence)."""
    if rows == "samples":
        return ops.svd_mean_list([f.reshape(f.shape[0], -1) for f in features]).sum()
    if rows == "tokens":
        return ops.svd_mean_list([f.reshape(-1, f.shape[-1]) for f in features]).sum()
    raise ValueError(f"rows must be 'samples' or 'tokens', got {rows!r}")


def feature_gradients(
    job: Job, objective: Callable[[list[Tensor]], Tensor], with_loss: bool = False
) -> tuple[list[Tensor], list[Tensor] | None]:
    """Σ_batches ∂objective(F)/∂w and, when asked, Σ_batches ∂L/∂w from the same forward passes (with
    group=, over the batches of every rank). Each gradient is added to its sum inside the backward
    pass and released (criteria.backward)."""
    layers = job.layers()
    feat_sum, loss_sum = RunningSum(job.tensors), RunningSum(job.tensors)
    with observable_attention(job.model), capture_outputs(layers) as seen:
        for inputs, targets in job.batches():
            seen.clear()
            outputs = job.run(inputs)
            missing = [n for n in layers if n not in seen]
            if missing and job.layers_arg is not None:
                raise ValueError(f"these layers produced no output in the forward pass: {missing}")
            if not seen:
                raise ValueError("none of the feature layers was called in the forward pass")
            if with_loss:
                loss_sum.backward(job.loss(outputs, targets), retain_graph=True)
            feat_sum.backward(objective([seen[n] for n in layers if n in seen]))
    if with_loss:
        sums = job.reduce([*feat_sum.value(), *loss_sum.value()])
        return sums[: len(job.tensors)], sums[len(job.tensors) :]
    return job.reduce(feat_sum.value()), None


@criterion(needs=("data",))
def feature_l1(job: Job) -> list[Tensor]:
    """Feature-preserving saliency: S(w) = |∂(Σ_l ‖F^l‖₁)/∂w ⊙ w|, summed over batches.

    A synaptic saliency in the sense of Tanaka et al. 2020 ("Pruning neural networks without any data
    by iteratively conserving synaptic flow", NeurIPS), S = (∂R/∂w) ⊙ w, with R the total L1 mass of
    the layers' features on real data instead of SynFlow's all-ones input. It came to this project
    without a published source, and none could be found; cite it as this toolkit's criterion."""
    grads, _ = feature_gradients(job, l1_objective)
    scores, _ = ops.saliency(grads, as_float32(job.tensors))
    return scores


@criterion(needs=("data",))
def refer(job: Job) -> list[Tensor]:
    """ReFer (representation-preserving saliency): S(w) = |∂(Σ_l mean σ(F^l))/∂w ⊙ w|, σ the
    min(N, D) singular values of layer l's output reshaped to (N, -1), N the batch size; the gradient
    summed over batches. Weights that keep the features of a batch spread over many directions (a
    large nuclear norm per direction) are kept. It came to this project without a published source,
    and none could be found (the nearest published work: HRank, Lin et al. 2020, ranks feature maps
    per channel); cite it as this toolkit's criterion."""
    grads, _ = feature_gradients(job, refer_objective)
    scores, _ = ops.saliency(grads, as_float32(job.tensors))
    return scores


def standardized(scores: list[Tensor], stats: ops.Stats, what: str) -> list[Tensor]:
    """z(s) = (s − mean) / std over all the scores together (population std; z = 0 where std = 0), mean
    and std from the fused saliency op's statistics; ValueError on non-finite scores (AFR's z-scores)."""
    if stats.nonfinite.item() > 0:
        raise ValueError(
            f"afr: the {what} scores hold {int(stats.nonfinite.item())} non-finite values "
            f"({int(stats.nan.item())} NaN); they cannot be standardized"
        )
    mean, std = stats.mean().float(), stats.std().float()
    inv = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))
    return [(s - mean) * inv for s in scores]


@criterion(needs=("data", "loss"))
def afr(job: Job) -> list[Tensor]:
    """AFR: S = z(ReFer) + z(SNIP) (SNIP: Lee, Ajanthan and Torr 2019), each z-scored over all scored entries together,
    z(s) = (s - mean) / std with the population standard deviation (z = 0 where std = 0).

    One forward per batch serves both gradients; the mean and std come from the fused saliency op's
    statistics. Like ReFer it came to this project without a published source, and none could be
    found; cite it as this toolkit's criterion."""
    feat_grads, loss_grads = feature_gradients(job, refer_objective, with_loss=True)
    weights = as_float32(job.tensors)
    refer_scores, refer_stats = ops.saliency(feat_grads, weights)
    snip_scores, snip_stats = ops.saliency(loss_grads, weights)
    z_refer = standardized(refer_scores, refer_stats, "ReFer")
    z_snip = standardized(snip_scores, snip_stats, "SNIP")
    return _compat.foreach_add(z_refer, z_snip)
