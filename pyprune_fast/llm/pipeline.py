"""The block-sequential pruning pipeline for Hugging Face causal LMs (one engine for every method).

    capture the inputs of decoder block 0 for the calibration sequences (llm.blocks)
    for each decoder block:
        move it to the compute device
        run it on the calibration batches with hooks on its Linears: ‖X_j‖², XᵀX (llm.stats)
        prune each Linear: magnitude, Wanda, SparseGPT's OBS update, or a block-local criterion
        run the pruned block to produce the next block's inputs   (propagate="pruned", sequential)
            — or pass on the dense outputs of the first run       (propagate="dense")
        move it back
Embeddings, the final norm and lm_head are never pruned.

Peak memory on the compute device (reported as `PruneResult.memory`):

    peak ≈ P_b·s_w + (1 + t)·n·T·H·s_a + Σ_u S_u + b·T·(4H + 3I)·s_a + W
      P_b, s_w    parameters of one decoder block, bytes per weight
      n, T, H     calibration sequences, tokens per sequence, hidden size; s_a bytes per activation
                  (the block inputs, replaced by its outputs in place); t = 1 for block-local
                  criteria, which keep the dense outputs beside them as targets, else 0
      S_u         per distinct Linear input u of width d_u (q/k/v share one): 4·d_u (‖X_j‖²),
                  + 4·d_u² for SparseGPT (XᵀX in float32)
      b, I        calibration batch size, widest Linear output (the MLP) — one batch's forward
      W           SparseGPT: 4·(2·d² + 2·r·d) for the largest Linear [r, d] (H⁻¹ factor, its
                  inversion, the float32 weight and its update); block-local criteria: 4·P_b (the
                  gradients) + the backward of one batch
The rest of the model stays where it is (CPU memory, or its own devices)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import local, sparsegpt
from .blocks import BlockInputs, block_linears, capture_inputs, find_blocks, module_device
from .methods import Method, get_method, magnitude_score, wanda_score
from .owl import OWL, block_sparsities, outlier_ratio
from .sparsity import Pattern, check_fits, check_granularity, keep_mask, parse_sparsity
from .stats import StatsCollector
from .text import calibration_windows

PROPAGATE = ("pruned", "dense")


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
    zeros, by parameter name), the target sparsity of each block (non-uniform with OWL), times, and
    the peak-memory estimate (and the measured peak on a CUDA device)."""

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
    block_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    memory: MemoryEstimate | None = None
    peak_device_bytes: int | None = None

    layer_numel: dict[str, int] = field(default_factory=dict)

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over every pruned weight."""
        total = sum(self.layer_numel.values())
        return sum(s * self.layer_numel[n] for n, s in self.layer_sparsity.items()) / max(total, 1)

    def summary(self) -> str:
        lines = [
            f"{self.method} {self.sparsity}"
            + (f" ({self.granularity})" if self.granularity else "")
            + f": {len(self.layer_sparsity)} Linear layers in {len(self.block_sparsity)} blocks, "
            f"sparsity {self.overall_sparsity:.4f}, {self.seconds:.1f} s on {self.device}",
            f"calibration {self.num_samples} × {self.seq_len} tokens, propagate={self.propagate}"
            if self.num_samples
            else "no calibration data",
            f"peak memory {self.memory}",
        ]
        if self.peak_device_bytes is not None:
            lines.append(f"measured peak {_size(self.peak_device_bytes)}")
        if self.outlier_ratio is not None:
            lines.append("OWL block sparsity " + " ".join(f"{s:.3f}" for s in self.block_sparsity))
        return "\n".join(lines)


def _resolve_device(device: str | torch.device | None, blocks: nn.ModuleList) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else module_device(blocks[0])
    return torch.device(device)


def _check_options(
    method: str, sparsity, granularity, owl, propagate, num_samples, seq_len, batch_size, blocksize, percdamp
) -> tuple[Method, Pattern, str | None]:
    chosen = get_method(method)
    pattern = parse_sparsity(sparsity)
    granularity = None if pattern.is_nm else check_granularity(granularity or chosen.granularity)
    if owl is not None and not isinstance(owl, OWL):
        raise TypeError(f"owl must be an llm.OWL(M=..., lam=...) or None, got {type(owl).__name__}")
    if owl is not None and pattern.is_nm:
        raise ValueError(f"OWL sets a sparsity per block; it does not apply to the {pattern} pattern")
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if chosen.hessian and pattern.is_nm and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={pattern.m} for the {pattern} pattern")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0, got {percdamp!r}")
    return chosen, pattern, granularity


def _capture(model, blocks, windows: Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    return capture_inputs(model, blocks[0], windows.split(batch_size), device)


@contextlib.contextmanager
def _on(block: nn.Module, device: torch.device):
    """The block on the compute device for the duration, then back where it was."""
    home = module_device(block)
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def _owl_sparsities(model, blocks, windows, batch_size, device, owl: OWL, target: float, disable):
    """OWL's dense pre-pass: the outlier ratio of Wanda's metric in every block, then block sparsities."""
    inputs = _capture(model, blocks, windows, batch_size, device)
    ratios, sizes = [], []
    for block in tqdm(blocks, desc="OWL outlier ratios", unit="block", disable=disable):
        linears = block_linears(block)
        with _on(block, device):
            with StatsCollector(block, linears, hessian=False) as stats:
                for j in range(len(inputs)):
                    inputs.hidden[j] = inputs.run(block, j)
            scores = [wanda_score(linears[n].weight, stats[n].norms()) for n in _called(linears, stats)]
            ratios.append(outlier_ratio(scores, owl.M))
            sizes.append(sum(lin.weight.numel() for lin in linears.values()))
    return ratios, block_sparsities(ratios, sizes, target, owl.lam)


def _called(linears: dict[str, nn.Linear], stats: dict) -> list[str]:
    missing = [n for n in linears if n not in stats]
    if missing:
        raise ValueError(f"these Linear layers of a decoder block were not called in its forward: {missing}")
    return list(linears)


def _apply(linear: nn.Linear, keep: Tensor) -> None:
    with torch.no_grad():
        linear.weight.masked_fill_(~keep.to(linear.weight.device), 0)


def _memory(
    block: nn.Module,
    inputs: BlockInputs | None,
    method: Method,
    collector: StatsCollector | None,
    batch_size: int,
) -> MemoryEstimate:
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    linears = list(block_linears(block).values())
    if inputs is None or not len(inputs):
        return MemoryEstimate(params, 0, 0, 0, 0)
    h = inputs.hidden[0]
    tokens, hidden, s_a = h.shape[-2], h.shape[-1], h.element_size()
    widest = max(lin.out_features for lin in linears)
    activations = inputs.nbytes() * (2 if method.local else 1)
    statistics = sum(s.nbytes() for s in collector.shared()) if collector is not None else 0
    forward = batch_size * tokens * (4 * hidden + 3 * widest) * s_a
    workspace = 0
    if method.hessian:
        workspace = max(4 * (2 * lin.in_features**2 + 2 * lin.out_features * lin.in_features) for lin in linears)
    elif method.local:
        workspace = 4 * sum(lin.weight.numel() for lin in linears) + 2 * forward
    return MemoryEstimate(params, activations, statistics, forward, workspace)


@dataclass(frozen=True)
class _Plan:
    """The checked choices of one run."""

    method: Method
    pattern: Pattern
    granularity: str | None
    propagate: str
    batch_size: int
    blocksize: int
    percdamp: float


def _prune_linears(block, linears, plan: _Plan, fraction, inputs, stats, targets) -> None:
    """Prunes every Linear of one block (already on the compute device) in place."""
    method, pattern, gran = plan.method, plan.pattern, plan.granularity or "layer"
    if method.name == "magnitude":
        for n, lin in linears.items():
            _apply(lin, keep_mask(n, magnitude_score(lin.weight), pattern, fraction, gran))
    elif method.name == "wanda":
        for n in _called(linears, stats):
            lin = linears[n]
            _apply(lin, keep_mask(n, wanda_score(lin.weight, stats[n].norms()), pattern, fraction, gran))
    elif method.hessian:
        groups: dict[int, list[str]] = {}
        for n in _called(linears, stats):
            groups.setdefault(id(stats[n]), []).append(n)
        for names in groups.values():  # Linears sharing their input (q/k/v) share H and its factor
            shared = stats[names[0]]
            factor = sparsegpt.inverse_factor(shared.hessian(), plan.percdamp)
            shared.xtx = None
            for n in names:
                sparsegpt.prune_(linears[n].weight, factor, pattern, fraction, gran, plan.blocksize)
            del factor
    else:

        def candidate(name: str, weight: Tensor) -> Tensor:
            return keep_mask(name, magnitude_score(weight), pattern, fraction, gran)

        scores = local.block_scores(method.name, block, inputs, linears, targets, candidate)
        for n, lin in linears.items():
            _apply(lin, keep_mask(n, scores[n], pattern, fraction, gran))


def _run_block(block, plan: _Plan, fraction: float, inputs: BlockInputs | None, last: bool) -> MemoryEstimate:
    """One block on the compute device: the statistics pass over the calibration batches, the pruning,
    then the next block's inputs in place of this block's. The dense outputs of the statistics pass are
    kept as targets for block-local criteria; with propagate="dense" they are the next inputs."""
    linears = block_linears(block)
    collector, stats, targets = None, {}, None
    if inputs is not None:
        collector = None if plan.method.local else StatsCollector(block, linears, hessian=plan.method.hessian)
        targets = [] if plan.method.local else None
        with collector if collector is not None else contextlib.nullcontext():
            for j in range(len(inputs)):
                y = inputs.run(block, j)
                if targets is not None:
                    targets.append(y)
                elif plan.propagate == "dense":
                    inputs.hidden[j] = y
        stats = collector.stats if collector is not None else {}
    estimate = _memory(block, inputs, plan.method, collector, plan.batch_size)
    _prune_linears(block, linears, plan, fraction, inputs, stats, targets)
    if inputs is not None and not last:
        if plan.propagate == "pruned":
            for j in range(len(inputs)):
                inputs.hidden[j] = inputs.run(block, j)
        elif targets is not None:
            inputs.hidden = targets
    return estimate


def prune(
    model: nn.Module,
    calibration: Tensor | None = None,
    *,
    method: str = "wanda",
    sparsity: float | str | tuple[int, int] = 0.5,
    granularity: str | None = None,
    owl: OWL | None = None,
    num_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 1,
    propagate: str = "pruned",
    device: str | torch.device | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: bool | None = None,
) -> PruneResult:
    """Prunes the Linear layers of every decoder block of a Hugging Face causal LM in place, one block
    at a time (module docstring), and returns what was done.

    calibration: token ids, a 1-D stream cut into `num_samples` consecutive windows of `seq_len`
        tokens, or [sequences, tokens] of which the first num_samples × seq_len are used (not needed
        by magnitude without OWL). The defaults, 128 × 2048, are the papers'; the model's
        max_position_embeddings is never used as a length.
    method: "magnitude", "wanda", "sparsegpt", or a block-local criterion "snip", "refer", "afr",
        "feature_l1" (llm.local).
    sparsity: a fraction in [0, 1] (exactly round(s × N) weights of each group pruned) or an N:M
        pattern "2:4" / (2, 4).
    granularity: "row" (each output row its own group) or "layer"; default: the method's paper's
        (Wanda per row, the others per layer); ignored for N:M.
    owl: llm.OWL(M, lam) for outlier-weighted non-uniform block sparsity (unstructured only).
    propagate: "pruned" (the next block sees the pruned block's outputs) or "dense".
    device: where each block is computed (default: CUDA when available, else where the block is).
    blocksize, percdamp: SparseGPT's lazy column block width and Hessian dampening.
    progress: a tqdm bar over the blocks; None shows it only on a terminal.

    Every argument is checked before the model is touched: a model without decoder blocks, a
    calibration set shorter than asked, a sparsity out of range or an unknown method raise ValueError
    with the model unchanged."""
    start = time.perf_counter()
    chosen, pattern, granularity = _check_options(
        method, sparsity, granularity, owl, propagate, num_samples, seq_len, batch_size, blocksize, percdamp
    )
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for n, lin in block_linears(block).items():
            check_fits(f"{prefix}.{i}.{n}", lin.weight, pattern)
    needs_data = chosen.needs_data or owl is not None
    windows = None
    if needs_data:
        if calibration is None:
            raise ValueError(f"method {chosen.name!r}{' with OWL' if owl else ''} needs calibration token ids")
        windows = calibration_windows(calibration, num_samples, seq_len)
    compute = _resolve_device(device, blocks)
    plan = _Plan(chosen, pattern, granularity, propagate, batch_size, blocksize, float(percdamp))
    result = PruneResult(
        chosen.name, str(pattern), granularity, num_samples if needs_data else 0, seq_len if needs_data else 0,
        propagate, str(compute),
    )  # fmt: skip
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    disable = None if progress is None else not progress
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            fractions = [pattern.fraction] * len(blocks)
            if owl is not None:
                result.outlier_ratio, fractions = _owl_sparsities(
                    model, blocks, windows, batch_size, compute, owl, pattern.fraction, disable
                )
            result.block_sparsity = fractions
            inputs = _capture(model, blocks, windows, batch_size, compute) if chosen.needs_data else None
            for i, block in enumerate(tqdm(blocks, desc=f"{chosen.name} {pattern}", unit="block", disable=disable)):
                t0 = time.perf_counter()
                with _on(block, compute):
                    estimate = _run_block(block, plan, fractions[i], inputs, last=i + 1 == len(blocks))
                    if compute.type == "cuda":
                        torch.cuda.synchronize(compute)
                if result.memory is None or estimate.total > result.memory.total:
                    result.memory = estimate
                for n, lin in block_linears(block).items():
                    name = f"{prefix}.{i}.{n}.weight"
                    result.layer_numel[name] = lin.weight.numel()
                    result.layer_sparsity[name] = int((lin.weight == 0).sum()) / lin.weight.numel()
                result.block_seconds.append(time.perf_counter() - t0)
    finally:
        for m, training in modes:
            m.training = training
    if compute.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(compute)
    result.seconds = time.perf_counter() - start
    return result
