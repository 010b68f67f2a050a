// PTX wrappers of the Hopper (sm_90a) 2:4 kernel, csrc/cuda/sparse24_linear_sm90.cu: mbarriers, TMA
// tensor loads, shared-memory matrix descriptors and the sparse warpgroup MMA
//
//   wgmma.mma_async.sp.sync.aligned.m64nNk32.f32.{f16,bf16}.{f16,bf16}
//
// (PTX ISA 9.7.15.6; emulated on the host by pyprune_fast/reference/wgmma_sp.py). Both operands come from
// shared memory through descriptors, both K-major:
//   A: the compressed weight tile, 64 rows x 16 kept values (the 32 dense columns of one k32 step) — the
//      byte shape of a dense m64nNk16 A tile, so it is described exactly as one;
//   B: the activations, N tokens x 32 dense values;
//   e: per thread, one 32-bit metadata word. For .f16/.bf16 warp w of the warpgroup covers rows
//      16w..16w+15 of A, and its 32 lanes hold the words of the m16n8k32 mma.sp layout of those rows
//      (CUTLASS's ELayout_64x32 states the same): lane 4g + 2*sel + p holds the nibbles of chunk 4p + q of
//      row g at bits 4q and of row g + 8 at bits 16 + 4q. compress_24's words (sparse24.h) are these.
//   d: 64 x N fp32; thread (warp w, g = lane / 4, t = lane % 4) holds d[4j + 2h + c] =
//      D[16w + g + 8h][8j + 2t + c] for j < N/8, h, c in {0, 1}.
//
// Every instruction here exists on sm_90a only. Compiled for any other target (the 8.0 entry of the arch
// list, or the PTX kept for newer GPUs) the wrappers are a trap; the launcher refuses such devices, and
// the Python dispatch sends only compute capability 9.0 here.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PPF_SM90A(...) __VA_ARGS__
#define PPF_HAS_SM90A 1
#else
#define PPF_SM90A(...) __trap()
#define PPF_HAS_SM90A 0
#endif

namespace pyprune_fast {
namespace wgmma {

// Swizzle modes of a matrix descriptor (bits 62-63) and of the matching TMA tensor map: the 16-byte
// chunk index of an address (bits 4..) is XOR-ed with its row bits (7..), over 32, 64 or 128-byte rows.
enum Swizzle : int { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

// The 64-bit shared-memory matrix descriptor (PTX ISA 9.7.15.5.1): start address, leading and stride
// byte offsets (each >> 4, 14 bits), base offset 0 (every buffer is 1024-byte aligned) and swizzle mode.
// For K-major swizzled operands the stride byte offset is the distance between groups of 8 rows
// (8 x the swizzle width) and the leading offset is unused (one swizzle row holds the whole K of a step).
PPF_HD constexpr uint64_t descriptor(uint32_t smem_address, uint32_t leading_bytes, uint32_t stride_bytes,
                                     Swizzle swizzle) {
  return static_cast<uint64_t>((smem_address & 0x3FFFFu) >> 4) |
         static_cast<uint64_t>((leading_bytes & 0x3FFFFu) >> 4) << 16 |
         static_cast<uint64_t>((stride_bytes & 0x3FFFFu) >> 4) << 32 | static_cast<uint64_t>(swizzle) << 62;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// --- mbarriers (PTX ISA 9.7.13.15) ---------------------------------------------------------------
__device__ __forceinline__ void barrier_init(uint64_t* bar, uint32_t count) {
  PPF_SM90A(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)));
}
// Makes the initialised barriers visible to the async proxy (TMA) before any copy signals them.
__device__ __forceinline__ void fence_barrier_init() {
  PPF_SM90A(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"));
}
__device__ __forceinline__ void arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  PPF_SM90A(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
                         "r"(bytes)
                         : "memory"));
}
__device__ __forceinline__ void arrive(uint64_t* bar) {
  PPF_SM90A(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory"));
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
  PPF_SM90A(asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory"));
}

// --- TMA (PTX ISA 9.7.9.25.5.1) ------------------------------------------------------------------
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  PPF_SM90A(asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory"));
}
// The box at coordinates (c0 innermost, c1) of a 2-d tensor map into shared memory; its bytes complete
// a transaction of `bar`. Elements outside the tensor are written as zeros (and counted).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  PPF_SM90A(asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
      "[%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory"));
}

