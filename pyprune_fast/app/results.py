"""What a prune run measured (`Run`), one result per criterion (or method) and target (`Result`):
what the report and the plots are written from."""

from __future__ import annotations

from dataclasses import dataclass, field

TWO_FOUR = "2:4"  # the label of the 2:4 pattern (a granularity of weights, a target of causal LMs)


@dataclass
class Result:
    """One criterion at one sparsity: what was pruned and what the pruned model keeps."""

    criterion: str
    sparsity: float
    achieved: float
    metrics: dict[str, float]
    layers: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)
    parameters: int | None = None  # of the pruned model, when channels were removed physically
    finetuned: dict[str, float] | None = None  # the metrics after --finetune (masks kept)
    finetune_losses: list[float] | None = None  # the training loss of each fine-tuning step
    rounds: list[dict] | None = None  # --schedule iterative: each round's target and achieved sparsity
    peak_bytes: int | None = None  # causal LMs: the peak memory measured while pruning (Run.peak_measure)
    block_error: list[float] | None = None  # causal LMs: llm.PruneResult.block_error, one per decoder block
    structure: dict | None = None  # --structure: parameters, kept widths, removed blocks, speed (app.structured)


@dataclass
class Run:
    """Everything a prune run measured."""

    model: str
    info: dict
    granularity: str
    batches: int
    device: str
    parameters: int
    scored: dict[str, tuple[int, ...]]
    skipped: dict[str, str]
    dense: dict[str, float]
    results: list[Result] = field(default_factory=list)
    score_seconds: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    lower_better: tuple[str, ...] = ()  # metrics where lower is better (perplexity); the others: higher
    schedule: str = "one-shot"
    finetune: dict = field(default_factory=dict)  # {"steps", "lr", "data"} when --finetune ran
    llm: bool = False  # a causal LM pruned block by block: the LLM report (perplexity, block errors)
    targets: list = field(default_factory=list)  # causal LMs: the targets asked (fractions and "2:4")
    peak_measure: str = ""  # causal LMs: what Result.peak_bytes measures
    estimate_bytes: int = 0  # causal LMs: the largest per-block peak-memory estimate (info's formula)
    structured: dict = field(default_factory=dict)  # --structure: the structure and the dense widths per block

    @property
    def criteria(self) -> list[str]:
        return list(dict.fromkeys(r.criterion for r in self.results))

    @property
    def sparsities(self) -> list[float]:
        return sorted({r.sparsity for r in self.results})

    @property
    def primary(self) -> str | None:
        """The metric criteria are ranked by: the evaluation's first."""
        return next(iter(self.dense), None)

    @property
    def finetuned(self) -> bool:
        """Whether the results hold metrics after fine-tuning (--finetune)."""
        return any(r.finetuned is not None for r in self.results)

    def ranking(self, finetuned: bool = False) -> list[tuple[str, float]]:
        """(criterion, mean of the primary metric over the sparsities), best first; ties broken by the
        means of the other metrics in order, then by name. `finetuned`: of the metrics after
        fine-tuning."""
        if self.primary is None or (finetuned and not self.finetuned):
            return []
        means = {}
        for name in self.criteria:
            rows = [r.finetuned if finetuned else r.metrics for r in self.results if r.criterion == name]
            means[name] = [sum(m[k] for m in rows) / len(rows) for k in self.dense]
        signs = [1.0 if k in self.lower_better else -1.0 for k in self.dense]
        order = sorted(means, key=lambda n: ([s * v for s, v in zip(signs, means[n])], n))
        return [(n, means[n][0]) for n in order]
