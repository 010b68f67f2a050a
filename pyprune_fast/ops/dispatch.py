"""The one dispatch rule of every op: the compiled kernel (`torch.ops.pyprune_fast.<op>`) when the
loaded library has one for the tensors' device (its type; on a GPU, its compute capability), else the
pure-PyTorch definition in `reference` (same arguments, same results). Also where op modules hook in
their fake kernels and autograd formulas, registered once the library has defined the ops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _extension, reference


def native(op: str, tensors: Sequence[Tensor] | Tensor) -> bool:
    """Whether `op`'s compiled kernel serves these tensors (the first one's device decides): the library
    has a kernel for its device type and, on a GPU, an image for its compute capability (else the reference
    path serves it, after one warning; see _extension.cuda_kernel_fits).

    Args:
        op: the op's name.
        tensors: the tensors it would run on.

    Returns:
        True when the compiled kernel serves them.
    """
    first = tensors if isinstance(tensors, Tensor) else (tensors[0] if tensors else None)
    if first is None or not _extension.native_available(op, first.device.type):
        return False
    return first.device.type != "cuda" or _extension.cuda_kernel_fits(op, first.device)


def call(op: str, on: Sequence[Tensor] | Tensor, *args):
    """`op(*args)` by the compiled kernel when it serves the tensors `on`, else by `reference.<op>`.

    Args:
        op: the op's name.
        on: the tensors whose device decides.
        *args: the op's arguments.

    Returns:
        What the op returns.
    """
    if native(op, on):
        return getattr(torch.ops.pyprune_fast, op)(*args)
    return getattr(reference, op)(*args)


def when_loaded(register: Callable[[], None]) -> Callable[[], None]:
    """Decorator for an op module's registration function (torch.library.register_fake /
    register_autograd calls): run once the compiled library is loaded, never for the reference path.

    Args:
        register: the registration function.

    Returns:
        `register`, unchanged.
    """
    return _extension.after_load(register)