// --- warpgroup MMA (PTX ISA 9.7.15.7) ------------------------------------------------------------
__device__ __forceinline__ void fence() { PPF_SM90A(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory")); }
__device__ __forceinline__ void commit() { PPF_SM90A(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory")); }
template <int kPending>
__device__ __forceinline__ void wait_group() {
  PPF_SM90A(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory"));
}
// Keeps the compiler from moving accumulator reads or writes across an asynchronous MMA.
template <int kN>
__device__ __forceinline__ void fence_operands(float (&d)[kN / 2]) {
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d += A * B (scale-d 1, no negation, no transpose: both K-major), sparsity selector 0.
template <typename T, int kN>
struct SparseMma;

#define PPF_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define PPF_ACC8(i) PPF_ACC4(i), PPF_ACC4(i + 4)
#define PPF_ACC32(i) PPF_ACC8(i), PPF_ACC8(i + 8), PPF_ACC8(i + 16), PPF_ACC8(i + 24)

#define PPF_WGMMA_SP_16(TYPE, PTX_TYPE)                                                                   \
  template <>                                                                                           \
  struct SparseMma<TYPE, 16> {                                                                          \
    __device__ __forceinline__ static void run(float (&d)[8], uint64_t a, uint64_t b, uint32_t e) {     \
      PPF_SM90A(asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %11, 0;\n"                                \
                             "wgmma.mma_async.sp.sync.aligned.m64n16k32.f32." PTX_TYPE "." PTX_TYPE   \
                             " {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, %10, 0, p, 1, 1, 0, 0;\n}\n" \
                             : PPF_ACC8(0)                                                              \
                             : "l"(a), "l"(b), "r"(e), "r"(1)));                                        \
    }                                                                                                   \
  };

#define PPF_WGMMA_SP_64(TYPE, PTX_TYPE)                                                                        \
  template <>                                                                                                \
  struct SparseMma<TYPE, 64> {                                                                               \
    __device__ __forceinline__ static void run(float (&d)[32], uint64_t a, uint64_t b, uint32_t e) {         \
      PPF_SM90A(asm volatile(                                                                                \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %35, 0;\n"                                                        \
          "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32." PTX_TYPE "." PTX_TYPE                             \
          " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
          "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, %34, 0, p, 1, 1, 0, 0;\n}\n"        \
          : PPF_ACC32(0)                                                                                     \
          : "l"(a), "l"(b), "r"(e), "r"(1)));                                                                \
    }                                                                                                        \
  };

#define PPF_WGMMA_SP_128(TYPE, PTX_TYPE)                                                                       \
  template <>                                                                                                \
  struct SparseMma<TYPE, 128> {                                                                              \
    __device__ __forceinline__ static void run(float (&d)[64], uint64_t a, uint64_t b, uint32_t e) {         \
      PPF_SM90A(asm volatile(                                                                                \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %67, 0;\n"                                                        \
          "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." PTX_TYPE "." PTX_TYPE                            \
          " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
          "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "   \
          "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "    \
          "%59, %60, %61, %62, %63}, %64, %65, %66, 0, p, 1, 1, 0, 0;\n}\n"                                      \
          : PPF_ACC32(0), PPF_ACC32(32)                                                                      \
          : "l"(a), "l"(b), "r"(e), "r"(1)));                                                                \
    }                                                                                                        \
  };

PPF_WGMMA_SP_16(__half, "f16")
PPF_WGMMA_SP_16(__nv_bfloat16, "bf16")
PPF_WGMMA_SP_64(__half, "f16")
PPF_WGMMA_SP_64(__nv_bfloat16, "bf16")
PPF_WGMMA_SP_128(__half, "f16")
PPF_WGMMA_SP_128(__nv_bfloat16, "bf16")

#undef PPF_WGMMA_SP_16
#undef PPF_WGMMA_SP_64
#undef PPF_WGMMA_SP_128
#undef PPF_ACC32
#undef PPF_ACC8
#undef PPF_ACC4

}  // namespace wgmma
}  // namespace pyprune_fast
