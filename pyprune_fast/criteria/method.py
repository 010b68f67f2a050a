"""The method protocol: a pruning method is one object, used by every path that prunes block by block.

The block pipeline (`llm.prune`, `llm.scores`) knows no method by name. For each block it runs a
statistics pass in which it collects what the method `observes` of each Linear's input, keeps the dense
block outputs when the method `keeps_targets`, and then either asks the method to `score` the block (the
pipeline then chooses the masks by granularity: row, layer, N:M or global) or, for a method that
`prunes_in_place` (SparseGPT's solve), asks it to `prune_` the block itself.

    class Method:
        name            its key in METHODS: llm.prune(method="name"), the CLI's --criterion
        needs_data      whether it reads calibration inputs (magnitude does not)
        granularity     the default mask granularity of its paper: "row" or "layer"
        observes        the statistics of each Linear's input it reads: "norms" (Σ_t x_tj²), "xtx"
                        (XᵀX) and/or "sums" (Σ_t x_tj: means and variances), shared by the
                        Linears that read the same input (criteria.input_stats)
        keeps_targets   whether it reads the dense block's outputs (block-local objectives)
        prunes_in_place whether it prunes the block itself (prune_) instead of scoring it (score)
        per_layer       whether each Linear's score depends on that Linear alone: the pipeline then
                        asks for one Linear's scores at a time (one float32 score tensor resident)
        layers(block)   the Linears it scores (all; each must have been called if it observes inputs)
        score(block, names)  {Linear name: float32 score shaped like its weight}, higher = kept
        prune_(block)   prunes every Linear of the block in place to the block's pattern and fraction
        check(pattern, granularity)       refuses a combination it cannot run, before anything is touched
        workspace_bytes(linears, forward) the peak memory its own computation adds (the pipeline's estimate)
        record()        what a resumed run must share with the run it continues (its options)

`LayerMethod` is the short form for methods that score each Linear from its weight and its input
statistics alone (magnitude, Wanda, a user's metric): one `score_layer(weight, stats)`. Such a method,
registered with `register_method`, is also a registry criterion (`ppf.score(model, name, data)`): the
same `score_layer` on every Linear of any model, its input statistics summed over the batches (and
over the ranks of group=) — one definition for both paths. The built-in magnitude and Wanda are
LayerMethods whose registry criteria (which also score convolutions) call the same per-layer code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Communicator
from .engine import Job
from .input_stats import InputStats, StatsCollector
from .registry import CRITERIA, criterion

OBSERVABLE = ("norms", "xtx", "sums")


@dataclass
class Block:
    """One block as a method sees it, on the compute device: its Linears (by name relative to the block),
    their input statistics from the statistics pass, the calibration inputs and dense outputs, and the
    run's target. `fraction` is this block's share pruned (the pattern's, or the block's own under OWL)."""

    index: int
    module: nn.Module
    linears: dict[str, nn.Linear]
    pattern: Any  # llm.sparsity.Pattern
    fraction: float
    granularity: str
    stats: dict[str, InputStats] = field(default_factory=dict)
    inputs: Any = None  # llm.blocks.BlockInputs, None without calibration data
    targets: list[Tensor] | None = None
    comm: Communicator | None = None
    nested: bool = False
    prefix: str = ""

    def qualified(self, name: str) -> str:
        """The full parameter-path of a Linear of this block (`model.layers.3.mlp.up_proj`)."""
        return f"{self.prefix}.{self.index}.{name}" if self.prefix else name

    def observed(self) -> list[str]:
        """The Linears' names, each of which must have input statistics: ValueError naming those the
        block's forward never called."""
        missing = [self.qualified(n) for n in self.linears if n not in self.stats]
        if missing:
            raise ValueError(f"these Linear layers of a decoder block were not called in its forward: {missing}")
        return list(self.linears)


