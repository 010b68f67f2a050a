"""The block-sequential pruning pipeline for Hugging Face causal LMs (one engine for every method).

    capture the inputs of decoder block 0 for the calibration sequences (llm.blocks)
    for each decoder block:
        move it to the compute device
        run it on the calibration batches with hooks on its Linears: what the method observes of
            their inputs (‖X_j‖², XᵀX: criteria.input_stats), and the dense outputs if it keeps them
        the method scores the block (the pipeline chooses the masks) or prunes it in place
            (the method protocol, criteria.method: the pipeline knows no method by name)
        refinements around the masking, if asked: before it on the dense block, after it on the masked
            block (llm.refine: channel permutations, swaps, reconstruction)
        run the pruned block to produce the next block's inputs   (propagate="pruned", sequential)
            — or pass on the dense outputs of the first run       (propagate="dense")
        move it back
Embeddings, the final norm and lm_head are never pruned.

Peak memory on the compute device (reported as `PruneResult.memory`):

    peak ≈ P_b·s_w + (1 + t)·n·T·H·s_a + Σ_u S_u + b·T·(4H + 3I)·s_a + W
      P_b, s_w    parameters of one decoder block, bytes per weight
      n, T, H     calibration sequences, tokens per sequence, hidden size; s_a bytes per activation
                  (the block inputs, replaced by its outputs in place); t = 1 for block-local
                  criteria, which keep the dense outputs beside them as targets, else 0; t grows by 2
                  for a refinement that keeps the dense model's block inputs (this block's and the next's)
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
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import ops
from ..criteria.input_stats import StatsCollector
from ..criteria.method import Block, Method, get_method
from ..criteria.wanda import wanda_score
from ..distributed import Communicator, session
from ..io import atomic_path
from ..modeling import eval_mode, unpacked_attention
from .blocks import BlockInputs, block_linears, capture_inputs, find_blocks, module_device, on_device
from .methods import DEFAULT_METHOD, METHODS
from .moe import Routing, aside_scores, check_experts, check_rare, covered, expert_of, set_aside
from .offload import OFFLOADS, SCORES_DIR, DiskStore, MemoryStore, open_disk_model
from .owl import OWL, block_sparsities
from .refine import BlockStep, Gain, ModelStep, Refinement, get_refinements
from .result import MemoryEstimate, PruneResult
from .sparsity import Pattern, check_fits, check_granularity, keep_mask, parse_sparsity
from .text import calibration_windows

PROPAGATE = ("pruned", "dense")

__all__ = ["METHODS", "PROPAGATE", "MemoryEstimate", "Options", "PruneResult", "Run", "prune", "scores"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Options:
    """The keyword options of `prune` as the caller gave them (see its docstring); `checked()` validates
    them all, before anything is touched, and resolves the method, the pattern and the granularity."""

    method: str | Method = DEFAULT_METHOD
    sparsity: float | str | tuple[int, int] = 0.5
    granularity: str | None = None
    owl: OWL | None = None
    num_samples: int = 128
    seq_len: int = 2048
    batch_size: int = 1
    propagate: str = "pruned"
    device: str | torch.device | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    progress: bool | None = None
    offload: str | None = None
    out: str | os.PathLike | None = None
    resume: bool = False
    nested: bool = False
    forward: Callable[[nn.Module, Any], Any] | None = None
    keep_scores: bool = False
    block_errors: bool = False
    refine: str | Refinement | tuple | list | None = None
    rare_experts: str = "dense"
    min_expert_tokens: int = 16

    def checked(self) -> Plan:
        """The run's plan; ValueError/TypeError naming the first option that is wrong."""
        _positive_int("blocksize", self.blocksize)
        percdamp = self.percdamp
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
            raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
        method = get_method(self.method, blocksize=self.blocksize, percdamp=float(percdamp))
        pattern = parse_sparsity(self.sparsity)
        granularity = None if pattern.is_nm else check_granularity(self.granularity or method.granularity)
        owl = self.owl
        if owl is not None and not isinstance(owl, OWL):
            raise TypeError(f"owl must be an llm.OWL(M=..., lam=...) or None, got {type(owl).__name__}")
        if owl is not None and pattern.is_nm:
            raise ValueError(f"OWL sets a sparsity per block; it does not apply to the {pattern} pattern")
        method.check(pattern, granularity)
        if granularity == "global" and owl is not None:
            raise ValueError("granularity='global' sets the block sparsities itself; it does not combine with OWL")
        if not isinstance(self.nested, bool):
            raise TypeError(f"nested must be a bool, got {type(self.nested).__name__}")
        if not isinstance(self.block_errors, bool):
            raise TypeError(f"block_errors must be a bool, got {type(self.block_errors).__name__}")
        if not isinstance(self.keep_scores, bool):
            raise TypeError(f"keep_scores must be a bool, got {type(self.keep_scores).__name__}")
        if self.keep_scores and (granularity != "global" or self.offload is None):
            raise ValueError("keep_scores=True keeps the score files of a granularity='global', offload='disk' run")
        if self.nested and pattern.is_nm:
            raise ValueError(
                f"nested=True grows an unstructured sparsity; the {pattern} pattern is one fixed count per group"
            )
        if self.nested and owl is not None:
            raise ValueError("nested=True keeps the earlier run's groups; OWL sets new block sparsities: not together")
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate must be one of {PROPAGATE}, got {self.propagate!r}")
        for name in ("num_samples", "seq_len", "batch_size"):
            _positive_int(name, getattr(self, name))
        if self.forward is not None and not callable(self.forward):
            raise TypeError(f"forward must be callable (model, inputs) -> outputs, got {type(self.forward).__name__}")
        check_rare(self.rare_experts, self.min_expert_tokens)
        refinements = get_refinements(self.refine, blocksize=self.blocksize, percdamp=float(percdamp))
        if refinements and granularity == "global":
            raise ValueError(
                "refine applies to the block-sequential run; granularity='global' chooses its masks from one "
                "threshold over the whole model"
            )
        plan = Plan(method, pattern, granularity, self, refinements)
        for refinement in refinements:
            refinement.check(plan)
        return plan


