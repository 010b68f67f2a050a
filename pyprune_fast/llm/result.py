"""What a block-pipeline run reports: `PruneResult` (targets, measured sparsity per Linear and per
block, times, memory) and `MemoryEstimate` (the peak-memory formula of llm.pipeline, term by term)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MemoryEstimate:
    """Peak compute-device memory of a run, in bytes, by term of the formula in llm.pipeline."""

    block: int
    activations: int
    statistics: int
    forward: int
    workspace: int

    @property
    def total(self) -> int:
        return self.block + self.activations + self.statistics + self.forward + self.workspace

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {_size(getattr(self, k))}" for k in self.__dataclass_fields__)
        return f"≈ {_size(self.total)} ({parts})"


def _size(nbytes: float) -> str:
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while nbytes >= 1024 and i < len(units) - 1:
        nbytes, i = nbytes / 1024, i + 1
    return f"{nbytes:.0f} B" if i == 0 else f"{nbytes:.2f} {units[i]}"


@dataclass
class PruneResult:
    """What a `prune` run did: targets, the measured sparsity of every pruned Linear weight (fraction of
    zeros, by parameter name), every weight matrix of the blocks it left dense (`left_dense`: numel by
    parameter name; the sparsity figures do not count them), the target sparsity of each block
    (non-uniform with OWL; measured for global sparsity), the relative output error of each pruned block
    (`block_error`), times, the peak-memory estimate (and the
    measured peak on a CUDA device, and the process's peak RSS), and for offload="disk" the output
    checkpoint and the blocks a resumed run found finished."""

    method: str
    sparsity: str
    granularity: str | None
    num_samples: int
    seq_len: int
    propagate: str
    device: str
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    block_sparsity: list[float] = field(default_factory=list)
    outlier_ratio: list[float] | None = None
    # ‖f_pruned(X) − f_dense(X)‖_F / ‖f_dense(X)‖_F of each block pruned by the sequential pass, on its
    # calibration inputs X (llm.pipeline.Run.run_block); the blocks a resumed run found finished are
    # not listed (entries start at block `resumed_blocks`); empty without calibration data (magnitude),
    # with propagate="dense" and for granularity="global"
    block_error: list[float] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    memory: MemoryEstimate | None = None
    peak_device_bytes: int | None = None
    peak_host_bytes: int | None = None
    output: Path | None = None
    resumed_blocks: int = 0

    layer_numel: dict[str, int] = field(default_factory=dict)
    left_dense: dict[str, int] = field(default_factory=dict)
    # each refinement's gains (llm.refine.Gain: its metric before and after, seconds), by name: one per
    # block refined, in block order (one in all for a refinement of stage "model")
    refinements: dict[str, list] = field(default_factory=dict)
    # mixture-of-experts: every routed expert that got fewer than min_expert_tokens calibration tokens
    # (`model.layers.3.mlp.experts.5`: its routed tokens), handled as the rare_experts option says
    rare_experts: dict[str, int] = field(default_factory=dict)

    @property
    def left_dense_fraction(self) -> float:
        """The share of the blocks' weight matrices (parameters of 2 or more dimensions) that the run left
        dense because they are not nn.Linear weights: mixture-of-experts experts stored as 3-D tensors,
        routers, packed parameters of custom modules."""
        pruned, dense = sum(self.layer_numel.values()), sum(self.left_dense.values())
        return dense / max(pruned + dense, 1)

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over every pruned weight (those in `layer_sparsity`; `left_dense` not counted)."""
        total = sum(self.layer_numel.values())
        return sum(s * self.layer_numel[n] for n, s in self.layer_sparsity.items()) / max(total, 1)

    def summary(self) -> str:
        lines = [
            f"{self.method} {self.sparsity}"
            + (f" ({self.granularity})" if self.granularity else "")
            + f": {len(self.layer_sparsity)} Linear layers in {len(self.block_sparsity)} blocks, "
            f"sparsity {self.overall_sparsity:.4f}, {self.seconds:.1f} s on {self.device}",
            (
                f"calibration {self.num_samples} × {self.seq_len} tokens, propagate={self.propagate}"
                if self.seq_len
                else f"calibration {self.num_samples} batches, propagate={self.propagate}"
            )
            if self.num_samples
            else "no calibration data",
        ]
        if self.left_dense:
            names = list(self.left_dense)
            shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
            lines.append(
                f"left dense (not nn.Linear weights): {len(names)} block parameters, "
                f"{100 * self.left_dense_fraction:.1f} % of the blocks' weights: {shown}"
            )
        if self.rare_experts:
            lines.append(
                f"{len(self.rare_experts)} experts got too few calibration tokens (rare): "
                + ", ".join(f"{n} ({c})" for n, c in list(self.rare_experts.items())[:4])
                + (" ..." if len(self.rare_experts) > 4 else "")
            )
        if self.memory is not None:
            lines.append(f"peak memory {self.memory}")
        if self.peak_device_bytes is not None:
            lines.append(f"measured peak {_size(self.peak_device_bytes)}")
        if self.peak_host_bytes is not None:
            lines.append(f"peak host memory (RSS of this process) {_size(self.peak_host_bytes)}")
        if self.output is not None:
            resumed = f", {self.resumed_blocks} blocks found finished (resumed)" if self.resumed_blocks else ""
            lines.append(f"written to {self.output}{resumed}")
        lines.extend(f"refine {n}: {gain}" for n, gain in self.refinement_gains().items())
        if self.outlier_ratio is not None or self.granularity == "global":
            lines.append("block sparsity " + " ".join(f"{s:.3f}" for s in self.block_sparsity))
        return "\n".join(lines)

    def refinement_gains(self) -> dict[str, str]:
        """Each refinement's metric before → after (means over the blocks) and its time, by name."""
        gains = {}
        for name, applied in self.refinements.items():
            before = sum(g.before for g in applied) / len(applied)
            after = sum(g.after for g in applied) / len(applied)
            where = f"mean of {len(applied)} blocks" if len(applied) > 1 else "once"
            seconds = sum(g.seconds for g in applied)
            gains[name] = f"{applied[0].metric} {before:.4g} → {after:.4g} ({where}), {seconds:.1f} s"
        return gains
