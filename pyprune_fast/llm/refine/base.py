"""The refinement protocol (see the package docstring): what a refinement is, what it receives at its
stage of the block pipeline, what it gives back, and the registry of refinements by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ...criteria.input_stats import InputStats
from ...criteria.method import OBSERVABLE, Block, Method

STAGES = ("model", "dense", "masked")  # the order in which the pipeline applies them


@dataclass
class Gain:
    """What one application of a refinement did, for the report: its own objective (`metric`, e.g.
    "block output error" or "kept score") before and after, and the seconds it took (set by the
    pipeline). Lower is better unless `higher_is_better`."""

    metric: str
    before: float
    after: float
    seconds: float = 0.0
    higher_is_better: bool = False

    @property
    def relative(self) -> float:
        """after / before (1.0 when before is 0): below 1 is a gain for an error, above 1 for a score."""
        return self.after / self.before if self.before else 1.0


@dataclass
class ModelStep:
    """What a refinement of stage "model" receives, once, before the calibration inputs of block 0 are
    captured: the model, its blocks (their qualified name `prefix`), the run's method and pattern, and
    `capture()`, which returns block 0's calibration inputs (llm.blocks.BlockInputs) for a refinement that
    needs statistics of its own. A refinement that changes anything outside the blocks' parameters
    appends to `undo` a callable that reverts it; the pipeline calls them, last first, if the run fails."""

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    method: Method
    pattern: Any  # llm.sparsity.Pattern
    capture: Callable[[], Any]
    undo: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class BlockStep:
    """What a refinement of stage "dense" or "masked" receives for one block, on the compute device.

        block    the method's view (criteria.method.Block): index, module, linears by name, pattern, this
                 block's fraction, granularity, the Linears' input statistics `stats` (after the dense
                 statistics pass; summed over the ranks of group=), the calibration `inputs`
                 (llm.blocks.BlockInputs: `inputs.run(module, j)` is the block's output on batch j),
                 `comm`, `prefix` (`block.qualified(name)` names a Linear in errors)
        method   the run's method
        targets  the dense block's outputs per calibration batch (the same order as block.inputs), when
                 the method or a refinement of the run keeps targets; else None
        dense    stage "masked": the dense weights of the block's Linears (copies), when a refinement of
                 the run `keeps_dense`; else None
        masks    stage "masked": the keep-mask (bool, True = kept) of every pruned Linear, as the method
                 left it (for a method that prunes in place: weight != 0). A refinement that changes a
                 mask writes the new one here and zeroes the weight where it is False; the pattern (N:M)
                 or the count per row / per layer stays exact.
        scores   stage "dense": `scores(names)` gives the method's float32 scores of those Linears (higher
                 = kept); for a method that prunes in place (no score per weight), |W_ij|·‖X_j‖₂, the
                 diagonal approximation of SparseGPT's saliency w²/[H⁻¹]_jj.
        dense_inputs  stage "masked": the hidden states the dense model gives this block, per calibration
                 batch (the other arguments as block.inputs'), when a refinement of the run
                 `keeps_dense_inputs`; block.inputs are those of the model pruned so far, and the two
                 differ by the error of the blocks before. None when they are the same (block 0's, or
                 propagate="dense").

    A refinement of stage "dense" may change the block's parameters only in ways that keep its function
    (a permutation of channels): the targets then stay valid, and it permutes `block.stats` to match (the
    statistics of a Linear's input are shared by every Linear reading it: permute the shared object once).
    A refinement of stage "masked" may change kept weights and, keeping the pattern, masks."""

    block: Block
    method: Method
    targets: list[Tensor] | None = None
    dense: dict[str, Tensor] | None = None
    masks: dict[str, Tensor] | None = None
    scores: Callable[[list[str]], dict[str, Tensor]] | None = None
    dense_inputs: list[Tensor] | None = None

    @property
    def stats(self) -> dict[str, InputStats]:
        return self.block.stats


class Refinement:
    """Base class of the refinement protocol (package docstring). Subclasses set the class attributes
    and implement `refine_`."""

    name: str = ""
    stage: str = "masked"
    order: int = 0  # among refinements of the same stage: lower first
    needs_data: bool = True
    observes: frozenset[str] = frozenset()  # input statistics it reads, as Method.observes
    keeps_targets: bool = False  # reads block.inputs and the dense outputs (step.targets)
    keeps_dense: bool = False  # reads the dense weights in stage "masked" (step.dense)
    keeps_dense_inputs: bool = False  # reads the dense model's inputs of each block (step.dense_inputs)

    def check(self, plan: Any) -> None:
        """ValueError for a run (llm.pipeline.Plan: method, pattern, granularity, options) the refinement
        cannot refine, before anything is touched. Default: every sequential run."""

    def refine_(self, step: ModelStep | BlockStep) -> Gain:
        """Refines the model (stage "model") or one block (the others) in place; returns its gain."""
        raise NotImplementedError

    def configured(self, **options: Any) -> Refinement:
        """The refinement with the pipeline's keyword options applied where it takes them (default: itself)."""
        return self

    def workspace_bytes(self, linears: dict[str, nn.Linear], forward_bytes: int) -> int:
        """Peak bytes its own computation adds to a block's step (the pipeline's memory estimate)."""
        return 0

    def record(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues (beside its name)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


REFINEMENTS: dict[str, Refinement] = {}


def check_refinement(refinement: object) -> Refinement:
    """A Refinement instance with a name, a known stage and known observables, else TypeError/ValueError."""
    if isinstance(refinement, type) and issubclass(refinement, Refinement):
        raise TypeError(f"refine takes Refinement instances, got the class {refinement.__name__}: call it first")
    if not isinstance(refinement, Refinement):
        raise TypeError(f"refine must name refinements or give Refinement instances, got {type(refinement).__name__}")
    if not isinstance(refinement.name, str) or not refinement.name:
        raise ValueError(f"{type(refinement).__name__}.name must be a non-empty str, got {refinement.name!r}")
    if refinement.stage not in STAGES:
        raise ValueError(f"{refinement.name}: stage must be one of {STAGES}, got {refinement.stage!r}")
    unknown = set(refinement.observes) - set(OBSERVABLE)
    if unknown:
        raise ValueError(f"{refinement.name}: observes must be a subset of {OBSERVABLE}, got {sorted(unknown)}")
    return refinement


def register_refinement(refinement: Refinement) -> Refinement:
    """Registers a refinement by its name (new); returns it, now `REFINEMENTS[refinement.name]`."""
    check_refinement(refinement)
    if refinement.name in REFINEMENTS:
        raise ValueError(f"a refinement named {refinement.name!r} is registered already")
    REFINEMENTS[refinement.name] = refinement
    return refinement


def get_refinements(refine: str | Refinement | Iterable[str | Refinement] | None, **options: Any) -> tuple:
    """The refinements `refine` stands for (names, Refinement instances, or one of either), configured
    with the pipeline's keyword options, in the order the pipeline applies them: by stage, then `order`,
    whatever order they were given in. ValueError naming an unknown or repeated refinement."""
    if refine is None:
        return ()
    items = [refine] if isinstance(refine, (str, Refinement, type)) else list(refine)
    chosen: list[Refinement] = []
    for item in items:
        if isinstance(item, str):
            if item not in REFINEMENTS:
                raise ValueError(f"unknown refinement {item!r}; valid refinements: {', '.join(REFINEMENTS)}")
            item = REFINEMENTS[item].configured(**options)
        chosen.append(check_refinement(item))
    names = [r.name for r in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"refine names each refinement once; repeated: {', '.join(repeated)}")
    return tuple(sorted(chosen, key=lambda r: (STAGES.index(r.stage), r.order)))
