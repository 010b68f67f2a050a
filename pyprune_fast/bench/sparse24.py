"""2:4 semi-structured sparsity: compress_24 against torch's own conversion to the CUTLASS layout, and
sparse24_linear against dense F.linear and torch's 2:4 path."""

from __future__ import annotations

import torch

from .. import ops
from .harness import Case, scaled
from .nm_mask import vectorized_n_m

# Weight shapes [out, in] of the 2:4 benchmarks: ViT-B/16's MLP and LLaMA-7B's attention and MLP.
SPARSE24_SHAPES = {"vit_b_16": [(3072, 768), (768, 3072)], "llama_7b": [(4096, 4096), (11008, 4096), (4096, 11008)]}
# What compress_case's shapes must be multiples of: ours (compress_24) takes rows in multiples of 16 and
# columns of 32; torch's CUTLASS conversion, fp16/bf16/fp32 rows of 32 (int8: 16) and columns of 16.
# Scaled rows are multiples of both; the columns (not scaled) are of every model above.
COMPRESS_ROW_MULTIPLE = 32
COMPRESS_COL_MULTIPLE = 32


def random_24_weight(out: int, cols: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """A random weight made 2:4 by magnitude."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out, cols, generator=g) / cols**0.5).to(device=device, dtype=dtype)
    return w * vectorized_n_m({"w": w.abs()})["w"]


def compress_case(
    model: str = "llama_7b", device: str = "cpu", dtype: torch.dtype = torch.float16, scale: float = 1.0
) -> Case:
    """compress_24 of 2:4 weights at the model's Linear shapes against torch's own conversion to the
    CUTLASS layout (what to_sparse_semi_structured runs, in torch ops); scale < 1 shrinks the rows (to
    multiples of COMPRESS_ROW_MULTIPLE, which both take)."""
    from .._compat import dense_to_cutlass_24

    sparse_semi_structured_from_dense_cutlass = dense_to_cutlass_24()

    shapes = [(scaled(o, scale, COMPRESS_ROW_MULTIPLE), i) for o, i in SPARSE24_SHAPES[model]]
    if any(i % COMPRESS_COL_MULTIPLE for _, i in shapes):
        raise ValueError(f"compress_case: {model}'s columns must be multiples of {COMPRESS_COL_MULTIPLE}")
    weights = [random_24_weight(o, i, dtype, device, seed=k) for k, (o, i) in enumerate(shapes)]
    n = sum(w.numel() for w in weights)
    return Case(
        group=f"compress_24 {model} {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: [ops.compress_24(w) for w in weights],
        baselines={"torch cutlass conversion": lambda: [sparse_semi_structured_from_dense_cutlass(w) for w in weights]},
        elements=n,
        bytes_moved=n * weights[0].element_size() * 3 // 2 + n // 8,
    )


def sparse24_linear_case(out: int, cols: int, tokens: int, dtype: torch.dtype, device: str = "cuda") -> Case:
    """ops.sparse24_linear (x [tokens, in] @ Wᵀ + b) against dense F.linear (cuBLAS on CUDA) and torch's
    own 2:4 path (F.linear with to_sparse_semi_structured(W): cuSPARSELt or CUTLASS), same inputs."""
    from torch.sparse import to_sparse_semi_structured

    w = random_24_weight(out, cols, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, cols, generator=g).to(device=device, dtype=dtype)
    bias = torch.randn(out, generator=g).to(device=device, dtype=dtype)
    values, meta = ops.compress_24(w)
    baselines = {"dense F.linear": lambda: torch.nn.functional.linear(x, w, bias)}
    try:
        w_torch = to_sparse_semi_structured(w)
        torch.nn.functional.linear(x, w_torch, bias)
        baselines["torch 2:4 (semi_structured)"] = lambda: torch.nn.functional.linear(x, w_torch, bias)
    except (RuntimeError, NotImplementedError, ValueError):
        pass  # torch's 2:4 path does not cover this GPU, dtype or shape: compared against dense only
    flops = 2 * tokens * out * cols
    return Case(
        group=f"sparse24_linear {out}x{cols} t{tokens} {str(dtype).replace('torch.', '')} {device}",
        ours=lambda: ops.sparse24_linear(x, values, meta, bias),
        baselines=baselines,
        elements=flops,
        bytes_moved=(out * cols // 2 + tokens * (cols + out)) * x.element_size() + out * cols // 8,
        extra={"tokens": tokens, "out": out, "in": cols},
    )
