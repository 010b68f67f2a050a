"""pyprune_fast: fast pruning criteria, masks and sparse kernels for large vision transformers and LLMs.

import pyprune_fast as ppf
scores = ppf.score(model, "snip", batches, loss_fn=loss)
masks = ppf.masks.global_unstructured(scores, sparsity=0.9)
ppf.apply_masks(model, masks)
ppf.save_masks("masks.safetensors", masks, {"criterion": "snip", "sparsity": 0.9})
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from . import criteria, distributed, masks, ops, schedule, sparse, structured
from ._version import __version__ as __version__
from .errors import UsageError
from .io import load_masks, mask_metadata, save_masks
from .masks import apply_masks

__all__ = [
    "UsageError",
    "apply_masks",
    "backend_info",
    "criteria",
    "distributed",
    "load_masks",
    "mask_metadata",
    "masks",
    "ops",
    "save_masks",
    "schedule",
    "score",
    "sparse",
    "structured",
]


def backend_info() -> dict:
    """What is loaded: the backend ('native' or 'reference'), how the library was built, per op which
    kernels are registered (`ops`: {op: {"cpu": bool, "cuda": bool}}; `cpu_ops`/`cuda_ops`: every op
    has one), the CUDA archs they were compiled for, and why not, if not. Loads (or builds) the
    compiled library on first call.

    Returns:
        {"backend": "native" | "reference", "ops": {op: {"cpu": bool, "cuda": bool}}, "cpu_ops",
        "cuda_ops", "cuda_archs", ...}: what was loaded, and why not where it was not.
    """
    from . import _extension

    return dict(_extension.state())


def score(model: nn.Module, criterion: str, data: Iterable | None = None, **kwargs) -> dict[str, Tensor]:
    """Scores `model` with the named criterion of the registry (`criteria.CRITERIA`), weight or
    channel kind; the same as `criteria.<criterion>(model, data, **kwargs)`. Weight criteria return
    {parameter name: score shaped like it}, channel criteria {layer name: (C,) scores}.
    `group=` (a torch.distributed ProcessGroup): data-parallel calibration, each rank passing its share
    of the batches; the sums over batches are summed over the ranks before the scores are formed (see
    `pyprune_fast.distributed`).

    Args:
        model: the model to score.
        criterion: a name of `criteria.CRITERIA` ("snip", "taylor", ...).
        data: calibration batches, `(inputs, targets)` or bare inputs (None for data-free criteria).
        **kwargs: the criterion's options and the shared ones (loss_fn, params, layers, num_batches,
            forward, group).

    Returns:
        {parameter name: scores shaped like it} (weight criteria) or {layer name: (C,) scores}
        (channel criteria); higher = more important.

    Raises:
        ValueError: an unknown criterion, or what the criterion refuses.
    """
    if criterion not in criteria.CRITERIA:
        group = kwargs.get("group")
        comm = None if group is None else distributed.Communicator(group)
        with distributed.session(comm):  # refused on every rank alike, none left waiting
            valid = ", ".join(sorted(criteria.CRITERIA))
            raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {valid}")
    return criteria.CRITERIA[criterion](model, data, **kwargs)
