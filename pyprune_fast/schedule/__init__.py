"""Training-time pruning: the Pruning Block (encoder, gates, decoder) learned with alternate updates."""

from . import pruning_block

__all__ = ["pruning_block"]
