"""How a prune run reaches each target and what follows it, checked in this one place: the schedule
(one-shot, or iterative over `rounds` rounds) and the fine-tuning after it (`finetune` steps)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

SCHEDULES = ("one-shot", "iterative")  # masks from one scoring, or re-scored over `rounds` rounds
FINETUNE_LR = 1e-4


def _int(value: object, name: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"`{name}` must be an int, got {value!r}")
    if value < least:
        raise UsageError(f"`{name}` must be >= {least}, got {value}")


@dataclass(frozen=True)
class Refinement:
    """The schedule and fine-tuning of a prune run, validated when made.

    Args:
        schedule: "one-shot" (masks from one scoring) or "iterative" (`rounds` rounds, each re-scoring
            the model as pruned so far, the exponential schedule to an exact final sparsity).
        rounds: rounds of the iterative schedule, >= 1.
        finetune: AdamW steps after pruning, the masks kept, >= 0 (0: none).
        finetune_lr: the fine-tuning learning rate.
        batch_size: sequences a fine-tuning step of a causal LM, >= 1.

    Raises:
        UsageError: naming the parameter out of range.
    """

    schedule: str = "one-shot"
    rounds: int = 1
    finetune: int = 0
    finetune_lr: float = FINETUNE_LR
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"`schedule` must be one of {SCHEDULES}, got {self.schedule!r}")
        _int(self.rounds, "rounds", 1)
        _int(self.finetune, "finetune", 0)
        _int(self.batch_size, "batch_size", 1)

    @property
    def iterative(self) -> bool:
        """Whether each target is reached over rounds."""
        return self.schedule == "iterative"

    @property
    def label(self) -> str:
        """The schedule as the report names it."""
        return self.schedule if not self.iterative else f"iterative, {self.rounds} rounds (exponential)"
