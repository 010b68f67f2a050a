"""The Hopper 2:4 kernel (csrc/cuda/sparse24_linear_sm90.cu) proved on the host: its TMA boxes, swizzles,
matrix descriptors, metadata reads and wgmma.mma_async.sp steps, emulated from the PTX ISA's definitions
(pyprune_fast/reference/wgmma_sp.py), compute the dense product of the decompressed 2:4 weight."""

import pytest
import torch
import torch.nn.functional as F

from pyprune_fast import ops
from pyprune_fast.ops import sparse24
from pyprune_fast.reference import wgmma_sp as emu
from tests.test_sparse24 import random_24

DTYPES = [torch.float16, torch.bfloat16]


def integers(shape, seed, low=-3, high=4):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)).float()


def test_descriptor_fields():
    desc = emu.descriptor(0x1230, 16, 1024, emu.MODE_128B)
    assert desc == 0x123 | 1 << 16 | (1024 >> 4) << 32 | 1 << 62
    assert emu._decode(desc) == (0x1230, 1024, emu.MODE_128B)
    assert emu.descriptor(0x40000 + 0x200, 16, 512, emu.MODE_64B) & 0x3FFF == 0x20  # 18-bit shared addresses


@pytest.mark.parametrize("mode", [emu.MODE_128B, emu.MODE_64B, 3])
def test_swizzle_permutes_16_byte_chunks_within_rows_of_8(mode):
    address = torch.arange(4096)
    swizzled = emu.swizzle(address, mode)
    assert torch.equal(swizzled.sort().values, address)  # a permutation ...
    assert torch.equal(swizzled % 16, address % 16)  # ... of whole 16-byte chunks ...
    assert torch.equal(swizzled // 1024, address // 1024)  # ... inside each 1024-byte atom
    assert not torch.equal(swizzled, address)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "cols"), [(emu.MODE_128B, 64), (emu.MODE_64B, 32)])
