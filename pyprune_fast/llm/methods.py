"""The methods of the block pipeline, all on one protocol (criteria.method.Method), in one registry:

    magnitude   S = |W|                                      (no data; criteria.magnitude)
    wanda       S = |W_ij| · ‖X_j‖₂  (Sun et al. 2024)       ‖X_j‖ over every calibration token (criteria.wanda)
    sparsegpt   OBS weight update (Frantar & Alistarh 2023)  H = 2XᵀX/n, pruned in place (llm.sparsegpt)
    snip, refer, afr, feature_l1                             block-local forms (llm.local)

Each method's default granularity is its paper's: Wanda per output row, the others per layer
(SparseGPT: per block of 128 columns jointly, with exact counts per layer). A method of one's own is a
`Method` (or, scored per Linear from its weight and input statistics, a `LayerMethod`) passed to
`llm.prune(method=...)` as an object, or registered by name with `register_method`."""

from ..criteria.method import METHODS, Block, LayerMethod, Method, get_method, register_method
from .local import BlockLocal
from .sparsegpt import SparseGPT

DEFAULT_METHOD = "wanda"  # llm.prune's and llm.scores' default

# magnitude and wanda registered themselves with the criteria; then the methods of this package
register_method(SparseGPT(), as_criterion=False)
for _name in ("snip", "refer", "afr", "feature_l1"):
    register_method(BlockLocal(_name), as_criterion=False)

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Block",
    "BlockLocal",
    "LayerMethod",
    "Method",
    "SparseGPT",
    "get_method",
    "register_method",
]
