"""Host emulation of the Hopper path of `ops.sparse24_linear` (csrc/cuda/sparse24_linear_sm90.cu), from the
documented semantics of the instructions it uses. Without a GPU this is the proof that compress_24's
metadata, the kernel's TMA boxes, shared-memory offsets, matrix descriptors and fragment reads compute
act(x @ Wᵀ + b); tests/test_wgmma_emulation.py checks it against the dense product.

Shared memory is a byte array; the operands keep their 16-bit encodings and the metadata its 32-bit
words, so every offset the kernel computes is an offset here.

Swizzle (PTX ISA 9.7.15.5.1 "Shared memory matrix layout", the TMA swizzle modes of
cuTensorMapEncodeTiled): for a mode of width W in {32, 64, 128} bytes, the 16-byte chunk bits 4.. of a
shared-memory address are XOR-ed with its bits 7..; W = 128 uses three bits, 64 two, 32 one. Buffers are
1024-byte aligned, so the pattern of an address depends on its offset alone.

TMA, `cp.async.bulk.tensor.2d.shared::cluster.global.tile` (9.7.9.25.5.1): the box of box_rows rows x
box_cols elements at coordinates (c0 innermost, c1) lands row after row, each row box_cols x element bytes
(for a swizzled map at most W), every byte at its swizzled address; elements outside the tensor are
zeros.

Matrix descriptor (9.7.15.5.1): start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29,
stride byte offset >> 4 in 32-45, swizzle mode in 62-63 (1: 128 B, 2: 64 B, 3: 32 B). A K-major swizzled
operand of R rows reads element (r, byte b of the row's K) at the swizzled address of
start + (r // 8) * stride + (r % 8) * W + b; the leading offset is unused while K fits in one row of W bytes.

`wgmma.mma_async.sp.sync.aligned.m64nNk32.f32.{f16,bf16}` (9.7.15.6): D[64 x N] += A[64 x 32] · B[32 x N]
with A 2:4-sparse and given as its 64 x 16 kept values (a K-major descriptor), B given as N rows of 32 K
values (K-major); metadata: warp w of the warpgroup covers rows 16w..16w+15, and its lane 4g + 2·sel + p
holds at bits 4q the two 2-bit positions of chunk 4p + q of row g, at bits 16 + 4q those of row g + 8 (the
m16n8k32 mma.sp layout; CUTLASS's ELayout_64x32). Accumulator: thread (warp w, g = lane // 4,
t = lane % 4) holds d[4j + 2h + c] = D[16w + g + 8h][8j + 2t + c].

Arithmetic is float64, so integer-valued inputs give exact products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .mma_sp import activate

SWIZZLE_WIDTH = {1: 128, 2: 64, 3: 32}  # descriptor mode -> row width in bytes

# Constants of csrc/cuda/sparse24_linear_sm90.cu.
BK = 64  # dense K per stage
BM = 128  # output features per block
CONSUMERS = 2  # consumer warpgroups, 64 rows each
A_BYTES = BM * BK  # 128 rows x 32 kept values x 2 bytes
E_BYTES = BM // 16 * 2 * 16 * 4  # 8 row tiles x 32 words
ALIGN = 1024
MODE_128B, MODE_64B = 1, 2


@dataclass(frozen=True)
class Tile:
    """A kernel configuration: bn tokens per block (the wgmma N), `stages` pipeline stages."""

    bn: int
    stages: int

    @property
    def b_bytes(self) -> int:
        return self.bn * BK * 2

    @property
    def stage_bytes(self) -> int:
        return A_BYTES + self.b_bytes + E_BYTES


# DecodeTile, MediumTile, LargeTile of the kernel.
TILES = (Tile(16, 8), Tile(64, 6), Tile(128, 4))


def swizzle(address: Tensor, mode: int) -> Tensor:
    """The swizzled byte address of `address` (int64) in descriptor mode `mode` (0: none)."""
    if mode == 0:
        return address
    bits = {1: 7, 2: 3, 3: 1}[mode]
    return address ^ (((address >> 7) & bits) << 4)


def descriptor(start: int, leading: int, stride: int, mode: int) -> int:
    """The 64-bit matrix descriptor, as wgmma::descriptor (wgmma_sp.cuh) encodes it."""
    return ((start & 0x3FFFF) >> 4) | ((leading & 0x3FFFF) >> 4) << 16 | ((stride & 0x3FFFF) >> 4) << 32 | mode << 62


def _decode(desc: int) -> tuple[int, int, int]:
    """(start address, stride byte offset, mode) of a descriptor."""
    return (desc & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4, (desc >> 62) & 3


def tma_load_2d(smem: Tensor, dst: int, tensor: Tensor, c0: int, c1: int, box: tuple[int, int], mode: int) -> int:
    """The TMA tile load of a 2-d tensor (its elements' bytes) into the byte array smem at dst; box =
    (box_cols, box_rows); returns the bytes transferred (the whole box, out-of-range elements as zeros)."""
    box_cols, box_rows = box
    rows, cols = tensor.shape
    part = torch.zeros(box_rows, box_cols, dtype=tensor.dtype)
    r1, k1 = min(rows, c1 + box_rows), min(cols, c0 + box_cols)
    if r1 > c1 and k1 > c0:
        part[: r1 - c1, : k1 - c0] = tensor[c1:r1, c0:k1]
    data = part.contiguous().view(torch.uint8).reshape(-1)
    width = box_cols * tensor.element_size()
    if mode and width > SWIZZLE_WIDTH[mode]:
        raise ValueError(f"a swizzled box row is at most {SWIZZLE_WIDTH[mode]} bytes, got {width}")
    offsets = torch.arange(data.numel())
    smem[swizzle(dst + offsets, mode)] = data
    return data.numel()


def read_k_major(smem: Tensor, desc: int, rows: int, k: int, dtype: torch.dtype) -> Tensor:
    """The [rows, k] operand that a K-major swizzled descriptor describes, as float64."""
    start, stride, mode = _decode(desc)
    if mode == 0:
        raise ValueError("this kernel uses swizzled operands only")
    width = SWIZZLE_WIDTH[mode]
    size = torch.tensor([], dtype=dtype).element_size()
    if k * size > width:
        raise ValueError(f"K of {k * size} bytes does not fit a {width}-byte swizzle row")
    r = torch.arange(rows).view(rows, 1)
    b = torch.arange(k * size).view(1, -1)
    address = swizzle(start + (r // 8) * stride + (r % 8) * width + b, mode)
    return smem[address].contiguous().view(dtype).double()


def wgmma_sp(
    d: Tensor, desc_a: int, desc_b: int, e: Tensor, dtype: torch.dtype, smem: Tensor, selector: int = 0
) -> Tensor:
    """What wgmma.mma_async.sp m64nNk32 computes: d [4 warps, 32 lanes, N / 2] fp32 accumulators of a
    warpgroup, e [4, 32] its metadata registers, operands of `dtype` in the byte array smem; returns the
    new d (float64)."""
    if selector not in (0, 1):
        raise ValueError(f"the sparsity selector of .f16/.bf16 must be 0 or 1, got {selector}")
    n = 2 * d.shape[-1]
    kept = read_k_major(smem, desc_a, 64, 16, dtype)  # [64, 16]: two values per chunk of 4
    rows = torch.arange(64).view(64, 1)
    chunks = torch.arange(8).view(1, 8)
    w, g, h = rows // 16, rows % 8, (rows % 16) // 8
    lane = 4 * g + 2 * selector + chunks // 4
    nibble = (e.long()[w, lane] >> (16 * h + 4 * (chunks % 4))) & 0xF
    i0, i1 = nibble & 3, nibble >> 2
    if not bool((i0 < i1).all()):
        raise ValueError("metadata holds an index pair that is not ordered (undefined behaviour of the instruction)")
    dense_a = torch.zeros(64, 8, 4, dtype=torch.float64)
    dense_a.scatter_(-1, torch.stack((i0, i1), -1), kept.view(64, 8, 2))
    b = read_k_major(smem, desc_b, n, 32, dtype)  # [n, 32]
    product = dense_a.view(64, 32) @ b.T  # [64, n]
    warp = torch.arange(4).view(4, 1, 1)
    lane = torch.arange(32).view(1, 32, 1)
    reg = torch.arange(n // 2).view(1, 1, -1)
    row = 16 * warp + lane // 4 + 8 * ((reg // 2) % 2)
    col = 8 * (reg // 4) + 2 * (lane % 4) + reg % 2
    out = d.double() + product[row, col]
    return out


def _splits(tokens: int, out: int, ktiles: int, tile: Tile, sms: int) -> int:
    """The kernel's split-K rule: enough splits for the blocks to cover the SMs, at least 4 k-tiles
    per split, at most 16."""
    tiles = -(-tokens // tile.bn) * (out // BM)
    return min(max(1, min(-(-sms // tiles), max(1, ktiles // 4))), 16)


def emulate_sparse24_linear_sm90(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    tile: Tile = TILES[2],
    sms: int = 132,
) -> Tensor:
    """csrc/cuda/sparse24_linear_sm90.cu's computation for x [tokens, in] (float16/bfloat16) on one tile
    configuration, for a GPU of `sms` SMs (which decides the K split): every TMA box, descriptor and
    wgmma.sp emulated; returns y [tokens, out] in float64."""
    tokens, cols = x.shape
    out = values.shape[0]
    if out % BM or cols % BK:
        raise ValueError(f"out must be a multiple of {BM} and in of {BK}, got out={out}, in={cols}")
    dtype = x.dtype
    words = meta.reshape(out // 16, cols // 2)  # the metadata as the kernel's tensor map sees it
    ktiles = cols // BK
    splits = _splits(tokens, out, ktiles, tile, sms)
    smem = torch.zeros(tile.stages * tile.stage_bytes, dtype=torch.uint8)
    partial = torch.zeros(splits, tokens, out, dtype=torch.float64)
    lanes = torch.arange(32)
    for m0 in range(0, out, BM):
        for n0 in range(0, tokens, tile.bn):
            for split in range(splits):
                first, last = ktiles * split // splits, ktiles * (split + 1) // splits
                acc = torch.zeros(CONSUMERS, 4, 32, tile.bn // 2, dtype=torch.float64)
                for kt in range(first, last):
                    s = (kt - first) % tile.stages
                    a_at = s * tile.stage_bytes
                    b_at, e_at = a_at + A_BYTES, a_at + A_BYTES + tile.b_bytes
                    moved = tma_load_2d(smem, a_at, values, kt * BK // 2, m0, (BK // 2, BM), MODE_64B)
                    moved += tma_load_2d(smem, b_at, x, kt * BK, n0, (BK, tile.bn), MODE_128B)
                    moved += tma_load_2d(smem, e_at, words, kt * BK // 2, m0 // 16, (BK // 2, BM // 16), 0)
                    if moved != tile.stage_bytes:
                        raise AssertionError(f"a stage expects {tile.stage_bytes} bytes, the boxes bring {moved}")
                    se = smem[e_at : e_at + E_BYTES].view(torch.int32).long() & 0xFFFFFFFF
                    for c in range(CONSUMERS):
                        e_word = (c * 4 + torch.arange(4).view(4, 1)) * 32 + 2 * (lanes >> 2) + (lanes & 1)
                        a = a_at + c * 64 * 64
                        for step in range(2):
                            acc[c] = wgmma_sp(
                                acc[c],
                                descriptor(a + 32 * step, 16, 8 * 64, MODE_64B),
                                descriptor(b_at + 64 * step, 16, 8 * 128, MODE_128B),
                                se[e_word + 16 * step],
                                dtype,
                                smem,
                            )
                # Thread (c, warp, g, t) holds D[o = 64c + 16 warp + g + 8h][token = 8j + 2t + q].
                for c in range(CONSUMERS):
                    for w in range(4):
                        for j in range(tile.bn // 8):
                            for h in range(2):
                                for q in range(2):
                                    token = n0 + 8 * j + 2 * (lanes & 3) + q
                                    o = m0 + 64 * c + 16 * w + (lanes >> 2) + 8 * h
                                    inside = token < tokens
                                    v = acc[c, w, :, 4 * j + 2 * h + q]
                                    partial[split, token[inside], o[inside]] = v[inside]
    y = partial.sum(0)
    if bias is not None:
        y = y + bias.double()
    return activate(y, activation)
