"""The Hopper 2:4 kernel (sparse24_linear_sm90: TMA + wgmma.mma_async.sp) on an H100/H200, against the dense
masked product and the mma.sp kernel; skipped without a compute capability 9.0 GPU and an sm_90a build.
Its layouts are proved without a GPU in tests/test_wgmma_emulation.py."""

import pytest
import torch

from pyprune_fast import ops
from pyprune_fast.ops import sparse24
from tests.conftest import native_or_skip
from tests.test_sparse24 import CUDA_TOLERANCE, cuda_case, dense_expected

pytestmark = pytest.mark.cuda


@pytest.fixture
def hopper():
    native_or_skip("cuda")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute capability 9.0 GPU (H100/H200)")
    why = sparse24._hopper_device(torch.cuda.current_device())
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 64), (256, 512), (4096, 4096), (11008, 4096), (4096, 11008)])
def test_every_tile_and_split_equals_the_dense_product(hopper, dtype, shape, monkeypatch):
    """Tokens 1-16 (decode tile, K split), 17-64, and more (token tails), with bias and each activation;
    the forced choice runs the Hopper kernel or fails."""
    monkeypatch.setenv(sparse24.KERNEL_ENV, "wgmma_sp")
    out, cols = shape
    for tokens in (1, 3, 16, 17, 64, 65, 300, 2048):
        w, x, bias = cuda_case(out, cols, tokens, dtype, seed=tokens)
        values, meta = ops.compress_24(w)
        for activation in (None, "relu", "gelu"):
            y = ops.sparse24_linear(x, values, meta, bias, activation)
            expected = dense_expected(x, w, bias, activation)
            torch.testing.assert_close(y, expected, **CUDA_TOLERANCE[dtype], msg=f"{shape} {tokens} {activation}")


def test_both_kernels_agree_and_the_choice_is_honoured(hopper, monkeypatch):
    w, x, bias = cuda_case(1024, 2048, 77, torch.float16)
    values, meta = ops.compress_24(w)
    monkeypatch.setenv(sparse24.KERNEL_ENV, "mma_sp")
    ampere = ops.sparse24_linear(x, values, meta, bias)
    monkeypatch.setenv(sparse24.KERNEL_ENV, "wgmma_sp")
    hopper_y = ops.sparse24_linear(x, values, meta, bias)
    torch.testing.assert_close(hopper_y, ampere, **CUDA_TOLERANCE[torch.float16])
    torch.testing.assert_close(
        torch.ops.pyprune_fast.sparse24_linear_sm90(x, values, meta, bias, "none"), hopper_y, rtol=0, atol=0
    )
    w64, x64, _ = cuda_case(192, 128, 5, torch.float16)  # out % 128 != 0: the mma.sp kernel's shapes only
    v64, m64 = ops.compress_24(w64)
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.sparse24_linear(x64, v64, m64)
    monkeypatch.setenv(sparse24.KERNEL_ENV, "auto")
    torch.testing.assert_close(
        ops.sparse24_linear(x64, v64, m64), dense_expected(x64, w64, None, None), **CUDA_TOLERANCE[torch.float16]
    )


def test_gradients_and_layouts(hopper):
    w, x, bias = cuda_case(256, 512, 40, torch.bfloat16)
    values, meta = ops.compress_24(w)
    x3 = x.view(4, 10, 512).clone().requires_grad_(True)
    y = ops.sparse24_linear(x3, values, meta, bias, "gelu")
    y.float().sum().backward()
    xr = x3.detach().clone().requires_grad_(True)
    dense_expected(xr, w, bias, "gelu").float().sum().backward()
    torch.testing.assert_close(x3.grad, xr.grad, **CUDA_TOLERANCE[torch.bfloat16])
    misaligned = torch.empty(40 * 512 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(40, 512).copy_(x)
    torch.testing.assert_close(
        ops.sparse24_linear(misaligned, values, meta),
        dense_expected(x, w, None, None),
        **CUDA_TOLERANCE[torch.bfloat16],
    )
