"""Every fused op, one module per family: its public function(s) with their argument checks, its
fake (meta) kernel and autograd formula, together. Each call runs the compiled kernel
(`torch.ops.pyprune_fast.*`, csrc/) when one serves the tensors' device, else the pure-PyTorch
definition in `pyprune_fast.reference` (see `dispatch`).

    saliency     saliency, saliency_accumulate_, Stats     fused |g ⊙ w| (+ statistics)
    select       kth_smallest, radix_histogram; mask blocks exact radix select over many tensors
    nm_mask      nm_mask                                    N:M keep-masks
    nm_swap      nm_swap_gains                              kept-score gains of N:M channel swaps
    sparse24     compress_24, decompress_24, sparse24_linear  2:4 layout and sparse matmul
    svd_mean     svd_mean, svd_mean_list                    mean singular value, differentiable
    checks       argument checks shared with masks and sparse

A new op of a family goes into that family's module and its `__all__`; a new family is one module
and one import line here.
"""

from .checks import *  # noqa: F403 - each module's __all__ is its public API
from .nm_mask import *  # noqa: F403
from .nm_swap import *  # noqa: F403
from .saliency import *  # noqa: F403
from .select import *  # noqa: F403
from .sparse24 import *  # noqa: F403
from .svd_mean import *  # noqa: F403