class Method:
    """Base class of the method protocol (module docstring). Subclasses set the class attributes and
    implement `score` (or `prune_` with prunes_in_place = True)."""

    name: str = ""
    needs_data: bool = True
    granularity: str = "layer"
    observes: frozenset[str] = frozenset()
    keeps_targets: bool = False
    prunes_in_place: bool = False
    per_layer: bool = False

    def layers(self, block: Block) -> list[str]:
        """The names of the Linears it scores: every Linear of the block; if it observes inputs, each
        must have been called in the statistics pass (Block.observed)."""
        return block.observed() if self.observes else list(block.linears)

    def score(self, block: Block, names: list[str] | None = None) -> dict[str, Tensor]:
        """{name: float32 score} of the Linears `names` (default: `layers(block)`)."""
        raise NotImplementedError(f"method {self.name!r} prunes in place; it has no score per weight")

    def prune_(self, block: Block) -> None:
        raise NotImplementedError(f"method {self.name!r} scores; the pipeline chooses its masks")

    def check(self, pattern, granularity: str | None) -> None:
        """ValueError for a sparsity pattern or granularity the method cannot run (default: any runs,
        except granularity="global" for a method without a score per weight)."""
        if granularity == "global" and self.prunes_in_place:
            raise ValueError(
                f"granularity='global' needs a score per weight; {self.name} chooses its masks inside its own "
                "solve, per block of columns: use granularity 'row' or 'layer' (or OWL for non-uniform sparsity)"
            )

    def configured(self, **options: Any) -> Method:
        """The method with the pipeline's keyword options (llm.prune's blocksize, percdamp) applied where
        it takes them; the method itself by default."""
        return self

    def workspace_bytes(self, linears: dict[str, nn.Linear], forward_bytes: int) -> int:
        """Peak bytes the method's own computation adds to a block's statistics pass (the pipeline's
        memory estimate); `forward_bytes` is one calibration batch's forward."""
        return 0

    def record(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues (beside the method's name)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class LayerMethod(Method):
    """A method that scores each Linear from its weight and its input statistics alone."""

    per_layer = True

    def score_layer(self, weight: Tensor, stats: InputStats | None) -> Tensor:
        """The float32 score of one weight [out, in] (higher = kept); `stats` are its input statistics
        over every calibration token (None for a method that observes nothing)."""
        raise NotImplementedError

    def score(self, block: Block, names: list[str] | None = None) -> dict[str, Tensor]:
        names = self.layers(block) if names is None else names
        return {n: self.score_layer(block.linears[n].weight, block.stats.get(n)) for n in names}


METHODS: dict[str, Method] = {}


def check_method(method: object) -> Method:
    """A Method instance with a non-empty name and a consistent protocol, else TypeError/ValueError."""
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"method must be a Method instance, got the class {method.__name__}: call it first")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a method name or a criteria.Method instance, got {type(method).__name__}")
    if not isinstance(method.name, str) or not method.name:
        raise ValueError(f"{type(method).__name__}.name must be a non-empty str, got {method.name!r}")
    unknown = set(method.observes) - set(OBSERVABLE)
    if unknown:
        raise ValueError(f"{method.name}: observes must be a subset of {OBSERVABLE}, got {sorted(unknown)}")
    if method.granularity not in ("row", "layer"):
        raise ValueError(f"{method.name}: granularity must be 'row' or 'layer', got {method.granularity!r}")
    if (method.observes or method.keeps_targets) and not method.needs_data:
        raise ValueError(f"{method.name}: a method that observes inputs or targets needs data (needs_data=True)")
    return method


def register_method(method: Method, *, as_criterion: bool = True) -> Method:
    """Registers a method by its name.

    Args:
        method: a Method instance (checked by `check_method`); its name must be new.
        as_criterion: a LayerMethod is also registered as a weight criterion of `ppf.score` and the
            CLI, unless this is False or a criterion of that name exists (the built-in magnitude and
            Wanda have their own, which call the same code).

    Returns:
        The method, now `METHODS[method.name]` (llm.prune(method=name), the CLI's --criterion)."""
    check_method(method)
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    if as_criterion and isinstance(method, LayerMethod) and method.name not in CRITERIA:
        _as_criterion(method)
    return method


def get_method(method: str | Method, **options: Any) -> Method:
    """The method a name stands for, or a Method as given.

    Args:
        method: a registered name or a Method instance.
        options: the pipeline's keyword options (blocksize, percdamp) for a method given by name
            (`Method.configured`).

    Returns:
        A checked Method instance."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        return METHODS[method].configured(**options)
    return check_method(method)


def _linear_weights(job: Job) -> dict[str, nn.Linear]:
    """For every scored parameter, the nn.Linear whose weight it is (by parameter name)."""
    owners = {id(m.weight): m for m in job.model.modules() if isinstance(m, nn.Linear)}
    missing = [n for n, p in job.params.items() if id(p) not in owners]
    if missing:
        raise ValueError(f"a layer method scores the weights of nn.Linear layers; these are not: {missing}")
    return {n: owners[id(p)] for n, p in job.params.items()}


def _as_criterion(method: LayerMethod) -> None:
    """Registers the registry criterion of a LayerMethod: its input statistics collected by the same
    hooks as the block pipeline's, over every batch (and every rank), then score_layer per weight."""
    needs = ("data",) if method.observes else ()

    def run(job: Job) -> list[Tensor]:
        linears = _linear_weights(job)
        stats: dict[str, InputStats] = {}
        if method.observes:
            modules = {n: m for n, m in linears.items()}
            collector = StatsCollector(job.model, modules, method.observes)
            with torch.no_grad(), collector:
                for inputs, _ in job.batches():
                    job.run(inputs)
            _reduce(job, collector, modules)
            stats = collector.stats
            missing = [n for n in linears if n not in stats]
            if missing:
                raise ValueError(f"{method.name}: the layers of {missing} were not called in the forward pass")
        with torch.no_grad():
            return [method.score_layer(p, stats.get(n)) for n, p in job.params.items()]

    run.__name__ = method.name
    run.__doc__ = type(method).__doc__ or type(method).score_layer.__doc__
    criterion(needs=needs)(run)


def _reduce(job: Job, collector: StatsCollector, linears: Iterable[str]) -> None:
    """Sums the statistics over the ranks of group= (each rank ran its own batches); every rank must
    have called the same Linears, in the same order."""
    if job.comm is None:
        job.reduce([])
        return
    seen = torch.tensor([float(n in collector.stats) for n in linears], dtype=torch.float64)
    ranks = job.reduce([seen])[0]
    if bool(((ranks != 0) & (ranks != job.comm.size)).any()):
        raise ValueError("group=: the ranks called different Linear layers in their forward passes")
    collector.reduce(job.comm)