@dataclass(frozen=True)
class Plan:
    """The checked choices of one run: the method object, the pattern, the granularity (None for N:M)
    and the options they came from."""

    method: Method
    pattern: Pattern
    granularity: str | None
    options: Options
    refinements: tuple[Refinement, ...] = ()

    @property
    def needs_data(self) -> bool:
        return self.method.needs_data or self.options.owl is not None or any(r.needs_data for r in self.refinements)

    def stage(self, name: str) -> list[Refinement]:
        """The run's refinements of one stage (llm.refine), in the order they apply."""
        return [r for r in self.refinements if r.stage == name]

    @property
    def keeps_targets(self) -> bool:
        """Whether the statistics pass keeps the dense block outputs (the method's or a refinement's need)."""
        return self.method.keeps_targets or any(r.keeps_targets for r in self.refinements)

    @property
    def keeps_dense_inputs(self) -> bool:
        """Whether a refinement reads the dense model's inputs of each block, which differ from the pruned
        model's (the calibration inputs) when pruned outputs propagate."""
        return self.options.propagate == "pruned" and any(r.keeps_dense_inputs for r in self.refinements)

    def record(self, windows: Tensor | list | None) -> dict:
        """What a resumed run must share with the run it continues (and every rank with the others)."""
        o = self.options
        if isinstance(windows, list):
            digest = hashlib.sha1()
            for t in _tensors(windows):
                digest.update(str((t.dtype, tuple(t.shape))).encode())
                digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            calibration = digest.hexdigest()
        else:
            calibration = None if windows is None else hashlib.sha1(windows.cpu().numpy().tobytes()).hexdigest()
        return {
            "method": self.method.name,
            "sparsity": str(self.pattern),
            "granularity": self.granularity,
            "owl": None if o.owl is None else [o.owl.M, o.owl.lam],
            "num_samples": o.num_samples if windows is not None else 0,
            "seq_len": o.seq_len if windows is not None else 0,
            "batch_size": o.batch_size,
            "propagate": o.propagate,
            "blocksize": o.blocksize,
            "percdamp": float(o.percdamp),
            "nested": o.nested,
            "calibration": calibration,
            "rare_experts": [o.rare_experts, o.min_expert_tokens],
            **self.method.record(),
            **({"refine": [[r.name, r.record()] for r in self.refinements]} if self.refinements else {}),
        }


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside a batch structure (tensors, dicts, lists, tuples), in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _calibration(calibration: Any, options: Options) -> Tensor | list:
    """The calibration windows [n, T] of token ids, or the list of batches a `forward` is called on."""
    if options.forward is None:
        return calibration_windows(calibration, options.num_samples, options.seq_len)
    if isinstance(calibration, Tensor) or not isinstance(calibration, (list, tuple)):
        raise TypeError(
            "with forward=, calibration must be a list of batches (each passed to forward(model, inputs)), "
            f"got {type(calibration).__name__}"
        )
    if not calibration:
        raise ValueError("calibration holds no batches")
    if options.offload is not None:
        raise ValueError("offload='disk' reads a causal LM checkpoint: its calibration is token ids, not forward=")
    return list(calibration)


def _store(model, options: Options) -> tuple[nn.Module, MemoryStore | DiskStore]:
    offload, out, resume = options.offload, options.out, options.resume
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


def _architecture(prefix: str, blocks: nn.ModuleList) -> str:
    """A fingerprint of the blocks' structure: their container's name, count, and every parameter's
    name, shape and dtype (ranks of group= must hold the same model)."""
    digest = hashlib.sha1(f"{prefix} {len(blocks)}".encode())
    for i, block in enumerate(blocks):
        for n, p in block.named_parameters():
            digest.update(f"{i}.{n} {tuple(p.shape)} {p.dtype}".encode())
    return digest.hexdigest()


def _resolve_device(device: str | torch.device | None, blocks: nn.ModuleList) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        home = module_device(blocks[0])
        return torch.device("cpu") if home.type == "meta" else home
    return torch.device(device)


def _share(windows: Tensor | list, comm: Communicator) -> Tensor | list:
    """This rank's contiguous share of the calibration windows [n, T] or batches (data-parallel
    calibration)."""
    n = len(windows)
    if n < comm.size:
        raise ValueError(f"{n} calibration sequences cannot be shared by {comm.size} ranks: give at least one per rank")
    return windows[n * comm.rank // comm.size : n * (comm.rank + 1) // comm.size]


def _apply(linear: nn.Linear, keep: Tensor) -> None:
    with torch.no_grad():
        linear.weight.masked_fill_(~keep.to(linear.weight.device), 0)


class _Undo:
    """The original parameters (Linear weights and biases, norms) of every block an in-memory run has
    started to prune, on disk (one safetensors file per block in a temporary directory, written before
    the block changes), so that a run that fails — a NaN score, a Linear never called, a singular
    Hessian, a refinement's error, Ctrl-C — gives the model back as it was instead of half pruned. Costs
    one write of the blocks' parameters to the temporary directory (TMPDIR); removed when the run ends."""

    def __init__(self) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="pyprune_undo_")
        self.saved: list[int] = []

    def save(self, i: int, block: nn.Module) -> None:
        weights = {n: p.detach().cpu().clone() for n, p in block.named_parameters()}
        save_file(weights, str(Path(self.directory.name) / f"block-{i:05d}.safetensors"))
        self.saved.append(i)

    def restore(self, blocks: nn.ModuleList) -> None:
        with torch.no_grad():
            for i in self.saved:
                weights = load_file(str(Path(self.directory.name) / f"block-{i:05d}.safetensors"))
                for n, p in blocks[i].named_parameters():
                    p.copy_(weights[n].to(p.device))

    def close(self) -> None:
        self.directory.cleanup()


