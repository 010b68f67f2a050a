"""N:M semi-structured keep-masks of many tensors in one fused pass.

CUDA graphs: on CUDA the kernels read a table of pointers copied from pinned host memory on every call,
which a graph replay cannot repeat, so these ops raise during a capture (torch.cuda.graph, torch.compile's
mode="reduce-overhead"); call them outside the captured region."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import SCORE_TYPES, as_list, check_dtypes, check_n_m, check_same_device
from .dispatch import call, when_loaded

__all__ = ["nm_mask"]


def nm_mask(scores: Sequence[Tensor], n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """N:M keep-flags of every tensor of a list in one fused pass: groups of m consecutive entries of
    each (row-major) tensor, the n highest of each group kept,

        rank_i = #{j : s_j > s_i} + #{j < i : s_j = s_i},   keep_i = rank_i < n

    (ties: the lower index is kept; -0.0 = 0.0; ±inf ordinary). Returns bool masks shaped like the
    scores and the number of NaN scores of each tensor (int64 [len(scores)], on the scores' device;
    masks.n_m refuses NaN). float32/float16/bfloat16/float64 scores, any strides.

    Args:
        scores: the score tensors, each row's length divisible by m.
        n: entries kept in each group.
        m: the group size.

    Returns:
        (bool keep-masks shaped like the scores, NaN count per tensor).
    """
    scores = as_list("scores", scores)
    check_dtypes("scores", scores, SCORE_TYPES)
    n, m = check_n_m(n, m)
    for i, s in enumerate(scores):
        if s.numel() % m:
            raise ValueError(f"scores[{i}] has {s.numel()} entries (shape {tuple(s.shape)}), not a multiple of m={m}")
    check_same_device({"scores": scores})
    if not scores:
        return [], torch.zeros(0, dtype=torch.int64)
    keep, nan = call("nm_mask", scores, scores, n, m)
    return list(keep), nan


def _fake_nm_mask(scores, n, m):
    device = scores[0].device if scores else torch.device("cpu")
    return [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in scores], torch.empty(
        len(scores), dtype=torch.int64, device=device
    )


@when_loaded
def _register() -> None:
    torch.library.register_fake("pyprune_fast::nm_mask", _fake_nm_mask)
