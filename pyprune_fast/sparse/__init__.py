"""2:4 semi-structured sparsity: weights compressed in the layout of the sparse tensor cores
(compress_24 / decompress_24), our own sparse matmul (sparse24_linear), and SparseLinear / sparsify to
put them into a model.

    from pyprune_fast import sparse
    names = sparse.sparsify(model.half().cuda())          # every eligible Linear: 2:4 by |W|, in place
    names = sparse.sparsify(model, scores=ppf.score(model, "wanda", batches))   # 2:4 by any criterion
"""

from ..ops import compress_24, decompress_24, sparse24_linear
from .linear import SparseLinear, sparsify

__all__ = ["SparseLinear", "compress_24", "decompress_24", "sparse24_linear", "sparsify"]
