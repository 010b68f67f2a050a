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
The rest of the model stays where it is (CPU memory, or its own devices).

With offload="disk" the model is a checkpoint directory, read one block at a time and written, pruned,
to `out` (llm.offload); host memory then holds ≈ P_b·s_w + n·T·H·s_a + Σ_u S_u (+ the embeddings while
the calibration inputs are captured), reported as `PruneResult.memory` with the measured peak RSS.

granularity="global" (whole-model sparsity, unstructured): a first, dense pass writes every block's
scores to disk (one float32 file per block); the exact threshold over all of them comes from
`ops.select_counts` on the memory-mapped files (no concatenation, more than 2³¹ scores allowed); a
second pass prunes each block against it, ties by flat index in block order — the masks of
`masks.global_unstructured` over the whole model's scores, bit for bit.

Over several ranks (group=, torchrun): the calibration sequences are split, each rank holding every
block in turn and running it on its contiguous share; the per-Linear statistics (token counts, ‖X_j‖²,
XᵀX) and the block-local gradient sums are summed over the ranks before pruning, so every rank prunes
from the statistics of all sequences; SparseGPT's solves (one per group of Linears sharing an input)
are spread over the ranks, each broadcasting the weights it solved. Chosen over splitting the blocks
over the ranks with the activations passed on: the method is sequential in the blocks (block i + 1
needs block i pruned), so a block split leaves all ranks but one idle, while a data split keeps every
rank busy in the forward passes (most of Wanda's time) and the solves (most of SparseGPT's), for one
all-reduce of the statistics (d² floats for XᵀX) and one broadcast of the solved weights per block, and
needs no more memory per rank than one block. The result equals one process's up to the order in which
the floating-point partial sums of the statistics are added."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import ops
from ..distributed import Communicator, session
from ..io import atomic_path
from . import local, sparsegpt
from .blocks import BlockInputs, block_linears, capture_inputs, find_blocks, module_device
from .methods import Method, get_method, magnitude_score, wanda_score
from .offload import OFFLOADS, DiskStore, MemoryStore, open_disk_model
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
    zeros, by parameter name), the target sparsity of each block (non-uniform with OWL; measured for
    global sparsity), times, the peak-memory estimate (and the measured peak on a CUDA device, and
    the process's peak RSS), and for offload="disk" the output checkpoint and the blocks a resumed
    run found finished."""

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
    peak_host_bytes: int | None = None
    output: Path | None = None
    resumed_blocks: int = 0

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
        ]
        if self.memory is not None:
            lines.append(f"peak memory {self.memory}")
        if self.peak_device_bytes is not None:
            lines.append(f"measured peak {_size(self.peak_device_bytes)}")
        if self.peak_host_bytes is not None:
            lines.append(f"peak host memory (RSS of this process) {_size(self.peak_host_bytes)}")
        if self.output is not None:
            resumed = f", {self.resumed_blocks} blocks found finished (resumed)" if self.resumed_blocks else ""
            lines.append(f"written to {self.output}{resumed}")
        if self.outlier_ratio is not None or self.granularity == "global":
            lines.append("block sparsity " + " ".join(f"{s:.3f}" for s in self.block_sparsity))
        return "\n".join(lines)


def _resolve_device(device: str | torch.device | None, blocks: nn.ModuleList) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        home = module_device(blocks[0])
        return torch.device("cpu") if home.type == "meta" else home
    return torch.device(device)


def _check_options(
    method: str,
    sparsity,
    granularity,
    owl,
    propagate,
    num_samples,
    seq_len,
    batch_size,
    blocksize,
    percdamp,
    nested=False,
) -> tuple[Method, Pattern, str | None]:
    chosen = get_method(method)
    pattern = parse_sparsity(sparsity)
    granularity = None if pattern.is_nm else check_granularity(granularity or chosen.granularity)
    if owl is not None and not isinstance(owl, OWL):
        raise TypeError(f"owl must be an llm.OWL(M=..., lam=...) or None, got {type(owl).__name__}")
    if owl is not None and pattern.is_nm:
        raise ValueError(f"OWL sets a sparsity per block; it does not apply to the {pattern} pattern")
    if granularity == "global":
        if chosen.hessian:
            raise ValueError(
                "granularity='global' needs a score per weight; sparsegpt chooses its masks inside the OBS "
                "update, per block of columns: use granularity 'row' or 'layer' (or OWL for non-uniform sparsity)"
            )
        if owl is not None:
            raise ValueError("granularity='global' sets the block sparsities itself; it does not combine with OWL")
    if not isinstance(nested, bool):
        raise TypeError(f"nested must be a bool, got {type(nested).__name__}")
    if nested and pattern.is_nm:
        raise ValueError(
            f"nested=True grows an unstructured sparsity; the {pattern} pattern is one fixed count per group"
        )
    if nested and owl is not None:
        raise ValueError("nested=True keeps the earlier run's groups; OWL sets new block sparsities: not together")
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


def _store(model, offload, out, resume) -> tuple[nn.Module, MemoryStore | DiskStore]:
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if offload is None:
        if out is not None or resume:
            raise ValueError("out= and resume= belong to offload='disk' (the model is then a checkpoint directory)")
        return model, MemoryStore()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "with offload='disk', model must be the path of a safetensors checkpoint directory, "
            f"got {type(model).__name__}"
        )
    if out is None:
        raise ValueError("offload='disk' writes the pruned checkpoint to out=: give an output directory")
    if Path(out).resolve() == Path(model).resolve():
        raise ValueError(f"out must differ from the input checkpoint {model}")
    return open_disk_model(model)


def _capture(model, blocks, store, windows: Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    with store.front():
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


def _owl_sparsities(model, blocks, store, windows, batch_size, device, owl: OWL, target: float, disable, comm):
    """OWL's dense pre-pass: the outlier ratio of Wanda's metric in every block, then block sparsities."""
    inputs = _capture(model, blocks, store, windows, batch_size, device)
    ratios, sizes = [], []
    for i, block in enumerate(tqdm(blocks, desc="OWL outlier ratios", unit="block", disable=disable)):
        linears = block_linears(block)
        with store.block(i, block), _on(block, device):
            collector = StatsCollector(block, linears, hessian=False)
            with collector as stats:
                for j in range(len(inputs)):
                    inputs.hidden[j] = inputs.run(block, j)
            if comm is not None:
                collector.reduce(comm)
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
    comm: Communicator | None = None
    nested: bool = False


def _scored(plan: _Plan, linears: dict[str, nn.Linear], stats: dict) -> list[str]:
    """The Linears a magnitude or wanda run scores (wanda: every one must have input statistics)."""
    return list(linears) if plan.method.name == "magnitude" else _called(linears, stats)


def _weight_score(plan: _Plan, name: str, linear: nn.Linear, stats: dict) -> Tensor:
    """The float32 score of one Linear for magnitude (|W|) or wanda (|W|·‖X‖)."""
    if plan.method.name == "magnitude":
        return magnitude_score(linear.weight)
    return wanda_score(linear.weight, stats[name].norms())


def _pruned_first(plan: _Plan, linear: nn.Linear, score: Tensor) -> Tensor:
    """With nested=True, the score with every weight already exactly zero at −inf (pruned first, so
    that a weight pruned by an earlier run stays pruned); else the score as it is."""
    if plan.nested:
        score.masked_fill_(linear.weight.detach() == 0, -torch.inf)
    return score


def _scores(block, linears, plan: _Plan, fraction, inputs, stats, targets) -> dict[str, Tensor]:
    """{Linear name: float32 score} of a score method (magnitude, wanda, block-local criteria)."""
    method = plan.method
    if not method.local:
        return {
            n: _pruned_first(plan, linears[n], _weight_score(plan, n, linears[n], stats))
            for n in _scored(plan, linears, stats)
        }
    candidate_granularity = "layer" if plan.granularity in (None, "global") else plan.granularity

    def candidate(name: str, weight: Tensor) -> Tensor:
        return keep_mask(name, magnitude_score(weight), plan.pattern, fraction, candidate_granularity)

    scores = local.block_scores(method.name, block, inputs, linears, targets, candidate, comm=plan.comm)
    return {n: _pruned_first(plan, linears[n], s) for n, s in scores.items()}


def _prune_linears(block, linears, plan: _Plan, fraction, inputs, stats, targets) -> None:
    """Prunes every Linear of one block (already on the compute device) in place."""
    pattern, gran = plan.pattern, plan.granularity or "layer"
    if plan.method.hessian:
        groups: dict[int, list[str]] = {}
        for n in _called(linears, stats):
            groups.setdefault(id(stats[n]), []).append(n)
        comm = plan.comm
        for g, names in enumerate(groups.values()):  # Linears sharing their input (q/k/v) share H
            if comm is not None and g % comm.size != comm.rank:
                continue  # over ranks: each input group solved by one rank, its weights broadcast below
            shared = stats[names[0]]
            factor = sparsegpt.inverse_factor(shared.hessian(), plan.percdamp)
            shared.xtx = None
            for n in names:
                weight = linears[n].weight
                pruned = (weight == 0) if plan.nested else None
                sparsegpt.prune_(weight, factor, pattern, fraction, gran, plan.blocksize, pruned=pruned)
            del factor
        if comm is not None:
            for g, names in enumerate(groups.values()):
                comm.broadcast_([linears[n].weight for n in names], src=g % comm.size)
        return
    if plan.method.local:
        scores = _scores(block, linears, plan, fraction, inputs, stats, targets)
        for n, lin in linears.items():
            _apply(lin, keep_mask(n, scores[n], pattern, fraction, gran))
        return
    for n in _scored(plan, linears, stats):  # one Linear's float32 scores at a time
        score = _pruned_first(plan, linears[n], _weight_score(plan, n, linears[n], stats))
        _apply(linears[n], keep_mask(n, score, pattern, fraction, gran))
        del score


def _statistics_pass(block, plan: _Plan, inputs: BlockInputs | None, dense_into_inputs: bool):
    """Runs the block on every calibration batch with the statistics hooks its method needs; returns
    (collector, stats, targets). The dense outputs are kept as targets for block-local criteria (which
    still need the inputs); for the other methods they replace the inputs when `dense_into_inputs`."""
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
                elif dense_into_inputs:
                    inputs.hidden[j] = y
        stats = collector.stats if collector is not None else {}
        if collector is not None and plan.comm is not None:
            collector.reduce(plan.comm)
    return collector, stats, targets


def _run_block(block, plan: _Plan, fraction: float, inputs: BlockInputs | None, last: bool) -> MemoryEstimate:
    """One block on the compute device: the statistics pass over the calibration batches, the pruning,
    then the next block's inputs in place of this block's. The dense outputs of the statistics pass are
    kept as targets for block-local criteria; with propagate="dense" they are the next inputs."""
    linears = block_linears(block)
    collector, stats, targets = _statistics_pass(block, plan, inputs, dense_into_inputs=plan.propagate == "dense")
    estimate = _memory(block, inputs, plan.method, collector, plan.batch_size)
    _prune_linears(block, linears, plan, fraction, inputs, stats, targets)
    if inputs is not None and not last:
        if plan.propagate == "pruned":
            for j in range(len(inputs)):
                inputs.hidden[j] = inputs.run(block, j)
        elif targets is not None:
            inputs.hidden = targets
    return estimate


def _record(result: PruneResult, prefix: str, i: int, block: nn.Module) -> None:
    for n, lin in block_linears(block).items():
        name = f"{prefix}.{i}.{n}.weight"
        result.layer_numel[name] = lin.weight.numel()
        result.layer_sparsity[name] = int((lin.weight == 0).sum()) / lin.weight.numel()


def _block_sizes(blocks: nn.ModuleList) -> list[int]:
    return [sum(lin.weight.numel() for lin in block_linears(b).values()) for b in blocks]


def _dense_scores(model, blocks, store, plan: _Plan, windows, compute, todo: list[int], disable):
    """Yields (i, {Linear name: float32 score}, memory estimate) for each block i in `todo` (ascending),
    scored on the dense model's calibration inputs; the blocks before the last one in `todo` that are
    not in it are run only to rebuild the inputs of the next."""
    if not todo:
        return
    inputs = _capture(model, blocks, store, windows, plan.batch_size, compute) if plan.method.needs_data else None
    bar = tqdm(total=todo[-1] + 1, desc=f"{plan.method.name} scores", unit="block", disable=disable)
    wanted = set(todo)
    for i, block in enumerate(blocks[: todo[-1] + 1]):
        with store.block(i, block), _on(block, compute):
            if i not in wanted:
                if inputs is not None:
                    for j in range(len(inputs)):
                        inputs.hidden[j] = inputs.run(block, j)
            else:
                linears = block_linears(block)
                collector, stats, targets = _statistics_pass(block, plan, inputs, dense_into_inputs=True)
                estimate = _memory(block, inputs, plan.method, collector, plan.batch_size)
                scores = _scores(block, linears, plan, plan.pattern.fraction, inputs, stats, targets)
                if targets is not None:
                    inputs.hidden = targets
                yield i, {n: scores[n].detach().float() for n in linears}, estimate
        bar.update()
    bar.close()


def _global_scores(
    model, blocks, store, plan: _Plan, windows, compute, directory: Path, disable, result: PruneResult | None = None
) -> list[Path]:
    """First pass of a global run: every block's scores (`_dense_scores`), one float32 file per block
    (its Linears in order, each row-major). Files already complete (a resumed run) are kept."""
    files = [directory / f"block-{i:05d}.f32" for i in range(len(blocks))]
    sizes = _block_sizes(blocks)
    todo = [i for i, (f, n) in enumerate(zip(files, sizes)) if not (f.is_file() and f.stat().st_size == 4 * n)]
    if plan.comm is not None:  # every rank takes part in every block's reductions: nothing is skipped
        todo = list(range(len(blocks)))
    for i, scores, estimate in _dense_scores(model, blocks, store, plan, windows, compute, todo, disable):
        if result is not None and (result.memory is None or estimate.total > result.memory.total):
            result.memory = estimate
        flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
        with atomic_path(files[i]) as temp:
            flat.numpy().tofile(temp)
    return files


def _mapped(file: Path, numel: int) -> Tensor:
    """A float32 score file as a tensor backed by the file (pages read on demand, never written)."""
    return torch.from_file(str(file), shared=False, size=numel, dtype=torch.float32)


def _prune_global(model, prefix, blocks, store, plan: _Plan, windows, compute, result, disable) -> None:
    """Whole-model sparsity: scores to disk, one exact threshold over all of them, then each block
    pruned against it (the masks of masks.global_unstructured over every block's scores)."""
    keep = store.disk and store.writer
    scratch = None if keep else tempfile.TemporaryDirectory(prefix="pyprune_scores_")
    directory = store.scores_dir() if keep else Path(scratch.name)
    try:
        files = _global_scores(model, blocks, store, plan, windows, compute, directory, disable, result)
        sizes = _block_sizes(blocks)
        labels = [f"the scores of decoder block {i} ({f})" for i, f in enumerate(files)]
        k = round(plan.pattern.fraction * sum(sizes))
        value = need = None
        if k > 0:
            value, counts = ops.select_counts([_mapped(f, n) for f, n in zip(files, sizes)], k, labels)
            need = k - int(counts[0])
        else:
            for f, n, label in zip(files, sizes, labels):
                if bool(torch.isnan(_mapped(f, n)).any()):
                    raise ValueError(f"{label} hold NaN")
        for i, block in enumerate(tqdm(blocks, desc="global masks", unit="block", disable=disable)):
            t0 = time.perf_counter()
            if i < result.resumed_blocks:
                with store.block(i, block, source="output"):
                    _record(result, prefix, i, block)
                continue
            scores = _mapped(files[i], sizes[i])
            if value is None:
                keep = torch.ones(sizes[i], dtype=torch.bool)
            else:
                less, equal = int((scores < value).sum()), int((scores == value).sum())
                take = min(need, equal)
                need -= take
                local_counts = torch.tensor([less, equal], dtype=torch.int64)
                keep = ops.threshold_masks([scores], value, local_counts, less + take)[0]
            with store.block(i, block, write=True):
                offset = 0
                for lin in block_linears(block).values():
                    n = lin.weight.numel()
                    _apply(lin, keep[offset : offset + n].view(lin.weight.shape))
                    offset += n
                _record(result, prefix, i, block)
            result.block_seconds.append(time.perf_counter() - t0)
    finally:
        if scratch is not None:
            scratch.cleanup()
    zeros = [0.0] * len(blocks)
    for name, fraction in result.layer_sparsity.items():
        zeros[int(name[len(prefix) + 1 :].split(".", 1)[0])] += fraction * result.layer_numel[name]
    result.block_sparsity = [z / max(size, 1) for z, size in zip(zeros, sizes)]


def _options(
    chosen, pattern, granularity, owl, num_samples, seq_len, batch_size, propagate, blocksize, percdamp, windows, nested
) -> dict:
    """What a resumed run must share with the run it continues."""
    return {
        "method": chosen.name,
        "sparsity": str(pattern),
        "granularity": granularity,
        "owl": None if owl is None else [owl.M, owl.lam],
        "num_samples": num_samples if windows is not None else 0,
        "seq_len": seq_len if windows is not None else 0,
        "batch_size": batch_size,
        "propagate": propagate,
        "blocksize": blocksize,
        "percdamp": float(percdamp),
        "nested": nested,
        "calibration": None if windows is None else hashlib.sha1(windows.cpu().numpy().tobytes()).hexdigest(),
    }


def prune(
    model: nn.Module | str | os.PathLike,
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
    offload: str | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    group: object = None,
    nested: bool = False,
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
    granularity: "row" (each output row its own group), "layer", or "global" (one group over every
        pruned weight of the model: a dense scoring pass, then one exact threshold; not for
        sparsegpt); default: the method's paper's (Wanda per row, the others per layer); ignored for N:M.
    owl: llm.OWL(M, lam) for outlier-weighted non-uniform block sparsity (unstructured only).
    propagate: "pruned" (the next block sees the pruned block's outputs) or "dense".
    device: where each block is computed (default: CUDA when available, else where the block is).
    blocksize, percdamp: SparseGPT's lazy column block width and Hessian dampening.
    progress: a tqdm bar over the blocks; None shows it only on a terminal.
    offload: None (the model is in memory and pruned in place) or "disk": `model` is then the path of
        a safetensors checkpoint directory, read one block at a time, and the pruned model is written
        to the directory `out` as a checkpoint that from_pretrained loads (llm.offload).
    resume: with offload="disk", continue the run recorded in `out` after its last finished block.
    group: a torch.distributed ProcessGroup to prune over several ranks (module docstring: each rank
        calibrates on its share of the sequences, statistics are summed over the ranks, SparseGPT's
        solves are spread over them); every rank calls prune with the same arguments and ends with
        the same pruned model; with offload="disk", rank 0 writes the output.
    nested: the weights already exactly zero are pruned first (their scores −inf; SparseGPT: its mask
        of each Linear chosen once, before its sweep, instead of per block of columns, so that the OBS
        updates cannot revive them): a model pruned by an earlier run at a lower sparsity with the same
        groups keeps every weight it pruned, and every group still ends with exactly round(s × N)
        (iterative pruning over rounds; unstructured fractions only, not with OWL).

    Every argument is checked before the model is touched: a model without decoder blocks, a
    calibration set shorter than asked, a sparsity out of range or an unknown method raise ValueError
    with the model unchanged."""
    start = time.perf_counter()
    comm = None if group is None else Communicator(group)
    with session(comm):  # distributed: an error on any rank makes every rank raise
        result = _prune(model, calibration, comm, method, sparsity, granularity, owl, num_samples, seq_len,
                        batch_size, propagate, device, blocksize, percdamp, progress, offload, out, resume,
                        nested)  # fmt: skip
    result.seconds = time.perf_counter() - start
    return result


def _share(windows: Tensor, comm: Communicator) -> Tensor:
    """This rank's contiguous share of the calibration windows [n, T] (data-parallel calibration)."""
    n = windows.shape[0]
    if n < comm.size:
        raise ValueError(f"{n} calibration sequences cannot be shared by {comm.size} ranks: give at least one per rank")
    return windows[n * comm.rank // comm.size : n * (comm.rank + 1) // comm.size]


def _prune(model, calibration, comm, method, sparsity, granularity, owl, num_samples, seq_len, batch_size,
           propagate, device, blocksize, percdamp, progress, offload, out, resume, nested) -> PruneResult:  # fmt: skip
    chosen, pattern, granularity = _check_options(
        method, sparsity, granularity, owl, propagate, num_samples, seq_len, batch_size, blocksize, percdamp, nested
    )
    model, store = _store(model, offload, out, resume)
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
    options = _options(chosen, pattern, granularity, owl, num_samples, seq_len, batch_size, propagate,
                       blocksize, percdamp, windows, nested)  # fmt: skip
    if comm is not None:
        ours = {**options, "offload": offload, "out": None if out is None else str(Path(out).resolve())}
        theirs = comm.all_gather_object(ours)
        differ = sorted({k for other in theirs for k in ours if other[k] != ours[k]})
        if differ:
            raise ValueError(f"group=: the ranks called prune with different {', '.join(differ)}")
        if windows is not None:
            windows = _share(windows, comm)
    compute = _resolve_device(device, blocks)
    plan = _Plan(chosen, pattern, granularity, propagate, batch_size, blocksize, float(percdamp), comm, nested)
    result = PruneResult(
        chosen.name, str(pattern), granularity, num_samples if needs_data else 0, seq_len if needs_data else 0,
        propagate, str(compute),
    )  # fmt: skip
    if store.disk:
        if comm is None or comm.rank == 0:
            result.resumed_blocks = store.open_output(out, options, resume)
        else:
            store.attach(out)
        if comm is not None:  # rank 0 prepared the output; every rank starts after the same block
            store.alone = False
            result.resumed_blocks = comm.all_gather_ints([result.resumed_blocks])[0][0]
        result.output = store.out
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    disable = None if progress is None else not progress
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if granularity == "global":
                _prune_global(model, prefix, blocks, store, plan, windows, compute, result, disable)
            else:
                _prune_sequential(model, prefix, blocks, store, plan, windows, compute, owl, result, disable)
        if store.disk and store.writer:
            store.finish()
    finally:
        for m, training in modes:
            m.training = training
    if compute.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(compute)
    result.peak_host_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _prune_sequential(model, prefix, blocks, store, plan: _Plan, windows, compute, owl, result, disable) -> None:
    """The block-sequential run (module docstring); blocks a resumed run found finished are only rerun
    to rebuild the next block's inputs (from the output when pruned outputs propagate)."""
    done = result.resumed_blocks
    fractions = [plan.pattern.fraction] * len(blocks)
    if owl is not None:
        ratios, fractions = store.remember(
            "owl",
            lambda: _owl_sparsities(
                model, blocks, store, windows, plan.batch_size, compute, owl, plan.pattern.fraction, disable, plan.comm
            ),  # fmt: skip
        )
        result.outlier_ratio = list(ratios)
    result.block_sparsity = list(fractions)
    todo = plan.method.needs_data and done < len(blocks)
    inputs = _capture(model, blocks, store, windows, plan.batch_size, compute) if todo else None
    name = f"{plan.method.name} {plan.pattern}"
    for i, block in enumerate(tqdm(blocks, desc=name, unit="block", disable=disable)):
        t0 = time.perf_counter()
        if i < done:
            replay = inputs is not None
            source = "output" if plan.propagate == "pruned" or not replay else "input"
            with store.block(i, block, source=source), _on(block, compute):
                if replay:
                    for j in range(len(inputs)):
                        inputs.hidden[j] = inputs.run(block, j)
                if source == "output":
                    _record(result, prefix, i, block)
            if source != "output":
                with store.block(i, block, source="output"):
                    _record(result, prefix, i, block)
            continue
        with store.block(i, block, write=True):
            with _on(block, compute):
                estimate = _run_block(block, plan, fractions[i], inputs, last=i + 1 == len(blocks))
                if compute.type == "cuda":
                    torch.cuda.synchronize(compute)
            if result.memory is None or estimate.total > result.memory.total:
                result.memory = estimate
            _record(result, prefix, i, block)
        result.block_seconds.append(time.perf_counter() - t0)


def scores(
    model: nn.Module,
    calibration: Tensor | None = None,
    *,
    method: str = "wanda",
    num_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """{parameter name: float32 score} of every decoder-block Linear weight of a causal LM (higher =
    more important), each block scored on the dense model's calibration inputs, block by block as
    `prune` does; the model is not changed. For score methods (magnitude, wanda, snip, refer, afr,
    feature_l1; the block-local snip's candidate masks at 50 % per layer): feed them to
    `pyprune_fast.masks` or another tool. prune(granularity="global") prunes by
    masks.global_unstructured over exactly these scores."""
    chosen, pattern, _ = _check_options(method, 0.5, "layer", None, "dense", num_samples, seq_len, batch_size, 128, 0.0)
    if chosen.hessian:
        raise ValueError("sparsegpt has no score per weight (it chooses its masks inside the OBS update)")
    prefix, blocks = find_blocks(model)
    windows = None
    if chosen.needs_data:
        if calibration is None:
            raise ValueError(f"method {chosen.name!r} needs calibration token ids")
        windows = calibration_windows(calibration, num_samples, seq_len)
    compute = _resolve_device(device, blocks)
    plan = _Plan(chosen, pattern, "global", "dense", batch_size, 128, 0.0)
    out: dict[str, Tensor] = {}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            todo = list(range(len(blocks)))
            disable = None if progress is None else not progress
            passes = _dense_scores(model, blocks, MemoryStore(), plan, windows, compute, todo, disable)
            for i, block_scores, _ in passes:
                out.update({f"{prefix}.{i}.{n}.weight": s.cpu() for n, s in block_scores.items()})
    finally:
        for m, training in modes:
            m.training = training
    return out
