"""Pruning criteria, one registry (registry.py): every criterion is called
`NAME(model, data=None, *, loss_fn=None, params=None, layers=None, num_batches=None, forward=None,
**options)`; higher score = kept. Weight criteria return {parameter name: float32 score shaped like
the parameter}; channel criteria (criteria.channel) return {layer name: (C,) float32 score}.
`CRITERIA[name]` is each one, with `.kind` ("weight" or "channel") and `.needs` (what it needs
besides the weights: "data", "loss", "input").

Methods of the block pipeline (criteria.method: `Method`, `LayerMethod`, `register_method`, `METHODS`)
share this registry: a LayerMethod registered by name is also a weight criterion here.

Every module of this package is imported here, so that a criterion registers itself by being in a
file of the package (criteria.snip, criteria.taylor, ... are the registered functions)."""

import importlib
import pkgutil

from .method import METHODS, Block, LayerMethod, Method, get_method, register_method
from .registry import CRITERIA, NEEDS, criterion, of_kind

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
globals().update(CRITERIA)

__all__ = [
    "CRITERIA",
    "METHODS",
    "NEEDS",
    "Block",
    "LayerMethod",
    "Method",
    "criterion",
    "get_method",
    "of_kind",
    "register_method",
    *CRITERIA,
]