def _mapped(file: Path, numel: int) -> Tensor:
    """A float32 score file as a tensor backed by the file (pages read on demand, never written)."""
    return torch.from_file(str(file), shared=False, size=numel, dtype=torch.float32)


class Run:
    """One run of the block pipeline, built and validated once (`start`): the model and its blocks, the
    store the blocks are read from (memory or disk), the plan, the calibration windows of this rank, the
    compute device, the communicator, the result and the progress bars. `prune` runs it; the
    sequential, global and OWL passes are its methods."""

    def __init__(self, model: nn.Module, blocks: tuple[str, nn.ModuleList], store, plan: Plan) -> None:
        self.model, self.store, self.plan = model, store, plan
        self.prefix, self.blocks = blocks
        self.windows: Tensor | None = None
        self.comm: Communicator | None = None
        self.compute = torch.device("cpu")
        self.result: PruneResult | None = None
        self.disable = None if plan.options.progress is None else not plan.options.progress
        self.undo: _Undo | None = None
        self.model_undo: list[Callable[[], None]] = []  # stage "model" refinements' reverts (llm.refine)
        self.rare: dict[str, int] = {}  # the experts of the current block below min_expert_tokens (llm.moe)
        self.dense_stream: list[Tensor] | None = None  # the dense model's inputs of the current block, if kept

    @classmethod
    def start(cls, model, calibration: Tensor | None, options: Options, comm: Communicator | None) -> Run:
        """Checks every option and argument (nothing is touched before), opens the store, takes this
        rank's share of the calibration windows and prepares the output of a disk run."""
        plan = options.checked()
        model, store = _store(model, options)
        prefix, blocks = find_blocks(model)
        for i, block in enumerate(blocks):
            for n, lin in block_linears(block).items():
                check_fits(f"{prefix}.{i}.{n}", lin.weight, plan.pattern)
            check_experts(plan.method, f"{prefix}.{i}", block)
        run = cls(model, (prefix, blocks), store, plan)
        if plan.needs_data:
            if calibration is None:
                with_owl = " with OWL" if options.owl else ""
                with_owl += f" with refine {[r.name for r in plan.refinements]}" if plan.refinements else ""
                raise ValueError(f"method {plan.method.name!r}{with_owl} needs calibration token ids")
            run.windows = _calibration(calibration, options)
        record = plan.record(run.windows)
        if comm is not None:
            out = None if options.out is None else str(Path(options.out).resolve())
            ours = {**record, "offload": options.offload, "out": out, "model": _architecture(prefix, blocks)}
            theirs = comm.all_gather_object(ours)
            differ = sorted({k for other in theirs for k in ours if other[k] != ours[k]})
            if "model" in differ:
                raise ValueError(
                    "group=: the ranks hold different models (their blocks' count, parameter names, shapes or dtypes "
                    "differ): every rank must load the same model"
                )
            if differ:
                raise ValueError(f"group=: the ranks called prune with different {', '.join(differ)}")
            if run.windows is not None:
                run.windows = _share(run.windows, comm)
        run.comm = comm
        run.compute = _resolve_device(options.device, blocks)
        data, batches = plan.needs_data, isinstance(run.windows, list)
        run.result = PruneResult(
            plan.method.name,
            str(plan.pattern),
            plan.granularity,
            (len(run.windows) if batches else options.num_samples) if data else 0,
            options.seq_len if data and not batches else 0,
            options.propagate,
            str(run.compute),
        )
        if store.disk:
            run._open_output(record)
        return run

    def _open_output(self, record: dict) -> None:
        store, comm, result, out = self.store, self.comm, self.result, self.plan.options.out
        if comm is None or comm.rank == 0:
            result.resumed_blocks = store.open_output(out, record, self.plan.options.resume)
        else:
            store.attach(out)
        if comm is not None:  # rank 0 prepared the output; every rank starts after the same block
            store.alone = False
            result.resumed_blocks = comm.all_gather_ints([result.resumed_blocks])[0][0]
        result.output = store.out

    def prune(self) -> PruneResult:
        """Runs the plan: the sequential run (with OWL's pre-pass) or the global one; then the peaks."""
        if self.compute.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.compute)
        self.undo = None if self.store.disk else _Undo()  # a disk run never changes its input
        try:
            with eval_mode(self.model), torch.no_grad():
                if self.plan.granularity == "global":
                    self.whole_model()
                else:
                    self.sequential()
        except BaseException:
            if self.undo is not None:
                self.undo.restore(self.blocks)
            with torch.no_grad():
                for revert in reversed(self.model_undo):
                    revert()
            raise
        finally:
            if self.undo is not None:
                self.undo.close()
        if self.store.disk and self.store.writer:
            self.store.finish()
            if self.plan.granularity == "global" and not self.plan.options.keep_scores:
                shutil.rmtree(self.store.out / SCORES_DIR, ignore_errors=True)  # 4 bytes a weight, done with
        if self.compute.type == "cuda":
            self.result.peak_device_bytes = torch.cuda.max_memory_allocated(self.compute)
        self.result.peak_host_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.result

    # ---- the parts every pass shares

    def capture(self) -> BlockInputs:
        """The inputs of block 0 for this rank's calibration windows (or batches), on the compute device."""
        forward = self.plan.options.forward
        with self.store.front():
            if forward is not None:
                return capture_inputs(self.model, self.blocks[0], self.windows, self.compute, forward=forward)
            batches = self.windows.split(self.plan.options.batch_size)
            return capture_inputs(self.model, self.blocks[0], batches, self.compute)

    def view(self, i: int, fraction: float, inputs: BlockInputs | None) -> Block:
        """Block i as the method sees it (criteria.method.Block), before its statistics pass."""
        block = self.blocks[i]
        plan = self.plan
        return Block(
            i,
            block,
            block_linears(block),
            plan.pattern,
            fraction,
            plan.granularity,
            inputs=inputs,
            comm=self.comm,
            nested=plan.options.nested,
            prefix=self.prefix,
        )

    def statistics_pass(
        self, block: Block, dense_into_inputs: bool, dense_outputs: list[Tensor] | None = None
    ) -> StatsCollector | None:
        """Runs the block on every calibration batch with the hooks its method needs: the input
        statistics it observes (summed over the ranks) and its dense outputs as targets if it keeps them
        (the inputs then stay); otherwise the dense outputs replace the inputs when `dense_into_inputs`.
        `dense_outputs`: a list the dense outputs are also appended to, on the CPU."""
        method, inputs = self.plan.method, block.inputs
        if inputs is None:
            return None
        collector = None
        observes = method.observes.union(*(r.observes for r in self.plan.refinements if r.stage != "model"))
        if observes:
            collector = StatsCollector(block.module, block.linears, observes)
            collector.__enter__()
        options = self.plan.options
        routing = Routing(block.module, block.linears, options.rare_experts, options.min_expert_tokens).__enter__()
        try:
            block.targets = [] if self.plan.keeps_targets else None
            for j in range(len(inputs)):
                y = inputs.run(block.module, j)
                if dense_outputs is not None:
                    dense_outputs.append(y.cpu())
                if block.targets is not None:
                    block.targets.append(y)
                elif dense_into_inputs:
                    inputs.hidden[j] = y
            routing.force()  # rare_experts="route": forced tokens, seen by the statistics hooks
        finally:
            routing.__exit__(None, None, None)
            if collector is not None:
                collector.__exit__(None, None, None)
        if collector is not None:
            if self.comm is not None:
                collector.reduce(self.comm)
            block.stats = collector.stats
        if self.comm is not None:
            routing.reduce(self.comm)
        self.rare = routing.rare
        self.result.rare_experts.update({block.qualified(n): c for n, c in self.rare.items()})
        return collector

    def scores(self, block: Block, names: list[str] | None = None) -> dict[str, Tensor]:
        """The method's float32 scores of the block's Linears `names` (default: all it scores); with
        nested=True every weight already exactly zero at −inf (pruned first, so that a weight pruned by
        an earlier run stays pruned)."""
        scores = self.plan.method.score(block, names)
        if block.nested:
            for n, score in scores.items():
                score.masked_fill_(block.linears[n].weight.detach() == 0, -torch.inf)
        return scores

    def prune_block(self, block: Block, masks: dict[str, Tensor] | None = None) -> None:
        """Prunes every Linear of the block (on the compute device) in place: the method's own solve, or
        its scores turned into masks by the block's pattern and granularity. `masks`: a dict the keep-mask
        of every Linear is written to (for a method that prunes in place: weight != 0)."""
        method = self.plan.method
        if method.prunes_in_place:
            method.prune_(block)
            if masks is not None:
                masks.update({n: lin.weight != 0 for n, lin in block.linears.items()})
            return
        granularity = block.granularity or "layer"
        names = method.layers(block)
        for group in [[n] for n in names] if method.per_layer else [names]:
            scores = self.scores(block, group)
            for n in group:
                keep = keep_mask(block.qualified(n), scores.pop(n), block.pattern, block.fraction, granularity)
                _apply(block.linears[n], keep)
                if masks is not None:
                    masks[n] = keep.to(block.linears[n].weight.device)

    def _set_aside(self, block: Block) -> dict[str, nn.Linear]:
        """The Linears of the block's rare experts that its method does not see (llm.moe.set_aside),
        taken out of block.linears."""
        if block.inputs is None:
            return {}
        return set_aside(block.linears, block.stats, self.rare, self.plan.options.rare_experts)

    def _prune_aside(self, block: Block, aside: dict[str, nn.Linear]) -> None:
        """The rare experts' Linears pruned to the block's pattern by their data-free scores, if the
        rare_experts option gives them any (llm.moe.aside_scores)."""
        for n, score in aside_scores(aside, self.plan.options.rare_experts).items():
            keep = keep_mask(block.qualified(n), score, block.pattern, block.fraction, block.granularity or "layer")
            _apply(aside[n], keep)

    def memory(self, block: Block, collector: StatsCollector | None) -> MemoryEstimate:
        """The peak-memory estimate of one block's step (module docstring's formula)."""
        params = sum(p.numel() * p.element_size() for p in block.module.parameters())
        inputs = block.inputs
        if inputs is None or not len(inputs):
            return MemoryEstimate(params, 0, 0, 0, 0)
        h = inputs.hidden[0]
        tokens, hidden, s_a = h.shape[-2], h.shape[-1], h.element_size()
        widest = max(lin.out_features for lin in block.linears.values())
        method = self.plan.method
        activations = inputs.nbytes() * (1 + self.plan.keeps_targets + 2 * self.plan.keeps_dense_inputs)
        statistics = sum(s.nbytes() for s in collector.shared()) if collector is not None else 0
        forward = self.plan.options.batch_size * tokens * (4 * hidden + 3 * widest) * s_a
        workspace = max(
            [method.workspace_bytes(block.linears, forward)]
            + [r.workspace_bytes(block.linears, forward) for r in self.plan.refinements]
        )
        return MemoryEstimate(params, activations, statistics, forward, workspace)

    def record(self, i: int) -> None:
        """The measured sparsity of every Linear weight of block i into the result, and the block's other
        weight matrices (2-D or more: experts stored as 3-D tensors, routers), which stay dense."""
        linears = block_linears(self.blocks[i])
        for n, lin in linears.items():
            name = f"{self.prefix}.{i}.{n}.weight"
            self.result.layer_numel[name] = lin.weight.numel()
            self.result.layer_sparsity[name] = int((lin.weight == 0).sum()) / lin.weight.numel()
        pruned = {id(lin.weight) for lin in linears.values()} | covered(self.blocks[i])
        for n, p in self.blocks[i].named_parameters():
            if p.dim() >= 2 and id(p) not in pruned:
                self.result.left_dense[f"{self.prefix}.{i}.{n}"] = p.numel()

    def _changing(self, i: int) -> None:
        """Block i is about to be pruned: its weights go to the undo log first (in-memory runs)."""
        if self.undo is not None:
            self.undo.save(i, self.blocks[i])

    def _keep_peak(self, estimate: MemoryEstimate) -> None:
        if self.result.memory is None or estimate.total > self.result.memory.total:
            self.result.memory = estimate

    # ---- the sequential run

    def sequential(self) -> None:
        """The block-sequential run (module docstring); blocks a resumed run found finished are only rerun
        to rebuild the next block's inputs (from the output when pruned outputs propagate)."""
        plan, store, result = self.plan, self.store, self.result
        done = result.resumed_blocks
        fractions = [plan.pattern.fraction] * len(self.blocks)
        if plan.options.owl is not None:
            ratios, fractions = store.remember("owl", self.owl_sparsities)
            result.outlier_ratio = list(ratios)
        result.block_sparsity = list(fractions)
        if done == 0:
            self.refine_model()
        todo = plan.needs_data and done < len(self.blocks)
        inputs = self.capture() if todo else None
        name = f"{plan.method.name} {plan.pattern}"
        for i, module in enumerate(tqdm(self.blocks, desc=name, unit="block", disable=self.disable)):
            t0 = time.perf_counter()
            if i < done:
                self._replay(i, inputs)
                continue
            with store.block(i, module, write=True):
                self._changing(i)
                with on_device(module, self.compute):
                    self._keep_peak(self.run_block(i, fractions[i], inputs))
                    if self.compute.type == "cuda":
                        torch.cuda.synchronize(self.compute)
                self.record(i)
            result.block_seconds.append(time.perf_counter() - t0)

    def _replay(self, i: int, inputs: BlockInputs | None) -> None:
        """A block a resumed run found finished: rerun only to rebuild the next block's inputs."""
        module, store = self.blocks[i], self.store
        replay = inputs is not None
        source = "output" if self.plan.options.propagate == "pruned" or not replay else "input"
        if replay and self.plan.keeps_dense_inputs:
            with store.block(i, module, source="input"), on_device(module, self.compute):
                self.dense_stream = self._dense_outputs(module, inputs)
        with store.block(i, module, source=source), on_device(module, self.compute):
            if replay:
                inputs.advance(self.blocks[i])
            if source == "output":
                self.record(i)
        if source != "output":
            with store.block(i, module, source="output"):
                self.record(i)

    def run_block(self, i: int, fraction: float, inputs: BlockInputs | None) -> MemoryEstimate:
        """Block i on the compute device: the statistics pass over the calibration batches, the pruning,
        then the next block's inputs in place of this block's. The dense outputs of the statistics pass
        are kept as targets for methods that keep them; with propagate="dense" they are the next inputs.

        With propagate="pruned" the pruned block is rerun on the same inputs X_j (batch j); with the
        `block_errors` option its relative output error goes to `PruneResult.block_error`:

            e_i = sqrt(Σ_j ‖f_pruned(X_j) − f_dense(X_j)‖²_F / Σ_j ‖f_dense(X_j)‖²_F)

        (the sums in float64, over every rank's batches). f_dense(X_j) are the statistics pass's outputs:
        the method's targets when it keeps them, else kept for this comparison off the compute device
        (host memory n·T·H·s_a; one batch at a time comes back to the device). The pruned weights and
        the next inputs are exactly those of a run without it."""
        propagate = self.plan.options.propagate
        block = self.view(i, fraction, inputs)
        measure = self.plan.options.block_errors and propagate == "pruned" and inputs is not None
        dense = [] if measure and not self.plan.keeps_targets else None
        collector = self.statistics_pass(block, dense_into_inputs=propagate == "dense", dense_outputs=dense)
        estimate = self.memory(block, collector)
        aside = self._set_aside(block)
        dense_inputs = None
        if self.plan.keeps_dense_inputs and inputs is not None:
            dense_inputs = self.dense_stream  # None for block 0: the same as `inputs`
            self.dense_stream = self._dense_outputs(block.module, inputs)
        self.refine_block(block, dense_inputs)
        self._prune_aside(block, aside)
        if measure:
            self.result.block_error.append(self._pruned_error(i, inputs, block.targets or dense))
        elif inputs is not None and i + 1 < len(self.blocks):
            if propagate == "pruned":
                inputs.advance(self.blocks[i])
            elif block.targets is not None:
                inputs.hidden = block.targets
        return estimate

    @torch.no_grad()
    def _dense_outputs(self, module: nn.Module, inputs: BlockInputs) -> list[Tensor]:
        """The dense block's outputs on the dense model's inputs of it (the dense stream, or `inputs` while
        no block before was pruned), per calibration batch: the dense stream of the next block."""
        hidden = inputs.hidden if self.dense_stream is None else self.dense_stream
        stream = BlockInputs(list(hidden), inputs.args, inputs.kwargs, inputs.by_keyword)
        return [stream.run(module, j) for j in range(len(stream))]

    def refine_model(self) -> None:
        """The run's refinements of stage "model" (llm.refine), before block 0's inputs are captured."""
        for refinement in self.plan.stage("model"):
            step = ModelStep(self.model, self.prefix, self.blocks, self.plan.method, self.plan.pattern, self.capture)
            try:
                self._gain(refinement, step)
            finally:  # reverted if this refinement or a later step fails
                self.model_undo.extend(step.undo)

    def refine_block(self, block: Block, dense_inputs: list[Tensor] | None = None) -> None:
        """Masks the block with the run's refinements around it (llm.refine): stage "dense" before the
        method, stage "masked" after it (given the masks, the dense weights if asked, the targets, the
        dense model's inputs of the block `dense_inputs` if kept)."""
        plan = self.plan
        method, masked = plan.method, plan.stage("masked")
        for refinement in plan.stage("dense"):
            self._gain(refinement, BlockStep(block, method, block.targets, scores=partial(self.dense_scores_of, block)))
        if not masked:
            self.prune_block(block)
            return
        held = {id(s): (s, s.xtx) for s in block.stats.values()}  # a method may free XᵀX (SparseGPT)
        dense = None
        if any(r.keeps_dense for r in masked):
            dense = {n: lin.weight.detach().clone() for n, lin in block.linears.items()}
        masks: dict[str, Tensor] = {}
        self.prune_block(block, masks)
        for stats, xtx in held.values():
            stats.xtx = xtx
        for refinement in masked:
            self._gain(refinement, BlockStep(block, method, block.targets, dense, masks, dense_inputs=dense_inputs))

    def dense_scores_of(self, block: Block, names: list[str]) -> dict[str, Tensor]:
        """The method's scores of the Linears `names` for a refinement of stage "dense"; for a method that
        prunes in place, Wanda's |W_ij|·‖X_j‖₂ (the diagonal form of SparseGPT's saliency)."""
        if not self.plan.method.prunes_in_place:
            return self.scores(block, names)
        return {n: wanda_score(block.linears[n].weight, block.stats[n].norms().unsqueeze(0)) for n in names}

    def _gain(self, refinement: Refinement, step: ModelStep | BlockStep) -> None:
        t0 = time.perf_counter()
        gain = refinement.refine_(step)
        if not isinstance(gain, Gain):
            raise TypeError(f"refinement {refinement.name!r} returned {type(gain).__name__}, expected a refine.Gain")
        gain.seconds = time.perf_counter() - t0
        self.result.refinements.setdefault(refinement.name, []).append(gain)

    def _pruned_error(self, i: int, inputs: BlockInputs, dense: list[Tensor]) -> float:
        """Runs the pruned block i on its inputs (which its outputs replace unless it is the last block)
        and returns its relative output error against the dense outputs `dense` (run_block's formula)."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.compute)
        last = i + 1 == len(self.blocks)
        for j in range(len(inputs)):
            y = inputs.run(self.blocks[i], j)
            want = dense[j].to(y.device).double()
            sums[0] += (y.double() - want).pow(2).sum()
            sums[1] += want.pow(2).sum()
            if not last:
                inputs.hidden[j] = y
        if self.comm is not None:
            sums = self.comm.all_reduce_sum(sums)
        error, norm = sums.tolist()
        return (error / norm) ** 0.5 if norm > 0 else 0.0

    def owl_sparsities(self) -> tuple[list[float], list[float]]:
        """OWL's dense pre-pass: the outlier ratio of every block (llm.owl), then block sparsities."""
        owl = self.plan.options.owl
        inputs = self.capture()
        ratios, sizes = [], []
        for i, module in enumerate(tqdm(self.blocks, desc="OWL outlier ratios", unit="block", disable=self.disable)):
            linears = block_linears(module)
            with self.store.block(i, module), on_device(module, self.compute):
                collector = StatsCollector(module, linears, {"norms"})
                with collector as stats, Routing(module, linears, "dense", 0):
                    inputs.advance(self.blocks[i])
                if self.comm is not None:
                    collector.reduce(self.comm)
                linears = {n: lin for n, lin in linears.items() if n in stats or expert_of(n) is None}
                block = Block(i, module, linears, self.plan.pattern, 0.0, None, stats=stats, prefix=self.prefix)
                ratios.append(owl.block_ratio(block))
                sizes.append(sum(lin.weight.numel() for lin in linears.values()))
        return ratios, block_sparsities(ratios, sizes, self.plan.pattern.fraction, owl.lam)

    # ---- the global run

    def block_sizes(self) -> list[int]:
        return [sum(lin.weight.numel() for lin in block_linears(b).values()) for b in self.blocks]

    def dense_scores(self, todo: list[int]) -> Iterator[tuple[int, dict[str, Tensor], MemoryEstimate]]:
        """Yields (i, {Linear name: float32 score}, memory estimate) for each block i in `todo` (ascending),
        scored on the dense model's calibration inputs; the blocks before the last one in `todo` that are
        not in it are run only to rebuild the inputs of the next."""
        if not todo:
            return
        inputs = self.capture() if self.plan.method.needs_data else None
        desc = f"{self.plan.method.name} scores"
        bar = tqdm(total=todo[-1] + 1, desc=desc, unit="block", disable=self.disable)
        wanted = set(todo)
        for i, module in enumerate(self.blocks[: todo[-1] + 1]):
            with self.store.block(i, module), on_device(module, self.compute):
                if i not in wanted:
                    if inputs is not None:
                        inputs.advance(self.blocks[i])
                else:
                    block = self.view(i, self.plan.pattern.fraction, inputs)
                    collector = self.statistics_pass(block, dense_into_inputs=True)
                    estimate = self.memory(block, collector)
                    names = list(block.linears)
                    aside = self._set_aside(block)
                    scores = self.scores(block)
                    scores.update(aside_scores(aside, self.plan.options.rare_experts, keep_all=True))
                    if block.targets is not None:
                        inputs.hidden = block.targets
                    yield i, {n: scores[n].detach().float() for n in names}, estimate
            bar.update()
        bar.close()

    def global_scores(self, directory: Path) -> list[Path]:
        """First pass of a global run: every block's scores (`dense_scores`), one float32 file per block
        (its Linears in order, each row-major). Files already complete (a resumed run) are kept."""
        files = [directory / f"block-{i:05d}.f32" for i in range(len(self.blocks))]
        sizes = self.block_sizes()
        todo = [i for i, (f, n) in enumerate(zip(files, sizes)) if not (f.is_file() and f.stat().st_size == 4 * n)]
        if self.comm is not None:  # every rank takes part in every block's reductions: nothing is skipped
            todo = list(range(len(self.blocks)))
        for i, scores, estimate in self.dense_scores(todo):
            self._keep_peak(estimate)
            flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
            with atomic_path(files[i]) as temp:
                flat.numpy().tofile(temp)
        return files

    def whole_model(self) -> None:
        """Whole-model sparsity: scores to disk, one exact threshold over all of them, then each block
        pruned against it (the masks of masks.global_unstructured over every block's scores)."""
        keep = self.store.disk and self.store.writer
        scratch = None if keep else tempfile.TemporaryDirectory(prefix="pyprune_scores_")
        directory = self.store.scores_dir() if keep else Path(scratch.name)
        try:
            files = self.global_scores(directory)
            self._prune_to_threshold(files)
        finally:
            if scratch is not None:
                scratch.cleanup()
        sizes = self.block_sizes()
        zeros = [0.0] * len(self.blocks)
        for name, fraction in self.result.layer_sparsity.items():
            zeros[int(name[len(self.prefix) + 1 :].split(".", 1)[0])] += fraction * self.result.layer_numel[name]
        self.result.block_sparsity = [z / max(size, 1) for z, size in zip(zeros, sizes)]

    def _prune_to_threshold(self, files: list[Path]) -> None:
        """The second pass of a global run: the exact threshold over every block's score file, then each
        block's masks against it (ties by flat index in block order)."""
        result, sizes = self.result, self.block_sizes()
        labels = [f"the scores of decoder block {i} ({f})" for i, f in enumerate(files)]
        k = round(self.plan.pattern.fraction * sum(sizes))
        value = need = None
        if k > 0:
            value, counts = ops.select_counts([_mapped(f, n) for f, n in zip(files, sizes)], k, labels)
            need = k - int(counts[0])
        else:
            for f, n, label in zip(files, sizes, labels):
                if bool(torch.isnan(_mapped(f, n)).any()):
                    raise ValueError(f"{label} hold NaN")
        for i, module in enumerate(tqdm(self.blocks, desc="global masks", unit="block", disable=self.disable)):
            t0 = time.perf_counter()
            if i < result.resumed_blocks:
                with self.store.block(i, module, source="output"):
                    self.record(i)
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
            with self.store.block(i, module, write=True):
                self._changing(i)
                offset = 0
                for lin in block_linears(module).values():
                    n = lin.weight.numel()
                    _apply(lin, keep[offset : offset + n].view(lin.weight.shape))
                    offset += n
                self.record(i)
            result.block_seconds.append(time.perf_counter() - t0)


