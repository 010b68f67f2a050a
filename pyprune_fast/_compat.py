"""The one place that touches private PyTorch names. Each has no public equivalent in the torch
versions we support (2.6 and newer); when torch grows one, only this file changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# Every BatchNorm1d/2d/3d (and SyncBatchNorm, LazyBatchNorm*) derives from this base; torch exports no
# public name for "any BatchNorm".
BatchNorm = nn.modules.batchnorm._BatchNorm


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the operator `op` ("namespace::name") has a kernel registered for `dispatch_key`
    ("CPU", "CUDA"). torch.ops exposes the op but not which backends implement it."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))


def library_ops(namespace: str) -> list[str]:
    """Every operator registered under `namespace`, as "namespace::name" (overloads other than the
    default are listed with their suffix). torch.ops namespaces do not list their ops."""
    prefix = f"{namespace}::"
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def dense_to_cutlass_24() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """torch's own conversion of a 2:4 dense weight to CUTLASS's compressed values and metadata, in
    torch ops (what `to_sparse_semi_structured` runs for the CUTLASS backend); the benchmark baseline
    for our compress_24. Private in torch: imported on call so that the library never needs it."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass


def foreach_add(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """xs[i] + ys[i] for every i, by torch's multi-tensor kernel (one launch for the whole list on
    CUDA). torch has no public name for its `_foreach_*` ops.

    Args:
        xs, ys: tensors of equal shapes, pairwise.

    Returns:
        The sums, new tensors.
    """
    return list(torch._foreach_add(xs, ys))


def foreach_mul_(xs: list[Tensor], scalar: float) -> None:
    """xs[i] *= scalar for every i, in place, by torch's multi-tensor kernel.

    Args:
        xs: the tensors, changed in place.
        scalar: the factor.
    """
    torch._foreach_mul_(xs, scalar)


def prune_amount(amount: int | float, competing: int) -> int:
    """How many entries `torch.nn.utils.prune` prunes for `amount`, checked as torch checks it: torch's
    own helpers, private, so that `integrations.torch_prune` rounds and refuses exactly as torch does.

    Args:
        amount: a fraction in [0, 1] (rounded as torch rounds it) or a count.
        competing: the entries that compete (those not pruned yet).

    Returns:
        The number of entries to prune.

    Raises:
        ValueError: a count larger than `competing` (torch's message).
    """
    from torch.nn.utils import prune

    count = prune._compute_nparams_toprune(amount, competing)
    prune._validate_pruning_amount(count, competing)
    return count
