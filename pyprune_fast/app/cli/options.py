"""Each command's options as one object, validated when made: `PruneOptions`, `ScoreOptions`,
`SensitivityOptions`, `BenchOptions`. Fields carry the names of the library parameters they feed
(`batch_size` → `runner.prune`, `llm_runner.prune`; the flag is `--batch-size`); a refused value is a
UsageError naming those parameters, which the command line spells as its flags (`spell`). Nothing here
loads a model: every rule that the options alone decide is checked before any work starts, once."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from ...errors import UsageError
from .. import zoo
from ..refinement import Refinement

if TYPE_CHECKING:
    from ..structured import Plan

DEFAULT_CRITERIA = ["magnitude", "snip", "refer", "afr"]
DEFAULT_CHANNEL_CRITERIA = ["l1", "taylor", "fisher"]
DEFAULT_SPARSITIES = [0.5, 0.8, 0.9]
DEFAULT_BATCHES = 4
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 256
# How each granularity of the command line reaches llm.prune (None: each method's own groups).
LLM_GRANULARITIES = {None: None, "per-row": "row", "layerwise": "layer", "global": "global", "2:4": None}
# The file that marks a pruned model directory as written by `prune --save-model` (a rerun may replace it).
MODEL_MARKER = "pyprune_model.json"


def spell(name: str) -> str:
    """A library parameter as the command line's flag: `batch_size` → `--batch-size`."""
    return "--" + name.replace("_", "-")


