"""Each command's options as one object, validated when made: `PruneOptions`, `ScoreOptions`,
`SensitivityOptions`, `BenchOptions`. Fields carry the names of the library parameters they feed
(`batch_size` → `runner.prune`, `llm_runner.prune`; the flag is `--batch-size`); a refused value is a
UsageError naming those parameters, which the command line spells as its flags (`spell`). Nothing here
loads a model: every rule that the options alone decide is checked before any work starts, once."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from ...errors import UsageError
from .. import zoo
from ..refinement import Refinement

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
    refinement: Refinement = field(init=False, default_factory=Refinement)
    criteria: list[str] = field(init=False, default_factory=list)
    sparsities: list[float] = field(init=False, default_factory=list)
    methods: list[str] = field(init=False, default_factory=list)
    targets: list[float | str] = field(init=False, default_factory=list)

    def validate(self) -> None:
        super().validate()
        self.refinement = Refinement(self.schedule, self.rounds, self.finetune, self.finetune_lr, self.batch_size)
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
        from .. import llm_runner, runner

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

        self.granularity = self.granularity or "global"
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
