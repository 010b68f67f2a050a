"""N:M masks and 2:4 compression against what users write today (CPU), and the sparse tensor-core
matmul against dense cuBLAS and torch's own 2:4 path (GPU; skipped without one)."""

import pytest
import torch

from benchmarks.conftest import run_case
from pyprune_fast.bench.nm_mask import n_m_case
from pyprune_fast.bench.sparse24 import SPARSE24_SHAPES, compress_case, sparse24_linear_case

_CASES = {}


def cached(factory, *key):
    if key not in _CASES:
        _CASES.clear()
        _CASES[key] = factory(*key)
    return _CASES[key]


@pytest.mark.parametrize("model", ["vit_b_16", "llama_7b_layer"])
@pytest.mark.parametrize("impl", ["ours", "python loop (wanda)", "torch topk"])
def test_n_m_cpu(benchmark, model, impl):
    run_case(benchmark, cached(n_m_case, model, "cpu", torch.float32), impl)


@pytest.mark.parametrize("model", ["vit_b_16", "llama_7b"])
@pytest.mark.parametrize("impl", ["ours", "torch cutlass conversion"])
def test_compress_24_cpu(benchmark, model, impl):
    run_case(benchmark, cached(compress_case, model, "cpu", torch.float16), impl)


@pytest.mark.parametrize("model", ["vit_b_16", "llama_7b_layer"])
@pytest.mark.parametrize("impl", ["ours", "python loop (wanda)", "torch topk"])
def test_n_m_cuda(benchmark, cuda_device, model, impl):
    run_case(benchmark, cached(n_m_case, model, cuda_device, torch.float32), impl, cuda_device)


@pytest.mark.parametrize("model", ["vit_b_16", "llama_7b"])
@pytest.mark.parametrize("impl", ["ours", "torch cutlass conversion"])
def test_compress_24_cuda(benchmark, cuda_device, model, impl):
    run_case(benchmark, cached(compress_case, model, cuda_device, torch.float16), impl, cuda_device)


SHAPES = [shape for shapes in SPARSE24_SHAPES.values() for shape in shapes]
TOKENS = [1, 16, 64, 256, 1024, 2048, 4096, 8192]


@pytest.mark.parametrize("impl", ["ours", "dense F.linear", "torch 2:4 (semi_structured)"])  # fastest: one case each
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_sparse24_linear_cuda(benchmark, cuda_device, dtype, tokens, shape, impl):
    case = cached(sparse24_linear_case, *shape, tokens, dtype, cuda_device)
    if impl not in case.baselines and impl != "ours":
        pytest.skip(f"{impl} is not available for this GPU, dtype or shape")
    run_case(benchmark, case, impl, cuda_device)