def resolve_device(name: str) -> str:
    """The device a `--device` value names.

    Args:
        name: "auto" (CUDA if available, else the CPU), "cpu", "cuda" or "cuda:N".

    Returns:
        The device's name.

    Raises:
        UsageError: not a device, or CUDA asked on a machine without it.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"`device` {name!r} is not a device (expected auto, cpu, cuda or cuda:N): {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"`device` {name!r}: CUDA is not available on this machine")
    return name


def processes() -> int:
    """The processes of this run: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies inside it (both resolved, symbolic links followed)."""
    path, directory = _real(path), _real(directory)
    return os.path.commonpath([path, directory]) == directory


def _foreign(directory: str, marker: str) -> list[str]:
    """What of `directory` a run may not replace: nothing when it is absent, empty or holds `marker`
    (written by an earlier run), else its entries (the path itself when it is not a directory)."""
    if not os.path.lexists(directory):
        return []
    if not os.path.isdir(directory):
        return [directory]
    entries = sorted(os.listdir(directory))
    return [] if not entries or marker in entries else entries


def _at_least(values: dict[str, int], least: int = 1) -> None:
    for name, value in values.items():
        if value < least:
            raise UsageError(f"`{name}` must be >= {least}, got {value}")


@dataclass
class Options:
    """What every command that loads a model shares: the model, the criteria, the output directory,
    the device, progress bars, and the data with how it is cut.

    Args:
        model: a --model spec (zoo.load); None: the embedded default.
        criterion: the criteria (or LLM methods) asked; None: the command's defaults.
        out: the output directory.
        device: "auto", "cpu", "cuda", "cuda:N"; resolved to a device when validated.
        quiet: no progress bars.
        data: the calibration files, in place of the model's packaged data.
        eval_data: the evaluation files (prune and sensitivity).
        batches: calibration batches for the criteria, >= 1.
        batch_size: images or sequences per batch read from the files, >= 1.
        seq_len: tokens per text sequence, >= 1.
        argv: the command line, recorded in the reports.

    Derived when validated: `llm`, whether the model is a causal LM (pruned block by block).
    """

    model: str | None = None
    criterion: list[str] | None = None
    out: str = "pyprune-out"
    device: str = "auto"
    quiet: bool = False
    data: str | None = None
    eval_data: str | None = None
    batches: int = DEFAULT_BATCHES
    batch_size: int = DEFAULT_BATCH_SIZE
    seq_len: int = DEFAULT_SEQ_LEN
    argv: list[str] = field(default_factory=list)
    llm: bool = field(init=False, default=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]):
        """The options of a parsed command line (the Namespace's attributes that are fields).

        Raises:
            UsageError: see `validate`.
        """
        names = {f.name for f in fields(cls) if f.init} - {"argv"}
        return cls(**{k: v for k, v in vars(args).items() if k in names}, argv=list(argv))

    def __post_init__(self) -> None:
        self.llm = zoo.is_llm_spec(self.model)
        self.validate()

    def validate(self) -> None:
        """Checks the shared options; subclasses check their own after these.

        Raises:
            UsageError: a size below 1, a file that does not exist, files for the default model, a device
                that does not exist here.
        """
        _at_least({"batches": self.batches, "batch_size": self.batch_size, "seq_len": self.seq_len})
        from .. import data

        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None:
                data.check_path(path, spell(name))
        if self.files and zoo.is_default(self.model):
            given = " and ".join(f"`{name}`" for name in self.files)
            raise UsageError(
                f"{given} do not apply to the default model (calibrated and evaluated on its packaged text); name a "
                "model: `model` torchvision:NAME | timm:NAME | hf:PATH | smollm2"
            )
        self.device = resolve_device(self.device)

    @property
    def files(self) -> dict[str, str]:
        """{parameter: path} of the files given in place of the model's packaged data."""
        return {n: getattr(self, n) for n in ("data", "eval_data") if getattr(self, n) is not None}


@dataclass
class ScoreOptions(Options):
    """`pyprune-fast score`: the shared options (no evaluation data); not for causal LMs."""

    out: str = "pyprune-scores"

    def validate(self) -> None:
        super().validate()
        if self.llm:
            raise UsageError("score does not apply to causal LMs (pruned block by block): use pyprune-fast prune")

    @property
    def criteria(self) -> list[str]:
        """The criteria to score with, the defaults if none were named."""
        return self.criterion or DEFAULT_CRITERIA


@dataclass
class SensitivityOptions(Options):
    """`pyprune-fast sensitivity`.

    Args:
        sparsity: the sparsities each unit is pruned to, each in (0, 1].
        granularity: "block" or "layer", the unit pruned alone.
        budget: the global sparsity allocated, in [0, the highest sparsity].
    """

    out: str = "pyprune-sensitivity"
    sparsity: list[float] = field(default_factory=lambda: [0.5, 0.9])
    granularity: str = "block"
    budget: float = 0.5

    def validate(self) -> None:
        super().validate()
        if len(self.criterion or []) > 1:
            raise UsageError(f"sensitivity takes one `criterion` (default magnitude), got {self.criterion}")
        if self.llm:
            raise UsageError("sensitivity does not apply to causal LMs (pruned block by block): use pyprune-fast prune")
        for s in self.sparsity:
            if not 0 < s <= 1:
                raise UsageError(f"`sparsity` must be in (0, 1], got {s}")
        if not 0 <= self.budget <= max(self.sparsity):
            raise UsageError(f"`budget` must be in [0, the highest `sparsity` {max(self.sparsity)}], got {self.budget}")

    @property
    def criteria(self) -> list[str]:
        """The one criterion, magnitude if none was named."""
        return [(self.criterion or ["magnitude"])[0]]


@dataclass
class PruneOptions(Options):
    """`pyprune-fast prune`, of any model: the LLM options are checked when the model is a causal LM,
    the others otherwise.

    Args:
        sparsity: fractions to prune; None: the defaults (0.5 0.8 0.9; causal LMs 0.5 and 2:4).
        granularity: runner.CHOICES; None: global (causal LMs: each method's own groups, and 2:4).
        remove_channels: remove pruned channels physically (channel granularities).
        save_model: also write each pruned model (True: under `out`; a str: under that directory).
        finetune, finetune_lr, schedule, rounds: the Refinement (`refinement`), checked there.
        samples, eval_tokens: causal LMs' calibration sequences and held-out tokens, >= 1 (eval_tokens 0 with
            offload: no evaluation).
        offload: "disk": stream a causal LM from its checkpoint; None: in memory.
        resume: continue an offloaded run.
        structure, ratio, allocation, reconstruct, multiple, distill, distill_lr: structured pruning (`plan`, an
            app.structured.Plan; `criterion` then names its scores), checked in `_validate_structured`.
        refine: llm.refine refinements of every method's masking (causal LMs), None: none.

    Derived when validated: `refinement`; for causal LMs `methods` and `targets` (fractions and
    "2:4"), for the other models `criteria`, `sparsities` and `granularity` (its default filled in).
    """

    sparsity: list[float] | None = None
    granularity: str | None = None
    remove_channels: bool = False
    save_model: bool | str = False
    finetune: int = 0
    finetune_lr: float = 1e-4
    schedule: str = "one-shot"
    rounds: int = 5
    samples: int = 16
    eval_tokens: int = 8192
    offload: str | None = None
    resume: bool = False
    structure: str | None = None
    ratio: list[float] | None = None
    allocation: str = "uniform"
    reconstruct: bool = True
    multiple: int = 1
    distill: int = 0
    distill_lr: float = 1e-4
    plan: Plan | None = field(init=False, default=None)
    refine: list[str] | None = None
    refinement: Refinement = field(init=False, default_factory=Refinement)
    criteria: list[str] = field(init=False, default_factory=list)
    sparsities: list[float] = field(init=False, default_factory=list)
    methods: list[str] = field(init=False, default_factory=list)
    targets: list[float | str] = field(init=False, default_factory=list)

    def validate(self) -> None:
        super().validate()
        self.refinement = Refinement(self.schedule, self.rounds, self.finetune, self.finetune_lr, self.batch_size)
        if self.structure is not None:
            self._validate_structured()
            self._check_paths()
            return
        self._refuse_structured_options()
        if self.granularity == "2:4" and self.sparsity is not None:
            raise UsageError("`sparsity` does not apply to `granularity` 2:4 (2 of every 4 weights are kept: 0.5)")
        if self.llm:
            self._validate_llm()
        else:
            self._validate_model()
        self._check_paths()

    def model_dirs(self) -> list[str]:
        """The names of the directories `save_model` writes under `save_root` for a Hugging Face model:
        <method>-<sparsity> or <method>-2of4 for each result."""
        from .. import llm_runner, runner, structured

        if self.plan is not None:
            return [structured.tag(self.plan.structure, c, r) for c in self.plan.criteria for r in self.plan.ratios]
        if self.llm:
            return [llm_runner.tag(m, t) for m in self.methods for t in self.targets]
        two_four = self.granularity == runner.TWO_FOUR
        return [f"{c}-{'2of4' if two_four else f'{s:g}'}" for c in self.criteria for s in self.sparsities]

    def _check_paths(self) -> None:
        """Refuses, before anything is created, a run that would replace its own input or the user's
        files: a model directory (hf:PATH) or data inside `out`; a `save_model` that is a file, is, holds
        or lies inside the input model, or whose <method>-<sparsity> directories hold files no earlier
        run wrote (ours hold MODEL_MARKER; with `offload` disk, llm.offload's run record)."""
        from ...llm.offload import RUN_FILE

        kind, _, rest = (self.model or "").partition(":")
        model = rest if kind == "hf" and rest else None
        for name, path in (("model", model), *self.files.items()):
            if path is not None and _within(path, self.out):
                shown = f"hf:{path}" if name == "model" else path
                raise UsageError(
                    f"`{name}` {shown!r} lies inside `out` {self.out!r}, which this run writes and replaces: the run "
                    "would delete its own input; choose an `out` apart from it"
                )
        if not isinstance(self.save_model, str):
            return
        root = self.save_model
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(
                f"`save_model` {root!r} exists and is not a directory: expected a directory to write the pruned models "
                "into"
            )
        if model is not None and (_within(root, model) or _within(model, root)):
            raise UsageError(
                f"`save_model` {root!r} is, holds or lies inside the input model {model!r}, whose files the pruned "
                "models would replace: choose a directory apart from it"
            )
        marker = RUN_FILE if self.offload else MODEL_MARKER
        for name in self.model_dirs():
            foreign = _foreign(os.path.join(root, name), marker)
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise UsageError(
                    f"`save_model` {root!r}: {name}/ holds files that no earlier pyprune-fast prune wrote ({shown}); "
                    f"the run would replace it: choose another directory or empty it"
                )

    def _validate_model(self) -> None:
        from .. import runner

        self.granularity = self.granularity or ("layerwise" if self.refine else "global")
        self._validate_refine()
        if self.refine and runner.kind_of(self.granularity) == "channel":
            raise UsageError("`refine` refines weight masks, not the channel granularities")
        runner.check_plan(self.granularity, self.refinement, processes(), self.remove_channels)
        self.sparsities = (
            [0.5]
            if self.granularity == runner.TWO_FOUR
            else runner.check_sparsities(self.sparsity or DEFAULT_SPARSITIES)
        )
        channel = runner.kind_of(self.granularity) == "channel"
        self.criteria = list(
            dict.fromkeys(self.criterion or (DEFAULT_CHANNEL_CRITERIA if channel else DEFAULT_CRITERIA))
        )
        runner.check_kind(self.criteria, runner.kind_of(self.granularity), blockwise=True)

    def _validate_llm(self) -> None:
        from ... import llm
        from .. import llm_runner, runner

        if self.granularity not in LLM_GRANULARITIES:
            raise UsageError(
                f"`granularity` {self.granularity} does not apply to LLMs (pruned block by block): use per-row, "
                "layerwise, global or 2:4, or leave it out (each method's own groups, and 2:4)"
            )
        if self.remove_channels:
            raise UsageError("`remove_channels` does not apply to LLMs")
        if self.offload and self.finetune:
            raise UsageError(
                "`finetune` trains the whole model, which must then be in memory; `offload` disk holds one decoder "
                "block at a time: leave out one of them"
            )
        if self.offload and self.refinement.iterative:
            raise UsageError(
                "`schedule` iterative prunes the model in memory round after round; `offload` disk streams one pass "
                "from checkpoint to checkpoint: leave out one of them"
            )
        if self.resume and not self.offload:
            raise UsageError("`resume` continues an `offload` disk run: add `offload` disk")
        self._validate_refine()
        if self.granularity == runner.TWO_FOUR:
            self.targets = [runner.TWO_FOUR]
        elif self.sparsity is not None:
            self.targets = runner.check_sparsities(self.sparsity)
        else:  # the default targets: 50 % and 2:4 (50 % alone with a granularity or the iterative schedule)
            plain = self.granularity is None and not self.refinement.iterative
            self.targets = list(llm_runner.DEFAULT_TARGETS) if plain else [0.5]
        llm_runner.check_schedule(self.targets, self.refinement)
        defaults = llm_runner.DEFAULT_METHODS
        if self.granularity == "global":  # SparseGPT chooses its masks inside its solve: no score to threshold
            defaults = [m for m in defaults if not llm.METHODS[m].prunes_in_place]
            chosen = [m for m in self.criterion or [] if m in llm.METHODS and llm.METHODS[m].prunes_in_place]
            if chosen:
                raise UsageError(
                    f"`granularity` global thresholds one score per weight; {chosen[0]} chooses its masks inside its "
                    "solve, per block of columns: use per-row or layerwise for it"
                )
        self.methods = list(dict.fromkeys(self.criterion or defaults))
        unknown = [m for m in self.methods if m not in llm.METHODS]
        if unknown:
            raise UsageError(f"criteria {unknown} do not apply to LLMs; LLM methods: {', '.join(llm.METHODS)}")
        sizes = {"samples": self.samples, "seq_len": self.seq_len, "eval_tokens": self.eval_tokens}
        if self.offload and self.eval_tokens == 0:  # a streamed run that only writes the pruned checkpoints
            del sizes["eval_tokens"]
        llm_runner.check_methods(self.methods, self.targets, sizes)

    # --- structured pruning (--structure) ---------------------------------------------------------

    def _refuse_structured_options(self) -> None:
        """UsageError for an option of structured pruning given without `structure`."""
        given = {
            "ratio": self.ratio is not None,
            "allocation": self.allocation != "uniform",
            "reconstruct": not self.reconstruct,
            "multiple": self.multiple != 1,
            "distill": self.distill != 0,
        }
        for name, present in given.items():
            if present:
                raise UsageError(f"`{name}` applies to structured pruning: add `structure` width or depth")

    def _validate_structured(self) -> None:
        """Checks a structured run (app.structured) and makes its `plan`."""
        import math

        from ...llm.structured import ALLOCATIONS, DEPTH_SCORES, SCORES
        from ...llm.structured.experts import SCORES as EXPERT_SCORES
        from ..structured import DEFAULT_SCORE, DEPTH_SCORE, EXPERT_SCORE, EXPERTS, STRUCTURES, Plan

        if self.structure not in STRUCTURES:
            raise UsageError(f"`structure` must be one of {', '.join(STRUCTURES)}, got {self.structure!r}")
        masks_only = {
            "sparsity": self.sparsity is not None,
            "granularity": self.granularity is not None,
            "remove_channels": self.remove_channels,
            "finetune": self.finetune != 0,
            "schedule": self.refinement.iterative,
            "offload": self.offload is not None,
            "resume": self.resume,
            "refine": bool(self.refine),
        }
        for name, present in masks_only.items():
            if present:
                raise UsageError(
                    f"`{name}` does not apply to `structure` {self.structure} (whole channels, heads or blocks "
                    "removed; `ratio` sets how much, `distill` recovers): leave it out"
                )
        if processes() > 1:
            raise UsageError(f"`structure` {self.structure} runs in one process, not under torchrun ({processes()})")
        ratios = list(dict.fromkeys(self.ratio or [0.25]))
        for r in ratios:
            if not 0 < r < 1:
                raise UsageError(
                    f"`ratio` must be in (0, 1) (the fraction of the blocks' parameters removed), got {r:g}"
                )
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"`allocation` must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.structure == "depth":
            if "loss" in (self.criterion or ()) and not self.llm:
                raise UsageError(
                    "`criterion` loss (the calibration loss of removing each block) needs a causal LM: `model` "
                    "smollm2 or hf:PATH of one; other models take `criterion` influence"
                )
            for name, present in (("allocation", self.allocation != "uniform"), ("multiple", self.multiple != 1)):
                if present:
                    raise UsageError(f"`{name}` applies to `structure` width (depth removes whole blocks)")
        if self.structure == EXPERTS and not self.llm:
            raise UsageError("`structure` experts removes routed experts of a causal LM: `model` hf:PATH")
        if self.structure == EXPERTS and self.multiple != 1:
            raise UsageError("`multiple` applies to `structure` width (experts are removed whole)")
        known, default = {
            "width": (SCORES, DEFAULT_SCORE),
            "depth": (DEPTH_SCORES, DEPTH_SCORE),
            EXPERTS: (EXPERT_SCORES, EXPERT_SCORE),
        }[self.structure]
        scores = list(dict.fromkeys(self.criterion or [default]))
        unknown = [c for c in scores if c not in known]
        if unknown:
            raise UsageError(
                f"`criterion` {unknown[0]} is not a score of `structure` {self.structure}; it takes: {', '.join(known)}"
            )
        if isinstance(self.distill, bool) or not isinstance(self.distill, int) or self.distill < 0:
            raise UsageError(f"`distill` must be an int >= 0, got {self.distill!r}")
        if self.distill and not self.llm:
            raise UsageError(
                "`distill` fine-tunes a causal LM against the dense model's logits: `model` smollm2 or hf:PATH of a "
                "causal LM"
            )
        if not (math.isfinite(self.distill_lr) and self.distill_lr > 0):
            raise UsageError(f"`distill_lr` must be a finite number > 0, got {self.distill_lr}")
        _at_least({"samples": self.samples, "eval_tokens": self.eval_tokens, "multiple": self.multiple})
        self.plan = Plan(
            self.structure,
            ratios,
            scores,
            self.allocation,
            self.reconstruct,
            multiple=self.multiple,
            samples=self.samples,
            seq_len=self.seq_len,
            eval_tokens=self.eval_tokens,
            batches=self.batches,
            distill=self.distill,
            distill_lr=self.distill_lr,
            batch_size=self.batch_size,
            device=self.device,
        )

    def _validate_refine(self) -> None:
        """`refine` names refinements once each, for the block-sequential run (not global, nor the iterative
        schedule's nested rounds when a refinement may revive weights)."""
        from ...llm.refine import REFINEMENTS

        if not self.refine:
            return
        unknown = [r for r in self.refine if r not in REFINEMENTS]
        if unknown:
            raise UsageError(f"`refine` {unknown[0]} is unknown; refinements: {', '.join(REFINEMENTS)}")
        if len(set(self.refine)) != len(self.refine):
            raise UsageError(f"`refine` names each refinement once, got {' '.join(self.refine)}")
        if self.granularity == "global":
            raise UsageError("`refine` applies to the block-sequential run; `granularity` global thresholds the model")
        if self.refinement.iterative and "swap" in self.refine:
            raise UsageError("`refine` swap may revive weights; `schedule` iterative keeps every weight pruned before")

    @property
    def save_root(self) -> str:
        """Where the pruned models are written: the directory given to save_model, else `out`."""
        return self.save_model if isinstance(self.save_model, str) else self.out


@dataclass
class BenchOptions:
    """`pyprune-fast bench`.

    Args:
        only: the workloads to run (bench.registry.WORKLOADS); None: every one.
        scale: each workload's tensors shrunk by this factor, in (0, 1].
        repeats: timed calls per implementation, >= 1.
        device: as Options.device.
        memory: also measure each implementation's peak resident memory (CPU only).
        quiet: no progress bar.
    """

    only: list[str] | None = None
    scale: float = 0.1
    repeats: int = 5
    device: str = "auto"
    memory: bool = False
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> BenchOptions:
        """The options of a parsed command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.memory and self.device != "cpu":
            raise UsageError(f"`memory` measures this process's resident memory: CPU only, not {self.device}")
        _at_least({"repeats": self.repeats})
        if not 0 < self.scale <= 1:
            raise UsageError(f"`scale` must be in (0, 1], got {self.scale}")


# Every library parameter the command line has a flag for: the fields of the options objects.
PARAMETERS = frozenset(
    f.name
    for cls in (PruneOptions, ScoreOptions, SensitivityOptions, BenchOptions)
    for f in fields(cls)
    if f.init and f.name != "argv"
)


def flag(name: str) -> str | None:
    """The command line's flag of a library parameter (`spell`), None for a name it has no flag for."""
    return spell(name) if name in PARAMETERS else None
