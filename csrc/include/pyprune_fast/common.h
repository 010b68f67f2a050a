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

}  // namespace pyprune_fast
