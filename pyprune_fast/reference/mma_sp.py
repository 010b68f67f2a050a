"""Host emulation of the sparse tensor-core path of `ops.sparse24_linear` on CUDA, from the documented
semantics of the PTX instructions it uses. Without a GPU this is the proof that compress_24's metadata
layout and the kernel's fragment loads compute act(x @ Wᵀ + b); tests/test_sparse24.py checks it
against the dense product.

Instruction (PTX ISA 9.7.14.6, "Matrix multiply-accumulate operation using mma.sp"):

    mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c, e, f

D = A·B + C with A 16x32 2:4-sparse, B 32x8, C and D 16x8 fp32, distributed over the 32 lanes of a
warp (9.7.14.6.2.2, "Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16 types"); with
groupID g = lane >> 2 and threadID_in_group t = lane % 4:
  a: four .b32 registers of two values each (the kept values of one chunk of 4 columns, in column
     order): register 0 row g, columns 4t..4t+3; register 1 row g + 8, same columns; register 2 row g,
     columns 16 + 4t..; register 3 row g + 8, columns 16 + 4t..
  b: four registers, register j = B[8j + 2t][g], B[8j + 2t + 1][g]
  c, d: c0, c1 = C[g][2t], C[g][2t + 1]; c2, c3 = C[g + 8][2t], C[g + 8][2t + 1]
  e: 32-bit metadata; with sparsity selector f, lanes 4g + 2f and 4g + 2f + 1 contribute (f in {0, 1}
     for m16n8k32, 9.7.14.6.1 "Sparse matrix storage"); lane 4g + 2f + p holds at bits 4q..4q+3 the
     two 2-bit positions (i0 in the low bits, i1 in the high) of chunk 4p + q of row g and at bits
     16 + 4q.. those of row g + 8 (figure "Sparse MMA .m16n8k32 metadata layout for .f16/.bf16 type").
     ::ordered_metadata requires i0 < i1; other nibbles are undefined behaviour (an error here).

ldmatrix.sync.aligned.m8n8.x4.shared.b16 (9.7.14.5.15): lane l gives the address of row l % 8 of
matrix l // 8 (8 consecutive 16-bit elements); lane l receives in register j the elements 2(l % 4) and
2(l % 4) + 1 of row l // 4 of matrix j.

`emulate_sparse24_linear` runs csrc/cuda/sparse24_linear.cu's tile loop on these definitions: the same
shared-memory strides, copy rules (tokens past the end zero-filled), lane address formulas, metadata
word reads and epilogue. Arithmetic is float64, so integer-valued inputs give exact products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

WARP = 32
_LANES = torch.arange(WARP)
_G, _T = _LANES // 4, _LANES % 4
# Where each lane's register elements sit: B[k][n] for b [32, 4, 2]; C[row][col] for c, d [32, 4].
_B_K = (8 * torch.arange(4).view(1, 4, 1) + 2 * _T.view(WARP, 1, 1) + torch.arange(2).view(1, 1, 2)).reshape(-1)
_B_N = _G.view(WARP, 1, 1).expand(WARP, 4, 2).reshape(-1)
_C_ROW = (_G.view(WARP, 1) + 8 * torch.tensor([0, 0, 1, 1])).reshape(-1)
_C_COL = (2 * _T.view(WARP, 1) + torch.tensor([0, 1, 0, 1])).reshape(-1)

# Constants of csrc/cuda/sparse24_linear.cu.
BK = 64  # dense K per pipeline stage
A_STRIDE = BK // 2 + 8  # elements per shared row of compressed A
B_STRIDE = BK + 8  # elements per shared row of B
STAGE_WORDS = BK // 32 * 16  # metadata words per m16 tile and stage


def mma_sp_m16n8k32(a: Tensor, b: Tensor, c: Tensor, e: Tensor, selector: int = 0) -> Tensor:
    """What mma.sp::ordered_metadata m16n8k32 computes, per lane: a, b [..., 32, 4, 2] (lane, register,
    element), c [..., 32, 4], e [..., 32] (metadata bits as int64) -> d [..., 32, 4] in float64. Leading
    dimensions broadcast: each index is one instruction of a warp."""
    if selector not in (0, 1):
        raise ValueError(f"the sparsity selector of m16n8k32 must be 0 or 1, got {selector}")
    rows = torch.arange(16).view(16, 1)
    chunks = torch.arange(8).view(1, 8)
    g, h, t, p = rows % 8, rows // 8, chunks % 4, chunks // 4
    kept = a.double()[..., 4 * g + t, 2 * p + h, :]  # [..., 16, 8, 2]: the two values of chunk c of row r
    nibble = (e.long()[..., 4 * g + 2 * selector + p] >> (16 * h + 4 * t)) & 0xF
    i0, i1 = nibble & 3, nibble >> 2
    if not bool((i0 < i1).all()):
        raise ValueError("metadata holds an index pair that is not ordered (undefined behaviour of the instruction)")
    dense_a = torch.zeros(*kept.shape[:-1], 4, dtype=torch.float64)
    dense_a = dense_a.scatter_(-1, torch.stack((i0, i1), -1), kept).flatten(-2)  # [..., 16, 32]
    dense_b = torch.zeros(*b.shape[:-3], 32, 8, dtype=torch.float64)
    dense_b[..., _B_K, _B_N] = b.double().flatten(-3)
    dense_c = torch.zeros(*c.shape[:-2], 16, 8, dtype=torch.float64)
    dense_c[..., _C_ROW, _C_COL] = c.double().flatten(-2)
    dense_d = dense_a @ dense_b + dense_c
    return dense_d[..., _C_ROW, _C_COL].unflatten(-1, (WARP, 4))


def ldmatrix_x4(smem: Tensor, row_addresses: Tensor) -> Tensor:
    """ldmatrix .x4 .b16 from a flat shared-memory array: row_addresses [..., 32] (element offsets, one
    per lane) -> registers [..., 32, 4, 2]."""
    rows = smem[row_addresses.unflatten(-1, (4, 8)).unsqueeze(-1) + torch.arange(8)]  # [..., matrix, row, element]
    pairs = torch.stack([rows[..., _LANES // 4, 2 * _T], rows[..., _LANES // 4, 2 * _T + 1]], -1)
    return pairs.transpose(-3, -2)


@dataclass(frozen=True)
class Tile:
    """A kernel configuration: block tile bm x bn (outputs x tokens) of wm x wn warps."""

    bm: int
    bn: int
    wm: int
    wn: int

    @property
    def warp_m(self) -> int:
        return self.bm // self.wm

    @property
    def warp_n(self) -> int:
        return self.bn // self.wn


# The three configurations the kernel is instantiated with (LargeTile, MediumTile, SmallTile).
TILES = (Tile(128, 128, 2, 4), Tile(64, 64, 2, 2), Tile(64, 16, 4, 1))


def _load_stage(x: Tensor, values: Tensor, meta_words: Tensor, tile: Tile, m0: int, n0: int, k0: int):
    """The shared-memory stage the kernel's load_stage fills: flat A, B and metadata arrays."""
    tokens, cols = x.shape
    sa = torch.zeros(tile.bm, A_STRIDE, dtype=torch.float64)
    sa[:, : BK // 2] = values[m0 : m0 + tile.bm, k0 // 2 : k0 // 2 + BK // 2]
    sb = torch.zeros(tile.bn, B_STRIDE, dtype=torch.float64)  # rows of tokens past the end stay zero (zero-fill)
    rows = min(tile.bn, tokens - n0)
    sb[:rows, :BK] = x[n0 : n0 + rows, k0 : k0 + BK]
    se = torch.zeros(tile.bm // 16, STAGE_WORDS, dtype=torch.int64)
    for t in range(tile.bm // 16):
        first = ((m0 // 16 + t) * (cols // 32) + k0 // 32) * 16  # sparse24::word_of(m0 + 16t, k0 / 4, in)
        se[t] = meta_words[first : first + STAGE_WORDS]
    return sa.view(-1), sb.view(-1), se.view(-1)


def activate(v: Tensor, activation: str | None) -> Tensor:
    """The kernels' epilogue activation in float64: None, "relu" or "gelu" (exact, erf)."""
    if activation == "relu":
        return torch.where(v < 0, torch.zeros_like(v), v)
    if activation == "gelu":
        return 0.5 * v * (1 + torch.erf(v / 2**0.5))
    return v


def emulate_sparse24_linear(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    tile: Tile = TILES[1],
    selector: int = 0,
) -> Tensor:
    """csrc/cuda/sparse24_linear.cu's computation for x [tokens, in] on one tile configuration, with
    every ldmatrix and mma.sp emulated lane by lane; returns y [tokens, out] in float64."""
    tokens, cols = x.shape
    out = values.shape[0]
    if out % tile.bm or cols % BK:
        raise ValueError(f"out must be a multiple of {tile.bm} and in of {BK}, got out={out}, in={cols}")
    xd, vd = x.double(), values.double()
    words = meta.reshape(-1).long() & 0xFFFFFFFF
    y = torch.zeros(tokens, out, dtype=torch.float64)
    mt, nt = tile.warp_m // 16, tile.warp_n // 8
    # Per (warp_m, mi) and (warp_n, ni): the lanes' ldmatrix row addresses and metadata word indices.
    warp_m = torch.arange(tile.wm).view(tile.wm, 1, 1)
    mi = torch.arange(mt).view(1, mt, 1)
    a_row = warp_m * tile.warp_m + mi * 16 + (_LANES & 7) + ((_LANES >> 3) & 1) * 8  # [wm, mt, 32]
    e_index = (warp_m * mt + mi) * STAGE_WORDS + 2 * (_LANES >> 2) + (_LANES & 1)
    b_row = torch.arange(tile.wn).view(tile.wn, 1, 1) * tile.warp_n + torch.arange(nt).view(1, nt, 1) * 8 + (_LANES & 7)
    for m0 in range(0, out, tile.bm):
        for n0 in range(0, tokens, tile.bn):
            acc = torch.zeros(tile.wm, tile.wn, mt, nt, WARP, 4, dtype=torch.float64)
            for k0 in range(0, cols, BK):
                sa, sb, se = _load_stage(xd, vd, words, tile, m0, n0, k0)
                for ks in range(BK // 32):
                    a = ldmatrix_x4(sa, a_row * A_STRIDE + ks * 16 + (_LANES >> 4) * 8)  # [wm, mt, 32, 4, 2]
                    e = se[e_index + ks * 16]  # [wm, mt, 32]
                    b = ldmatrix_x4(sb, b_row * B_STRIDE + ks * 32 + (_LANES >> 3) * 8)  # [wn, nt, 32, 4, 2]
                    acc = mma_sp_m16n8k32(
                        a.view(tile.wm, 1, mt, 1, WARP, 4, 2),
                        b.view(1, tile.wn, 1, nt, WARP, 4, 2),
                        acc,
                        e.view(tile.wm, 1, mt, 1, WARP),
                        selector,
                    )
            # Epilogue: lane (g, t) holds D[o = ... + g + 8h][token = ... + 2t + j] in acc[..., 2h + j].
            for wm in range(tile.wm):
                for wn in range(tile.wn):
                    for i in range(mt):
                        for n in range(nt):
                            for h in range(2):
                                for j in range(2):
                                    o = m0 + wm * tile.warp_m + i * 16 + _G + 8 * h
                                    token = n0 + wn * tile.warp_n + n * 8 + 2 * _T + j
                                    v = acc[wm, wn, i, n, :, 2 * h + j]
                                    if bias is not None:
                                        v = v + bias.double()[o]
                                    inside = token < tokens
                                    y[token[inside], o[inside]] = activate(v, activation)[inside]
    return y
