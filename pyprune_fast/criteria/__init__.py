"""Pruning criteria: `NAME(model, data=None, *, loss_fn=None, params=None, layers=None,
num_batches=None, forward=None, **options) -> {parameter name: float32 score}`; higher = kept.
Channel criteria (one score per output channel, keyed by layer name) live in `criteria.channel`."""

from . import channel
from ._api import CRITERIA
from .feature import afr, feature_l1, refer
from .gradient import grasp, obd, snip
from .magnitude import magnitude
from .synflow import synflow
from .wanda import wanda

__all__ = [
    "CRITERIA",
    "afr",
    "channel",
    "feature_l1",
    "grasp",
    "magnitude",
    "obd",
    "refer",
    "snip",
    "synflow",
    "wanda",
]
