// Pieces shared by the CPU and CUDA kernels. Everything here is header-only and compiles both as
// host C++ and as CUDA device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PPF_HD __host__ __device__ __forceinline__
#else
#define PPF_HD inline
#endif

namespace pyprune_fast {

// Multi-tensor ops split every tensor into chunks of this many elements; the CPU runs one chunk per
// task, the GPU one chunk per block. Per-chunk partial results are reduced in chunk order, so results
// do not depend on the number of threads.
constexpr int64_t kChunk = 1 << 16;

// Element type codes stored in the multi-tensor tables.
enum DTypeCode : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

PPF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n elements of kSize bytes at `address` read as 16-byte vectors: a scalar head up to the first 16-byte
// boundary, whole vectors, then a scalar tail from tail_begin. Elements are aligned to their size (as
// PyTorch allocates them), so the head is a whole number of elements. Scalar number s (s < scalars) is
// element scalar_element(split, s).
struct VectorSplit {
  int64_t head, vectors, tail_begin, scalars;
};

template <int kSize>
PPF_HD VectorSplit vector_split(uint64_t address, int64_t n) {
  constexpr int64_t kVec = 16 / kSize;
  int64_t head = static_cast<int64_t>((16 - address % 16) % 16) / kSize;
  head = head < n ? head : n;
  const int64_t vectors = (n - head) / kVec, tail_begin = head + vectors * kVec;
  return {head, vectors, tail_begin, head + (n - tail_begin)};
}

PPF_HD int64_t scalar_element(const VectorSplit& split, int64_t s) {
  return s < split.head ? s : split.tail_begin + (s - split.head);
}

}  // namespace pyprune_fast