def prune(
    model: nn.Module | str | os.PathLike,
    calibration: Tensor | None = None,
    *,
    method: str | Method = DEFAULT_METHOD,
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
    forward: Callable[[nn.Module, Any], Any] | None = None,
    keep_scores: bool = False,
    block_errors: bool = False,
    refine: str | Refinement | tuple | list | None = None,
    rare_experts: str = "dense",
    min_expert_tokens: int = 16,
) -> PruneResult:
    """Prunes the Linear layers of every block of a transformer in place, one block at a time (module
    docstring), and returns what was done: a Hugging Face causal LM, or with `forward` any model whose
    blocks `llm.find_blocks` finds (a BERT-style encoder, a timm, torchvision or Hugging Face ViT).
    nn.MultiheadAttention's packed in_proj_weight is pruned as the three projections it holds
    (`modeling.UnpackedAttention`: its Linears are named q_proj, k_proj, v_proj in the result).

    Args:
        model: the model (pruned in place), or with offload="disk" the path of a causal LM's safetensors
            checkpoint directory.
        calibration: token ids, a 1-D stream cut into `num_samples` consecutive windows of `seq_len`
            tokens, or [sequences, tokens] of which the first num_samples × seq_len are used (not needed
            by magnitude without OWL). The defaults, 128 × 2048, are the papers'; the model's
            max_position_embeddings is never used as a length. With `forward`: a list of batches.
        method: a registered method's name ("magnitude", "wanda", "sparsegpt", or a block-local
            criterion "snip", "refer", "afr", "feature_l1": llm.methods) or a `criteria.Method` object
            (a method of one's own: criteria.method).
        sparsity: a fraction in [0, 1] (exactly round(s × N) weights of each group pruned) or an N:M
            pattern "2:4" / (2, 4).
        granularity: "row" (each output row its own group), "layer", or "global" (one group over every
            pruned weight of the model: a dense scoring pass, then one exact threshold; not for methods
            that prune in place, such as sparsegpt); default: the method's (its paper's: Wanda per row,
            the others per layer); ignored for N:M.
        owl: llm.OWL(M, lam) for outlier-weighted non-uniform block sparsity (unstructured only).
        num_samples, seq_len: the calibration windows.
        batch_size: calibration sequences per forward.
        propagate: "pruned" (the next block sees the pruned block's outputs) or "dense".
        device: where each block is computed (default: CUDA when available, else where the block is).
        blocksize, percdamp: SparseGPT's lazy column block width and Hessian dampening (they configure a
            method given by name; a Method object carries its own).
        progress: a tqdm bar over the blocks; None shows it only on a terminal.
        offload: None (the model is in memory and pruned in place) or "disk": `model` is then the path
            of a safetensors checkpoint directory, read one block at a time, and the pruned model is
            written to the directory `out` as a checkpoint that from_pretrained loads (llm.offload).
        out: with offload="disk", the output checkpoint directory.
        resume: with offload="disk", continue the run recorded in `out` after its last finished block.
        group: a torch.distributed ProcessGroup to prune over several ranks (module docstring: each rank
            calibrates on its share of the sequences, statistics are summed over the ranks, SparseGPT's
            solves are spread over them); every rank calls prune with the same arguments and ends with
            the same pruned model; with offload="disk", rank 0 writes the output.
        nested: the weights already exactly zero are pruned first (their scores −inf; SparseGPT: its
            mask of each Linear chosen once, before its sweep, instead of per block of columns, so that
            the OBS updates cannot revive them): a model pruned by an earlier run at a lower sparsity
            with the same groups keeps every weight it pruned, and every group still ends with exactly
            round(s × N) (iterative pruning over rounds; unstructured fractions only, not with OWL).
        forward: for a model that does not take token ids: a callable (model, inputs) run on each
            calibration batch (an `(inputs, targets)` pair or bare inputs), as the criteria API's.
        keep_scores: with granularity="global" and offload="disk", keep the per-block score files
            (`out/pyprune_scores/`, 4 bytes a weight) after the run finishes; they are removed by
            default (a killed run keeps them for its resume either way).
        block_errors: measure each pruned block's relative output error on the calibration inputs
            (`PruneResult.block_error`, propagate="pruned"); methods that keep no dense targets then
            hold the block's dense outputs in host memory (n·T·H·s_a more) for the comparison.
        rare_experts: mixture-of-experts models (llm.moe: each routed expert's Linears are calibrated on
            the tokens routed to it): what happens to an expert that gets fewer than `min_expert_tokens`
            calibration tokens (listed in `PruneResult.rare_experts`): "dense" (left unpruned),
            "magnitude" (pruned by |W|) or "route" (the tokens its router scores highest forced through
            it for its statistics).
        min_expert_tokens: that threshold (0: no expert is rare).
        refine: refinements by name ("reconstruct", "swap", ...: llm.refine.REFINEMENTS) or Refinement
            objects, in any order (the pipeline applies them by stage: llm.refine); each one's gain goes
            to `PruneResult.refinements`. Not with granularity="global".

    Returns:
        A PruneResult: the measured sparsity of every pruned Linear, block sparsities, times, the
        peak-memory estimate and the measured peaks (llm.result).

    Every argument is checked before the model is touched: a model without decoder blocks, a
    calibration set shorter than asked, a sparsity out of range or an unknown method raise ValueError
    with the model unchanged."""
    start = time.perf_counter()
    options = Options(
        method=method,
        sparsity=sparsity,
        granularity=granularity,
        owl=owl,
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        propagate=propagate,
        device=device,
        blocksize=blocksize,
        percdamp=percdamp,
        progress=progress,
        offload=offload,
        out=out,
        resume=resume,
        nested=nested,
        forward=forward,
        keep_scores=keep_scores,
        block_errors=block_errors,
        refine=refine,
        rare_experts=rare_experts,
        min_expert_tokens=min_expert_tokens,
    )
    comm = None if group is None else Communicator(group)
    with session(comm):  # distributed: an error on any rank makes every rank raise
        with unpacked_attention(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
            result = Run.start(model, calibration, options, comm).prune()
    result.seconds = time.perf_counter() - start
    return result


def scores(
    model: nn.Module,
    calibration: Tensor | None = None,
    *,
    method: str | Method = DEFAULT_METHOD,
    sparsity: float = 0.5,
    num_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """The scores of every decoder-block Linear weight of a causal LM, each block scored on the dense
    model's calibration inputs, block by block as `prune` does; the model is not changed.

    Args:
        model: the causal LM.
        calibration, num_samples, seq_len, batch_size, device, progress, forward: as for `prune`.
        method: a method with a score per weight (magnitude, wanda, snip, refer, afr, feature_l1, or a
            Method object).
        sparsity: the fraction the scores are for. Only methods whose scores depend on the target
            read it: the block-local snip and afr take their candidate masks (magnitude, per layer) at
            this sparsity; the others' scores are the same at every sparsity.

    Returns:
        {parameter name: float32 score} (higher = more important), for `pyprune_fast.masks` or another
        tool. prune(granularity="global", sparsity=s) prunes by masks.global_unstructured(scores, s)
        over exactly the scores of scores(..., sparsity=s), for every method and every s."""
    chosen = get_method(method)
    if chosen.prunes_in_place:
        raise ValueError(f"{chosen.name} has no score per weight (it chooses its masks inside its own solve)")
    if isinstance(sparsity, (str, tuple)):
        raise ValueError(
            f"sparsity must be a fraction in [0, 1] (scores are for unstructured targets), got {sparsity!r}"
        )
    options = Options(
        method=chosen,
        sparsity=sparsity,
        granularity="global",
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        propagate="dense",
        device=device,
        progress=progress,
        forward=forward,
    )
    out: dict[str, Tensor] = {}
    with unpacked_attention(model):
        run = Run.start(model, calibration, options, None)
        with eval_mode(model), torch.no_grad():
            for i, block_scores, _ in run.dense_scores(list(range(len(run.blocks)))):
                out.update({f"{run.prefix}.{i}.{n}.weight": s.cpu() for n, s in block_scores.items()})
    return out
