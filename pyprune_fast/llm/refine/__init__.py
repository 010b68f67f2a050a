"""Refinements: steps the block pipeline (llm.pipeline) runs around a method's masking to make the same
sparsity cost less. `llm.prune(model, calib, method="sparsegpt", sparsity="2:4",
refine=("reconstruct", "swap"))`; the CLI's `--refine`. The pipeline knows no refinement by name, as
it knows no method by name: a refinement is an object with one protocol (llm.refine.base).

Where they plug into the block loop (each refinement has one `stage`; the pipeline applies the chosen
ones by stage, then by their `order`, whatever order they were named in):

    stage "model"   once, before block 0's calibration inputs are captured (a permutation of the
                    hidden dimension through the whole model): refine_(ModelStep)
    for each block:
        statistics pass (dense block): the input statistics the method and the refinements observe,
                    the dense outputs as targets when either keeps them
        stage "dense"   before masking, on the dense block; may only change it in ways that keep its
                    function (channel permutations), permuting the statistics to match:
                    refine_(BlockStep with scores)
        the method masks the block (scores → masks, or its own solve)
        stage "masked"  after masking: adjust kept weights and/or masks, the pattern kept exactly
                    (swaps, then reconstruction): refine_(BlockStep with masks, dense weights, targets)
        the next block's inputs from the refined block

    class Refinement:
        name            its key in REFINEMENTS: llm.prune(refine=("name", ...)), the CLI's --refine
        stage, order    where it runs ("model", "dense", "masked") and its place inside the stage
        needs_data      whether it reads calibration inputs
        observes        input statistics of each Linear it reads ("norms", "xtx", "sums"), collected
                        with the method's in the same statistics pass (kept even where the method frees
                        its own, as SparseGPT frees XᵀX)
        keeps_targets   whether it reads the block's calibration inputs and dense outputs
        keeps_dense     whether it reads the dense weights after masking (a copy is kept)
        keeps_dense_inputs  whether it reads the dense model's own inputs of each block: the pipeline
                        then runs each dense block once more on them (one more copy of the hidden states)
        check(plan)     refuses a run it cannot refine (ValueError), before anything is touched
        refine_(step)   refines in place; returns a Gain(metric, before, after) for the report
        configured(**options), workspace_bytes(linears, forward), record(): as the method protocol's

Every refinement is checked before the model is touched: an unknown name is refused by name, and so is
a run a refinement cannot refine (granularity="global", whose masks come from one threshold over the
whole model, takes none). A run that fails in a refinement gives the model back as it was (the
pipeline's undo log, plus ModelStep.undo for changes outside the blocks). Each application's Gain,
with its time, goes to `PruneResult.refinements` (name → one Gain per block, or one for stage "model"),
and the report shows each refinement's gain separately."""

from .base import (
    REFINEMENTS,
    STAGES,
    BlockStep,
    Gain,
    ModelStep,
    Refinement,
    check_refinement,
    get_refinements,
    register_refinement,
)
from .permute import Permute
from .reconstruct import Reconstruct
from .swap import Swap

register_refinement(Permute())
register_refinement(Swap())
register_refinement(Reconstruct())
# the Linears refit in call order, each on the inputs the pruned model gives it (reconstruct's docstring)
register_refinement(Reconstruct("sequential", toward=0.0, name="sequential"))

__all__ = [
    "REFINEMENTS",
    "STAGES",
    "BlockStep",
    "Gain",
    "ModelStep",
    "Permute",
    "Reconstruct",
    "Refinement",
    "Swap",
    "check_refinement",
    "get_refinements",
    "register_refinement",
]
