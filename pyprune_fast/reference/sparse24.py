"""2:4 semi-structured sparsity: compression to the sparse tensor cores' values and metadata layout,
decompression, and the sparse matmul sparse24_linear (reference)."""

from __future__ import annotations

import torch
from torch import Tensor

# The metadata layout of csrc/include/pyprune_fast/sparse24.h: word [mt][kt][2g + p] holds, at bits
# 16h + 4q, the nibble of chunk 8kt + 4p + q of row 16mt + 8h + g (g < 8, p, h < 2, q < 4).
_META_SHIFTS = (16 * torch.arange(2).view(2, 1) + 4 * torch.arange(4).view(1, 4)).to(torch.int64)


def pack_meta(nibbles: Tensor) -> Tensor:
    """Nibbles i0 | i1 << 2 of each chunk, int64 [out, in/4] -> int32 meta [out/16, in/32, 16]."""
    out, chunks = nibbles.shape
    t = nibbles.to(torch.int64).view(out // 16, 2, 8, chunks // 8, 2, 4).permute(0, 3, 2, 4, 1, 5)
    words = (t << _META_SHIFTS.to(t.device)).sum((-2, -1)).reshape(out // 16, chunks // 8, 16)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_meta(meta: Tensor) -> Tensor:
    """int32 meta [out/16, in/32, 16] -> the nibble of each chunk, int64 [out, in/4]."""
    mt, kt, _ = meta.shape
    words = (meta.to(torch.int64) & 0xFFFFFFFF).view(mt, kt, 8, 2, 1, 1)
    nibbles = (words >> _META_SHIFTS.to(meta.device)) & 0xF  # [mt, kt, g, p, h, q]
    return nibbles.permute(0, 4, 2, 1, 3, 5).reshape(mt * 16, kt * 8)


def compress_24(w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """w [out, in] -> (values [out, in/2], meta, invalid). Each chunk of 4 keeps its non-zero entries
    (or, with a mask, its masked-in entries), padded with its lowest other positions to two, in
    increasing position order; invalid counts chunks with more than two (with a mask: not exactly two)."""
    out, cols = w.shape
    chunks = w.reshape(out, cols // 4, 4)
    flags = mask.reshape(out, cols // 4, 4) if mask is not None else chunks != 0
    count = flags.sum(-1)
    invalid = (count != 2).sum() if mask is not None else (count > 2).sum()
    key = (~flags).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = key.argsort(-1)[..., :2].sort(-1).values
    values = chunks.gather(-1, pos).reshape(out, cols // 2)
    return values, pack_meta(pos[..., 0] | pos[..., 1] << 2), invalid


def decompress_24(values: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """(values, meta) -> (dense w [out, in], invalid): kept values at their positions, zeros elsewhere;
    chunks whose nibble is not an ordered pair (i0 < i1) are zeros and counted in invalid."""
    out, half = values.shape
    nib = unpack_meta(meta)
    i0, i1 = nib & 3, nib >> 2 & 3
    valid = i0 < i1
    pos = torch.where(valid.unsqueeze(-1), torch.stack((i0, i1), -1), torch.tensor([0, 1], device=values.device))
    kept = torch.where(valid.unsqueeze(-1), values.view(out, half // 2, 2), 0)
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device).scatter_(-1, pos, kept)
    return dense.view(out, 2 * half), (~valid).sum()


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None, activation: str = "none"
) -> Tensor:
    """act(x @ Wᵀ + bias) with W = decompress_24(values, meta), computed in float32 and rounded once to
    x's dtype; act is 'none', 'relu' or 'gelu' (exact: x/2 · (1 + erf(x/√2)))."""
    w, invalid = decompress_24(values, meta)
    if int(invalid):
        raise ValueError(f"meta holds {int(invalid)} chunks whose index pair is not an ordered 2:4 pair")
    y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    return y.to(x.dtype)