def test_tma_box_read_back_through_descriptors(dtype, mode, cols):
    """A box written by the TMA emulation and read by K-major descriptors at each k-step offset (as the
    kernel advances them) is the tensor's box; rows and columns past the tensor's end read as zeros."""
    width = emu.SWIZZLE_WIDTH[mode]
    t = integers((50, cols + 8), 1, -100, 100).to(dtype)
    smem = torch.zeros(16384, dtype=torch.uint8)
    moved = emu.tma_load_2d(smem, 2048, t, 8, 0, (cols, 64), mode)
    assert moved == 64 * width
    expected = torch.zeros(64, cols, dtype=torch.float64)
    expected[:50] = t[:, 8:].double()
    for step in range(width // 32):  # k-steps of 32 bytes
        got = emu.read_k_major(smem, emu.descriptor(2048 + 32 * step, 16, 8 * width, mode), 64, 16, dtype)
        assert torch.equal(got, expected[:, 16 * step : 16 * step + 16])
    wrong = emu.read_k_major(smem, emu.descriptor(2048, 16, 8 * width, 3), 64, 16, dtype)  # another swizzle
    assert not torch.equal(wrong, expected[:, :16])


def fragments_of(product):
    """D [64, n] as the accumulator registers of a warpgroup, [4, 32, n / 2]."""
    n = product.shape[1]
    warp, lane, reg = torch.arange(4).view(4, 1, 1), torch.arange(32).view(1, 32, 1), torch.arange(n // 2)
    return product[16 * warp + lane // 4 + 8 * ((reg // 2) % 2), 8 * (reg // 4) + 2 * (lane % 4) + reg % 2]


def stage_operands(w, x, dtype):
    """compress_24(w) for a 64 x 64 weight and x [n, 64] loaded as the kernel loads one stage (A at 0,
    B at 8192); returns smem and the metadata registers of both k32 steps, [2, 4, 32]."""
    values, meta = ops.compress_24(w.to(dtype))
    smem = torch.zeros(8192 + 128 * x.shape[0], dtype=torch.uint8)
    emu.tma_load_2d(smem, 0, values, 0, 0, (32, 64), emu.MODE_64B)
    emu.tma_load_2d(smem, 8192, x.to(dtype), 0, 0, (64, x.shape[0]), emu.MODE_128B)
    lanes = torch.arange(32)
    words = meta.long() & 0xFFFFFFFF  # [4 row tiles, 2 k32 steps, 16]
    e = torch.stack([words[:, step, 2 * (lanes >> 2) + (lanes & 1)] for step in range(2)])
    return smem, e


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [16, 64, 128])
@pytest.mark.parametrize("selector", [0, 1])
def test_one_stage_of_wgmma_sp_is_the_dense_product(dtype, n, selector):
    w, _ = random_24(64, 64, seed=n + selector, integer=True)
    x = integers((n, 64), n)
    smem, e = stage_operands(w, x, dtype)
    d = torch.zeros(4, 32, n // 2, dtype=torch.float64)
    for step in range(2):
        a = emu.descriptor(32 * step, 16, 512, emu.MODE_64B)
        b = emu.descriptor(8192 + 64 * step, 16, 1024, emu.MODE_128B)
        d = emu.wgmma_sp(d, a, b, e[step], dtype, smem, selector)
    assert torch.equal(d, fragments_of(w.double() @ x.double().T))


def test_wrong_descriptors_or_metadata_do_not_compute_the_product():
    """The proof has teeth: a wrong stride, k-step offset, swizzle, or metadata of another warp gives
    another result (or an unordered pair, caught)."""
    w, _ = random_24(64, 64, seed=3, integer=True)
    x = integers((16, 64), 4)
    smem, e = stage_operands(w, x, torch.float16)
    expected = fragments_of(w.double()[:, :32] @ x.double()[:, :32].T)
    a, b = emu.descriptor(0, 16, 512, emu.MODE_64B), emu.descriptor(8192, 16, 1024, emu.MODE_128B)
    zero = torch.zeros(4, 32, 8, dtype=torch.float64)
    assert torch.equal(emu.wgmma_sp(zero, a, b, e[0], torch.float16, smem), expected)
    wrong = [
        (emu.descriptor(0, 16, 1024, emu.MODE_64B), b, e[0]),  # A's 8-row groups 1024 bytes apart
        (emu.descriptor(0, 16, 512, emu.MODE_128B), b, e[0]),  # A read with B's swizzle
        (a, emu.descriptor(8192 + 32, 16, 1024, emu.MODE_128B), e[0]),  # half a k-step into B
        (a, b, e[0].roll(1, 0)),  # every warp reads the metadata of the previous one
        (a, b, e[1]),  # the metadata of the other k32 step
    ]
    for wa, wb, we in wrong:
        try:
            got = emu.wgmma_sp(zero, wa, wb, we, torch.float16, smem)
        except ValueError:
            continue
        assert not torch.equal(got, expected)


def test_unordered_metadata_is_undefined():
    w, _ = random_24(64, 64, seed=5, integer=True)
    smem, e = stage_operands(w, integers((16, 64), 6), torch.float16)
    a, b = emu.descriptor(0, 16, 512, emu.MODE_64B), emu.descriptor(8192, 16, 1024, emu.MODE_128B)
    with pytest.raises(ValueError, match="not ordered"):
        emu.wgmma_sp(torch.zeros(4, 32, 8), a, b, e[0] & ~0xF, torch.float16, smem)  # nibble 0b0000


@pytest.mark.parametrize("tile", emu.TILES, ids=lambda t: f"n{t.bn}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sms", [1, 132])
def test_emulated_kernel_equals_the_dense_product(tile, dtype, sms):
    """The whole kernel (pipeline stages, both consumers, split-K, token tails, bias, ReLU) on integer
    data (exact in float64)."""
    out, cols = 256, 512
    w, _ = random_24(out, cols, seed=tile.bn, integer=True)
    values, meta = ops.compress_24(w.to(dtype))
    tokens = tile.bn + 3 if tile.bn < 128 else 131
    x = integers((tokens, cols), tile.bn + sms).to(dtype)
    bias = integers((out,), 7, -9, 10).to(dtype)
    if sms > 1:
        assert emu._splits(tokens, out, cols // emu.BK, tile, sms) == 2  # K split in two
    y = emu.emulate_sparse24_linear_sm90(x, values, meta, bias, "relu", tile, sms)
    assert torch.equal(y, torch.relu(F.linear(x.double(), w.double(), bias.double())))


def test_decode_splits_k_until_the_gpu_is_full():
    """One token on a 4096 x 4096 layer: 32 row tiles, K split 5 ways for 132 SMs; and the emulated
    decode tile with its K split 4 ways equals the product (GELU, random floats)."""
    decode = emu.TILES[0]
    splits = emu._splits(1, 4096, 4096 // emu.BK, decode, 132)
    assert splits == 5 and splits * 32 >= 132
    w, _ = random_24(128, 1024, seed=9)
    values, meta = ops.compress_24(w.half())
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(10)).half()
    assert emu._splits(3, 128, 1024 // emu.BK, decode, 132) == 4
    y = emu.emulate_sparse24_linear_sm90(x, values, meta, None, "gelu", decode)
    expected = F.gelu(F.linear(x.double(), w.half().double()))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_kernel_choice_is_validated(monkeypatch):
    w, _ = random_24(128, 64, seed=1)
    values, meta = ops.compress_24(w)
    monkeypatch.setenv(sparse24.KERNEL_ENV, "tensor_cores")
    with pytest.raises(ValueError, match="PYPRUNE_FAST_SPARSE24_KERNEL must be one of"):
        ops.sparse24_linear(torch.randn(2, 64), values, meta)
    monkeypatch.setenv(sparse24.KERNEL_ENV, "wgmma_sp")  # CPU tensors: the CPU path, whatever the choice
    torch.testing.assert_close(ops.sparse24_linear(torch.ones(2, 64), values, meta), torch.ones(2, 64) @ w.T)


@pytest.mark.parametrize(
    ("capability", "archs", "why"),
    [
        ((9, 0), "8.0+PTX;9.0a", None),
        ((9, 0), "8.0;9.0+PTX", "without 9.0a"),  # the sm_90 image holds the kernel's trap only
        ((8, 0), "8.0+PTX;9.0a", "needs 9.0"),
        ((10, 0), "8.0+PTX;9.0a", "needs 9.0"),  # wgmma does not exist on Blackwell
    ],
)
def test_hopper_kernel_is_chosen_for_9_0_with_an_sm_90a_build(monkeypatch, capability, archs, why):
    from tests.test_backend import fake_gpu

    fake_gpu(monkeypatch, capability, archs)
    sparse24._hopper_device.cache_clear()
    try:
        got = sparse24._hopper_device(0)
    finally:
        sparse24._hopper_device.cache_clear()
    assert got is None if why is None else why in got


def test_emulator_constants_are_the_kernels():
    """The emulator mirrors csrc/cuda/sparse24_linear_sm90.cu: tile shapes, stage geometry, descriptors."""
    import re
    from pathlib import Path

    source = (Path(__file__).parents[1] / "csrc" / "cuda" / "sparse24_linear_sm90.cu").read_text()
    tiles = re.findall(r"using \w+Tile = Config<(\d+), (\d+)>;", source)
    assert [emu.Tile(int(n), int(s)) for n, s in tiles] == list(emu.TILES)
    assert f"constexpr int kBK = {emu.BK};" in source and f"constexpr int kBM = {emu.BM};" in source
    assert f"constexpr int kConsumers = {emu.CONSUMERS};" in source
    for call in (
        "wgmma::descriptor(a, 16, 8 * 64, wgmma::k64B)",
        "wgmma::descriptor(b, 16, 8 * 128, wgmma::k128B)",
        "wgmma::descriptor(a + 32, 16, 8 * 64, wgmma::k64B)",
        "wgmma::descriptor(b + 64, 16, 8 * 128, wgmma::k128B)",
        "(c * 4 + warp) * 2 * kTileWords + 2 * (lane >> 2) + (lane & 1)",
        "kt * kBK / 2, m0 / kTileRows",
        "CU_TENSOR_MAP_SWIZZLE_64B",
        "CU_TENSOR_MAP_SWIZZLE_128B",
    ):
        assert call in " ".join(source.split()), call
