// The compressed 2:4 format: values and the metadata layout that csrc/cuda/sparse24_linear.cu feeds to
// `mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{f16,bf16}.f32`.
// Shared by the compress/decompress kernels (CPU and CUDA) and the CPU path of sparse24_linear.
//
// A dense weight W [out, in] is 2:4 when each chunk of 4 consecutive entries of a row (columns
// 4c..4c+3, "chunk c") holds at most two non-zeros. Compressed:
//   values [out, in/2]: the two kept entries of chunk c of row r at values[r][2c], values[r][2c+1],
//                       in increasing column order;
//   meta: for each chunk, its two kept positions i0 < i1 (each in 0..3) as the 4-bit nibble
//         i0 | i1 << 2 — the "two 2-bit indices" of the PTX ISA (section "Sparse matrix storage",
//         9.7.14.6.1), sorted from the LSB as mma.sp::ordered_metadata requires: the only nibbles
//         that occur are 0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110.
//
// Nibble placement (PTX ISA 9.7.14.6.2.2, "Matrix Fragments for sparse mma.m16n8k32 with .f16 and
// .bf16 types", figure "Sparse MMA .m16n8k32 metadata layout for .f16/.bf16 type"): for one m16n8k32
// tile (16 rows x 32 dense columns = 8 chunks per row), the 32-bit metadata operand of lane
// T = 4 * groupID + t (t = threadID_in_group; with sparsity selector 0, lanes with t in {0, 1}
// contribute) holds
//   bits [4q+3 : 4q]      chunk 4*(t%2) + q of row groupID        (q = 0..3)
//   bits [16+4q+3 : 16+4q] chunk 4*(t%2) + q of row groupID + 8
// i.e. the low half covers 16 dense columns of row groupID, the high half the same columns of row
// groupID + 8, four nibbles each in increasing column order.
//
// Storage: meta is int32 [out/16, in/32, 16]; word [mt][kt][2*g + p] is the operand described above
// for the tile of rows 16mt..16mt+15 and dense columns 32kt..32kt+31, for groupID g (0..7) and
// column half p (0..1). A lane reads word 2*(lane >> 2) + (lane & 1) of its tile, so lanes t and t+2
// of a group read the same word and any sparsity selector (0 or 1) sees the right operand; the 32
// words of two consecutive k32 steps of one row tile are contiguous, so the kernel copies them with
// 16-byte loads. pyprune_fast/reference/mma_sp.py emulates the instruction on this layout.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "pyprune_fast/common.h"

