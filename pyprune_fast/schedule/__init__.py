"""Pruning schedules: fine-tuning with masks kept, iterative pruning over rounds, per-layer
sensitivity analysis and the sparsity allocation it predicts; and training-time pruning with the
Pruning Block (encoder, gates, decoder) learned with alternate updates (`pruning_block`)."""

from . import pruning_block
from .finetune import finetune
from .iterative import SCHEDULES, IterativeReport, Round, iterative, round_sparsity
from .sensitivity import SensitivityReport, allocate, allocation_masks, predicted_loss, sensitivity, units_of

__all__ = [
    "SCHEDULES",
    "IterativeReport",
    "Round",
    "SensitivityReport",
    "allocate",
    "allocation_masks",
    "finetune",
    "iterative",
    "predicted_loss",
    "pruning_block",
    "round_sparsity",
    "sensitivity",
    "units_of",
]
