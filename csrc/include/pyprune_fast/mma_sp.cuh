// PTX wrappers used by csrc/cuda/sparse24_linear.cu (sm_80 and later): cp.async copies into shared
// memory, ldmatrix fragment loads and the sparse tensor-core instruction
//
//   mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//
// Operand layouts (PTX ISA 9.7.14.6.2.2; emulated on the host by pyprune_fast/reference/mma_sp.py),
// with g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group):
//   a[0] = the two kept values of chunk t     (dense columns 4t..4t+3)        of row g
//   a[1] = the two kept values of chunk t     of row g + 8
//   a[2] = the two kept values of chunk 4 + t (dense columns 16+4t..16+4t+3) of row g
//   a[3] = the two kept values of chunk 4 + t of row g + 8
//   b[j] = B[k = 8j + 2t][n = g], B[k = 8j + 2t + 1][n = g]        (j = 0..3)
//   c[0], c[1] = C[g][2t], C[g][2t + 1];  c[2], c[3] = C[g + 8][2t], C[g + 8][2t + 1]
//   e = metadata word (csrc/include/pyprune_fast/sparse24.h), sparsity selector 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// mma.sp::ordered_metadata needs PTX ISA 8.5 (CUDA 12.5); older toolkits get plain mma.sp, which
// accepts the same metadata (ours is always ordered) but may run slower on some GPUs (PTX ISA notes).
#if __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define PPF_MMA_SP "mma.sp::ordered_metadata"
#else
#define PPF_MMA_SP "mma.sp"
#endif

// None of these instructions exists below sm_80. For such targets (a TORCH_CUDA_ARCH_LIST with 7.x)
// the wrappers compile to a trap, so that the rest of the library still builds; the launcher refuses
// those devices before any kernel using them starts (kSparseMmaMinArch).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PPF_SM80(...) __VA_ARGS__
#else
#define PPF_SM80(...) __trap()
#endif

namespace pyprune_fast {

// The lowest compute capability (major * 10 + minor) with cp.async, ldmatrix and mma.sp.
constexpr int kSparseMmaMinArch = 80;

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; when !valid the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  PPF_SM80(asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
                        "r"(src_bytes)));
}
__device__ __forceinline__ void cp_async_commit() { PPF_SM80(asm volatile("cp.async.commit_group;\n" ::)); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  PPF_SM80(asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)));
}

// Four 8x8 b16 matrices: lane l gives the address of row l % 8 of matrix l / 8; lane l receives in r[j]
// elements 2 * (l % 4) and 2 * (l % 4) + 1 of row l / 4 of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  PPF_SM80(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                        : "r"(smem_address(smem))));
}

// d += A * B for one m16n8k32 tile, A 2:4-sparse (operands as described above), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e);

template <>
__device__ __forceinline__ void mma_sp_16832<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                     uint32_t e) {
  PPF_SM80(asm volatile(
      PPF_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e)));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[4], uint32_t e) {
  PPF_SM80(asm volatile(
      PPF_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e)));
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace pyprune_fast
