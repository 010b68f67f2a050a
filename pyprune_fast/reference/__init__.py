"""Pure-PyTorch definitions of every op: the specification the compiled kernels are tested against,
and the path used when `PYPRUNE_FAST_BACKEND=reference` or no compiled library is available. One
module per op family; `mma_sp` emulates the sparse tensor-core instructions of the CUDA 2:4 matmul
(imported on demand: `from pyprune_fast.reference import mma_sp`).
"""

from .common import rows_of, sortable
from .nm_mask import n_m, nm_mask
from .nm_swap import nm_swap_gains
from .saliency import STATS_FIELDS, saliency, saliency_accumulate_, stats_of
from .select import (
    RADIX_BINS,
    RADIX_DIGIT_BITS,
    kth_smallest_counts,
    layerwise_masks,
    order_keys,
    per_row_masks,
    prune_lowest,
    radix_histogram,
    radix_width,
    threshold_masks,
)
from .sparse24 import compress_24, decompress_24, pack_meta, sparse24_linear, unpack_meta
from .svd_mean import ldexp, scale_exponents, scale_matrices, svd_mean, svd_mean_list

__all__ = [
    "RADIX_BINS",
    "RADIX_DIGIT_BITS",
    "STATS_FIELDS",
    "compress_24",
    "decompress_24",
    "kth_smallest_counts",
    "layerwise_masks",
    "ldexp",
    "n_m",
    "nm_mask",
    "nm_swap_gains",
    "order_keys",
    "pack_meta",
    "per_row_masks",
    "prune_lowest",
    "radix_histogram",
    "radix_width",
    "rows_of",
    "saliency",
    "saliency_accumulate_",
    "scale_exponents",
    "scale_matrices",
    "sortable",
    "sparse24_linear",
    "stats_of",
    "svd_mean",
    "svd_mean_list",
    "threshold_masks",
    "unpack_meta",
]
