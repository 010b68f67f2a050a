"""Block-local forms of the project's own criteria: the scores of a decoder block's Linear weights W
from gradients of an objective on that block alone, over the calibration batches X_b (the block's
inputs) — no gradient through the whole model. F_l is the output of Linear l of the block, viewed as
[tokens, D_l] (every calibration token a row); Y_b is the dense block's output on X_b.

    snip        L = Σ_b ‖f(X_b; W ⊙ M) − Y_b‖²,  S = |∂L/∂M| at M = M_c, i.e. |∂L/∂Ŵ ⊙ W| at Ŵ = W ⊙ M_c
                M_c: the magnitude candidate mask (|W| at each Linear's own pattern and sparsity).
                At M = 1 the block reproduces its dense target and L and its gradient vanish, so the
                sensitivity of the reconstruction error is taken at the candidate: the first-order
                change of the error when an entry is flipped.
    feature_l1  S = |∂(Σ_b Σ_l ‖F_l‖₁)/∂W ⊙ W| at the dense weights (the block's feature mass)
    refer       S = |∂(Σ_b Σ_l mean σ(F_l))/∂W ⊙ W| at the dense weights, σ the singular values of
                F_l [tokens, D_l] (the spectrum of the block's features, ops.svd_mean_list)
    afr         z(refer) + z(snip), each z-scored over all of the block's Linear weights together

The products |g ⊙ w| and their statistics come from the fused saliency op (ops.saliency); the feature
objectives and AFR's z-scores are the registry criteria's (criteria.feature). Each criterion is a
`BlockLocal` method of the pipeline's protocol (criteria.method)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.func import functional_call

from .. import ops
from .._compat import foreach_add
from ..criteria.backward import RunningSum
from ..criteria.engine import as_float32
from ..criteria.feature import l1_objective, refer_objective, standardized
from ..criteria.magnitude import magnitude_score
from ..criteria.method import Block, Method
from ..modeling import capture_outputs, first_tensor, preserved
from .blocks import BlockInputs
from .sparsity import keep_mask

CRITERIA = ("snip", "feature_l1", "refer", "afr")


def _feature_objective(kind: str, features: list[Tensor]) -> Tensor:
    return l1_objective(features) if kind == "feature_l1" else refer_objective(features, rows="tokens")


def reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """‖f(X_b; ·) − Y_b‖² of one batch: snip's (and afr's) block-local objective, in float32."""
    return (output.float() - target.float()).pow(2).sum()


def _gradients(
    block: nn.Module,
    inputs: BlockInputs,
    linears: dict[str, nn.Linear],
    weights: dict[str, Tensor],
    objective: Callable[[int, Tensor, list[Tensor]], Tensor],
    comm=None,
) -> list[Tensor]:
    """Σ_b ∂objective/∂W over the batches, W = `weights` substituted for the Linears' weights (and
    over every rank's batches with a distributed.Communicator `comm`). The weights enter as detached
    views (no copy); each batch's gradients are added to the float32 sums inside its backward pass and
    released one Linear at a time (criteria.backward), so a block's gradients are never all resident
    next to the sums."""
    names = list(linears)
    leaves = {n: weights[n].detach().requires_grad_(True) for n in names}
    total = RunningSum(list(leaves.values()))
    with capture_outputs(linears) as seen:
        for j in range(len(inputs)):
            args, kwargs = inputs.call(j)
            seen.clear()
            out = first_tensor(functional_call(block, {f"{n}.weight": leaves[n] for n in names}, args, kwargs))
            missing = [n for n in names if n not in seen]
            if missing:
                raise ValueError(f"these Linear layers of the block were not called in its forward: {missing}")
            value = objective(j, out, [seen[n] for n in names])
            total.backward(value)
    return total.value() if comm is None else comm.all_reduce_sum_(total.value())


def block_scores(
    criterion: str,
    block: nn.Module,
    inputs: BlockInputs,
    linears: dict[str, nn.Linear],
    targets: list[Tensor] | None,
    candidate: Callable[[str, Tensor], Tensor],
    comm=None,
) -> dict[str, Tensor]:
    """{Linear name: float32 score} of `criterion` on one block (module docstring). `targets`: the
    dense block's outputs per batch (snip, afr); `candidate(name, weight)`: the candidate keep-mask;
    `comm`: a distributed.Communicator whose ranks each hold part of the batches (gradient sums
    reduced over them)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown block-local criterion {criterion!r}; valid: {CRITERIA}")
    names = list(linears)
    dense = {n: linears[n].weight for n in names}
    weights = as_float32(list(dense.values()))
    out: dict[str, list[Tensor]] = {}
    with preserved(block, []):
        if criterion in ("snip", "afr"):
            if targets is None:
                raise ValueError(f"{criterion} needs the dense block outputs as targets")
            masked = {n: dense[n].detach() * candidate(n, dense[n]) for n in names}

            def reconstruction(j: int, y: Tensor, _features: list[Tensor]) -> Tensor:
                return reconstruction_error(y, targets[j])

            out["snip"] = _gradients(block, inputs, linears, masked, reconstruction, comm)
        if criterion != "snip":
            kind = "refer" if criterion == "afr" else criterion

            def feature(_j: int, _y: Tensor, features: list[Tensor]) -> Tensor:
                return _feature_objective(kind, features)

            out[kind] = _gradients(block, inputs, linears, dense, feature, comm)
    if criterion == "afr":
        z = []
        for what, grads in (("ReFer", out["refer"]), ("SNIP", out["snip"])):
            scores, stats = ops.saliency(grads, weights)
            z.append(standardized(scores, stats, what))
        return dict(zip(names, foreach_add(z[0], z[1])))
    scores, _ = ops.saliency(out[criterion], weights)
    return dict(zip(names, scores))


class BlockLocal(Method):
    """A block-local criterion (module docstring) as a method of the pipeline: the block's dense outputs
    are kept as targets, the scores come from gradients on the block alone, and snip's (and afr's)
    candidate mask is magnitude at the block's own pattern, fraction and granularity (per layer for
    N:M and global runs)."""

    keeps_targets = True

    def __init__(self, name: str) -> None:
        if name not in CRITERIA:
            raise ValueError(f"unknown block-local criterion {name!r}; valid: {CRITERIA}")
        self.name = name

    def score(self, block: Block, names: list[str] | None = None) -> dict[str, Tensor]:
        granularity = "layer" if block.granularity in (None, "global") else block.granularity

        def candidate(name: str, weight: Tensor) -> Tensor:
            return keep_mask(name, magnitude_score(weight), block.pattern, block.fraction, granularity)

        scores = block_scores(
            self.name, block.module, block.inputs, block.linears, block.targets, candidate, block.comm
        )
        return scores if names is None else {n: scores[n] for n in names}

    def workspace_bytes(self, linears: dict[str, nn.Linear], forward_bytes: int) -> int:
        return 4 * sum(lin.weight.numel() for lin in linears.values()) + 2 * forward_bytes