namespace pyprune_fast {
namespace sparse24 {

constexpr int kTileRows = 16;  // rows per metadata tile (the M of m16n8k32)
constexpr int kTileCols = 32;  // dense columns per metadata tile (the K of m16n8k32)
constexpr int kTileWords = 16;  // 32-bit words per metadata tile
constexpr int kNibblesPerWord = 8;

// Row and chunk described by nibble i (0..7, bits 4i..4i+3) of metadata word `word` of a weight
// with `in` columns.
struct Slot {
  int64_t row;
  int64_t chunk;
};

PPF_HD Slot slot_of(int64_t word, int i, int64_t in) {
  const int64_t tile = word / kTileWords;
  const int64_t within = word % kTileWords;
  const int64_t g = within / 2, p = within % 2;
  const int64_t tiles_k = in / kTileCols;
  const int64_t mt = tile / tiles_k, kt = tile % tiles_k;
  const int h = i / 4, q = i % 4;
  return {mt * kTileRows + 8 * h + g, kt * (kTileCols / 4) + 4 * p + q};
}

// Inverse of slot_of: the word holding the nibble of chunk `chunk` of row `row`, and its bit offset.
PPF_HD int64_t word_of(int64_t row, int64_t chunk, int64_t in) {
  const int64_t mt = row / kTileRows, kt = chunk / (kTileCols / 4);
  const int64_t g = row % 8, p = (chunk / 4) % 2;
  return (mt * (in / kTileCols) + kt) * kTileWords + 2 * g + p;
}
PPF_HD int shift_of(int64_t row, int64_t chunk) { return static_cast<int>(16 * ((row / 8) % 2) + 4 * (chunk % 4)); }

// The two kept positions of a chunk from its flags (bit i set = position i is non-zero / masked in):
// the set positions in increasing order, padded with the lowest unset positions when fewer than two
// are set (the padding stores zeros); with more than two set (not 2:4, reported by the caller), the
// lowest two. As the nibble i0 | i1 << 2.
constexpr unsigned pair_nibble(unsigned flags) {
  unsigned chosen = flags & 0xfu;
  int have = 0;
  for (int i = 0; i < 4; ++i) have += static_cast<int>(chosen >> i & 1u);
  for (int i = 0; i < 4 && have < 2; ++i) {
    if (!(chosen >> i & 1u)) {
      chosen |= 1u << i;
      ++have;
    }
  }
  unsigned positions[2] = {0, 0};
  int found = 0;
  for (unsigned i = 0; i < 4 && found < 2; ++i) {
    if (chosen >> i & 1u) positions[found++] = i;
  }
  return positions[0] | positions[1] << 2;
}

// pair_nibble and the number of set flags of every 4-bit flags value, 4 bits each.
constexpr uint64_t pair_table() {
  uint64_t t = 0;
  for (unsigned f = 0; f < 16; ++f) t |= static_cast<uint64_t>(pair_nibble(f)) << (4 * f);
  return t;
}
constexpr uint64_t count_table() {
  uint64_t t = 0;
  for (unsigned f = 0; f < 16; ++f) {
    t |= static_cast<uint64_t>((f & 1) + (f >> 1 & 1) + (f >> 2 & 1) + (f >> 3 & 1)) << (4 * f);
  }
  return t;
}
constexpr uint64_t kPairTable = pair_table();
constexpr uint64_t kCountTable = count_table();
static_assert(kPairTable == 0x498e4dcc49884444ull, "flags 0..15 -> nibbles 4 4 4 4 8 8 9 4 c c d 4 e 8 9 4");

// Positions of a nibble; false when it is not one of the six ordered pairs (i0 < i1).
PPF_HD bool positions_of(unsigned nibble, int& i0, int& i1) {
  i0 = static_cast<int>(nibble & 3u);
  i1 = static_cast<int>(nibble >> 2 & 3u);
  return i0 < i1;
}

// Compresses one chunk: src[0..3] (mask: its keep-flags, or nullptr) -> its two kept values in
// dst[0], dst[1]; returns the nibble and adds 1 to *invalid when the chunk is not 2:4 (more than two
// non-zeros; with a mask: not exactly two kept).
// Non-zero test (NaN counts as non-zero, -0.0 as zero); from the bits for the 16-bit types.
PPF_HD bool nonzero(float v) { return v != 0.f; }
PPF_HD bool nonzero(c10::Half v) { return (v.x & 0x7fffu) != 0; }
PPF_HD bool nonzero(c10::BFloat16 v) { return (v.x & 0x7fffu) != 0; }

template <typename T>
PPF_HD unsigned compress_chunk(const T* src, const bool* mask, T* dst, int64_t* invalid) {
  unsigned flags = 0;
  for (int j = 0; j < 4; ++j) {
    const bool on = mask ? mask[j] : nonzero(src[j]);
    flags |= static_cast<unsigned>(on) << j;
  }
  const unsigned nibble = static_cast<unsigned>(kPairTable >> (4 * flags) & 0xfu);
  const unsigned count = static_cast<unsigned>(kCountTable >> (4 * flags) & 0xfu);
  *invalid += mask ? count != 2 : count > 2;
  dst[0] = src[nibble & 3u];
  dst[1] = src[nibble >> 2];
  return nibble;
}

// Writes one dense chunk dst[0..3] (type Out) from its two kept values src[0..1] and its nibble;
// returns 1 (and writes zeros) when the nibble is not an ordered pair.
template <typename T, typename Out>
PPF_HD int decompress_chunk(const T* src, unsigned nibble, Out* dst) {
  for (int j = 0; j < 4; ++j) dst[j] = Out(0.f);
  int i0, i1;
  if (!positions_of(nibble, i0, i1)) return 1;
  dst[i0] = static_cast<Out>(src[0]);
  dst[i1] = static_cast<Out>(src[1]);
  return 0;
}

// Compresses the 8 chunks of metadata word `word` of w [out, in] (mask: optional keep-flags of the same
// shape) into values [out, in/2]; returns the word.
template <typename T>
PPF_HD uint32_t compress_word(const T* w, const bool* mask, T* values, int64_t word, int64_t in, int64_t* invalid) {
  uint32_t bits = 0;
  for (int i = 0; i < kNibblesPerWord; ++i) {
    const Slot s = slot_of(word, i, in);
    const int64_t base = s.row * in + 4 * s.chunk;
    bits |= compress_chunk(w + base, mask ? mask + base : nullptr, values + s.row * (in / 2) + 2 * s.chunk, invalid)
            << (4 * i);
  }
  return bits;
}

// Writes the 8 dense chunks of metadata word `word` (bits `bits`) into dense [out, in]; returns the
// number of nibbles that are not an ordered pair.
template <typename T, typename Out>
PPF_HD int decompress_word(const T* values, uint32_t bits, Out* dense, int64_t word, int64_t in) {
  int invalid = 0;
  for (int i = 0; i < kNibblesPerWord; ++i) {
    const Slot s = slot_of(word, i, in);
    invalid += decompress_chunk(values + s.row * (in / 2) + 2 * s.chunk, bits >> (4 * i) & 0xfu,
                                dense + s.row * in + 4 * s.chunk);
  }
  return invalid;
}

}  // namespace sparse24
}  // namespace pyprune_fast
