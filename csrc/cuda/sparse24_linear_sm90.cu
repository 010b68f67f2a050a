// sparse24_linear on Hopper: y = act(x @ W^T + bias) with W 2:4-sparse, on wgmma.mma_async.sp
// (m64nNk32, fp16/bf16 inputs, fp32 accumulation; csrc/include/pyprune_fast/wgmma_sp.cuh), compute
// capability 9.0 with the sm_90a image only (the op sparse24_linear_sm90; pyprune_fast/ops/sparse24.py
// sends sm_90 devices here and others to the mma.sp kernel of sparse24_linear.cu).
//
// As there, D = W * X^T (M = out features, N = tokens, K = in features): the compressed weight is the
// sparse operand A (its values [out, in/2] row-major are K-major), X [tokens, in] row-major is a K-major
// B. A block computes a BM = 128 x BN tile of D with three warpgroups:
//   warpgroup 0, the producer: one thread issues the TMA loads of each stage (A box 32 values x 128
//     rows, 64-byte swizzle; B box 64 values x BN tokens, 128-byte swizzle, tokens past the end
//     zero-filled by TMA; the metadata box 32 words x 8 row tiles of meta viewed as [out/16, in/2]);
//     `full[s]` completes when a stage's bytes have landed, `empty[s]` when both consumers are done
//     with it;
//   warpgroups 1 and 2, the consumers: rows 64c..64c+63 of the tile each, two wgmma.sp k32 steps per
//     stage of kBK = 64 dense columns, one stage in flight (wait_group 1) before its buffer is released.
// K is split across blockIdx.z when the tiles alone would leave SMs idle (few tokens: a 4096 x 4096
// layer has 32 row tiles for 132 SMs); each split then writes fp32 partial sums to a workspace, and a
// second kernel adds them, the bias and the activation. Without a split the epilogue applies bias and
// activation in fp32, rounds once and writes y [tokens, out] through a transposed shared-memory tile
// as 16-byte rows. pyprune_fast/reference/wgmma_sp.py runs this schedule on the instruction semantics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/mma_sp.cuh"
#include "pyprune_fast/sparse24_args.h"
#include "pyprune_fast/sparse24_epilogue.cuh"
#include "pyprune_fast/wgmma_sp.cuh"

namespace pyprune_fast {
namespace {

using namespace sparse24;

constexpr int kBK = 64;                                   // dense K per stage
constexpr int kBM = 128;                                  // output features per block (2 consumers x 64)
constexpr int kConsumers = 2;                             // consumer warpgroups
constexpr int kThreads = 128 * (1 + kConsumers);          // + the producer warpgroup
constexpr int kABytes = kBM * kBK / 2 * 2;                // 128 rows x 64 bytes
constexpr int kEBytes = kBM / kTileRows * 2 * kTileWords * 4;  // 8 row tiles x 32 words
constexpr int kAlign = 1024;                              // the 128-byte swizzle repeats every 1024 bytes

template <int BN, int STAGES>
struct Config {
  static constexpr int kBN = BN, kStages = STAGES;
  static constexpr int kBBytes = BN * kBK * 2;  // BN rows x 128 bytes
  static constexpr int kStageBytes = kABytes + kBBytes + kEBytes;
  static constexpr int kOutStride = kBM + 8;  // halves per shared row of the output tile
  static constexpr int kOutBytes = (BN * kOutStride * 2 + kAlign - 1) / kAlign * kAlign;
  static constexpr int kBarrierBytes = 2 * STAGES * 8;
  static constexpr int kSmemBytes = kAlign + STAGES * kStageBytes + kOutBytes + kBarrierBytes;
  static_assert(kStageBytes % kAlign == 0, "stage parts must stay 1024-byte aligned");
  static_assert(BN % 16 == 0 && BN <= 128, "wgmma N of this kernel: 16, 64 or 128");
};

struct Sm90Args {
  const void* bias;  // [out] or nullptr
  void* y;           // [tokens, out], or the fp32 workspace [splits, tokens, out] when splits > 1
  int64_t tokens;
  int64_t out;
  int ktiles;  // in / kBK
  int splits;
  int activation;
};

// The k-tiles [first, last) of split `split` (every split gets at least one: splits <= ktiles).
__device__ __forceinline__ void split_range(int ktiles, int splits, int split, int& first, int& last) {
  first = static_cast<int>(static_cast<int64_t>(ktiles) * split / splits);
  last = static_cast<int>(static_cast<int64_t>(ktiles) * (split + 1) / splits);
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    sparse24_linear_sm90_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                                const __grid_constant__ CUtensorMap map_e, const Sm90Args args) {
#if PPF_HAS_SM90A
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kAlign - 1) / kAlign * kAlign);
  T* tile = reinterpret_cast<T*>(smem + Cfg::kStages * Cfg::kStageBytes);  // [BN tokens][kOutStride]
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Cfg::kStages * Cfg::kStageBytes + Cfg::kOutBytes);
  uint64_t* empty = full + Cfg::kStages;
  auto stage_a = [&](int s) { return smem + s * Cfg::kStageBytes; };
  auto stage_b = [&](int s) { return smem + s * Cfg::kStageBytes + kABytes; };
  auto stage_e = [&](int s) {
    return reinterpret_cast<const uint32_t*>(smem + s * Cfg::kStageBytes + kABytes + Cfg::kBBytes);
  };

  const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4;
  const int n0 = static_cast<int>(blockIdx.x) * Cfg::kBN;  // first token of the block
  const int m0 = static_cast<int>(blockIdx.y) * kBM;      // first output feature of the block
  int first, last;
  split_range(args.ktiles, args.splits, blockIdx.z, first, last);

  if (threadIdx.x == 0) {
    for (int s = 0; s < Cfg::kStages; ++s) {
      wgmma::barrier_init(&full[s], 1);                // the producer's arrive_expect_tx
      wgmma::barrier_init(&empty[s], kConsumers * 4);  // lane 0 of every consumer warp
    }
    wgmma::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    if (threadIdx.x == 0) {
      wgmma::prefetch_tensor_map(&map_a);
      wgmma::prefetch_tensor_map(&map_b);
      wgmma::prefetch_tensor_map(&map_e);
      for (int kt = first; kt < last; ++kt) {
        const int i = kt - first, s = i % Cfg::kStages;
        if (i >= Cfg::kStages) wgmma::wait(&empty[s], (i / Cfg::kStages - 1) & 1);
        wgmma::arrive_expect_tx(&full[s], Cfg::kStageBytes);
        wgmma::tma_load_2d(stage_a(s), &map_a, &full[s], kt * kBK / 2, m0);
        wgmma::tma_load_2d(stage_b(s), &map_b, &full[s], kt * kBK, n0);
        wgmma::tma_load_2d(const_cast<uint32_t*>(stage_e(s)), &map_e, &full[s], kt * kBK / 2, m0 / kTileRows);
      }
    }
    return;
  }

  // Consumer c: rows 64c..64c+63 of the tile; its warp w holds rows 16w..16w+15 of those.
  const int c = warpgroup - 1;
  float acc[Cfg::kBN / 2];
#pragma unroll
  for (int i = 0; i < Cfg::kBN / 2; ++i) acc[i] = 0.f;
  const int e_word = (c * 4 + warp) * 2 * kTileWords + 2 * (lane >> 2) + (lane & 1);
  for (int kt = first; kt < last; ++kt) {
    const int i = kt - first, s = i % Cfg::kStages;
    wgmma::wait(&full[s], (i / Cfg::kStages) & 1);
    const uint32_t* se = stage_e(s);
    const uint32_t e0 = se[e_word], e1 = se[e_word + kTileWords];
    const uint32_t a = wgmma::smem_u32(stage_a(s) + c * 64 * 64);  // 64 rows of 64 bytes
    const uint32_t b = wgmma::smem_u32(stage_b(s));
    wgmma::fence_operands<Cfg::kBN>(acc);
    wgmma::fence();
    // k32 step 0: compressed columns 0..15 (bytes 0..31 of each A row), dense 0..31 (bytes 0..63 of B);
    // step 1: the next 32 bytes of A and 64 bytes of B, inside the same swizzle rows.
    wgmma::SparseMma<T, Cfg::kBN>::run(acc, wgmma::descriptor(a, 16, 8 * 64, wgmma::k64B),
                                        wgmma::descriptor(b, 16, 8 * 128, wgmma::k128B), e0);
    wgmma::SparseMma<T, Cfg::kBN>::run(acc, wgmma::descriptor(a + 32, 16, 8 * 64, wgmma::k64B),
                                        wgmma::descriptor(b + 64, 16, 8 * 128, wgmma::k128B), e1);
    wgmma::commit();
    wgmma::wait_group<1>();  // the MMAs of the previous stage are done: release its buffer
    wgmma::fence_operands<Cfg::kBN>(acc);
    if (i > 0 && lane == 0) wgmma::arrive(&empty[(i - 1) % Cfg::kStages]);
  }
  wgmma::wait_group<0>();
  wgmma::fence_operands<Cfg::kBN>(acc);

  // Thread (warp, g, t) holds D[row 64c + 16 warp + g + 8h][token 8j + 2t + q] in acc[4j + 2h + q].
  const int g = lane >> 2, t = lane & 3;
  if (args.splits > 1) {
    float* ws = static_cast<float*>(args.y) + static_cast<int64_t>(blockIdx.z) * args.tokens * args.out;
#pragma unroll
    for (int j = 0; j < Cfg::kBN / 8; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int64_t token = n0 + 8 * j + 2 * t + q;
          const int64_t o = m0 + 64 * c + 16 * warp + g + 8 * h;
          if (token < args.tokens) ws[token * args.out + o] = acc[4 * j + 2 * h + q];
        }
      }
    }
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int o = 64 * c + 16 * warp + g + 8 * h;  // output feature within the block
    const float bias = bias_at<T>(args.bias, m0 + o);
#pragma unroll
    for (int j = 0; j < Cfg::kBN / 8; ++j) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        tile[(8 * j + 2 * t + q) * Cfg::kOutStride + o] =
            from_float<T>(activate(acc[4 * j + 2 * h + q] + bias, args.activation));
      }
    }
  }
  asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers * 128) : "memory");  // the consumers only
  T* y = static_cast<T*>(args.y);
  for (int i = threadIdx.x - 128; i < Cfg::kBN * (kBM / 8); i += kConsumers * 128) {
    const int r = i / (kBM / 8), col = i % (kBM / 8);
    if (n0 + r < args.tokens) {
      *reinterpret_cast<uint4*>(y + (n0 + r) * args.out + m0 + col * 8) =
          *reinterpret_cast<const uint4*>(tile + r * Cfg::kOutStride + col * 8);
    }
  }
#else
  __trap();  // no sm_90a image: the launcher refuses before this can run
#endif
}

// y[n][o] = act(sum over splits of ws[s][n][o] + bias[o]), rounded once.
template <typename T>
__global__ void reduce_splits_kernel(const float* ws, const void* bias, T* y, int64_t tokens, int64_t out,
                                     int splits, int activation) {
  const int64_t size = tokens * out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = bias_at<T>(bias, i % out);
    for (int s = 0; s < splits; ++s) v += ws[s * size + i];
    y[i] = from_float<T>(activate(v, activation));
  }
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found));
#endif
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && p,
                "sparse24_linear_sm90: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A 2-d tensor map of a row-major [rows, cols] matrix of `elem_bytes`-byte elements, boxes of
// box_cols x box_rows.
CUtensorMap tensor_map(const void* base, CUtensorMapDataType type, int elem_bytes, int64_t rows, int64_t cols,
                       int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * elem_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, type, 2, const_cast<void*>(base), dims, strides, box, unit,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "sparse24_linear_sm90: cuTensorMapEncodeTiled failed with error ",
              static_cast<int>(r));
  return map;
}

struct Operands {
  const void* x;         // [tokens, in]
  const void* values;    // [out, in / 2]
  const uint32_t* meta;  // [out / 16, in / 32, 16] = [out / 16, in / 2]
  int64_t in;
};

template <typename T, typename Cfg>
void launch(const Operands& ops, Sm90Args args, int device, int sms, const at::Tensor& y, cudaStream_t stream) {
  constexpr auto kernel = sparse24_linear_sm90_kernel<T, Cfg>;
  opt_in_shared_memory<kernel, Cfg::kSmemBytes>(device);
  const CUtensorMap map_a = tensor_map(ops.values, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, args.out, ops.in / 2, kBK / 2,
                                       kBM, CU_TENSOR_MAP_SWIZZLE_64B);
  const CUtensorMap map_b = tensor_map(ops.x, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, args.tokens, ops.in, kBK, Cfg::kBN,
                                       CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap map_e = tensor_map(ops.meta, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, args.out / kTileRows, ops.in / 2,
                                       kBK / 2, kBM / kTileRows, CU_TENSOR_MAP_SWIZZLE_NONE);
  const int64_t tiles = ceil_div(args.tokens, Cfg::kBN) * (args.out / kBM);
  // Split K until the blocks cover the SMs, keeping at least 4 stages of K per split.
  args.splits = static_cast<int>(std::clamp<int64_t>(ceil_div(sms, tiles), 1, std::max(1, args.ktiles / 4)));
  args.splits = std::min(args.splits, 16);
  at::Tensor ws;
  if (args.splits > 1) {
    ws = at::empty({args.splits, args.tokens, args.out}, y.options().dtype(at::kFloat));
    args.y = ws.data_ptr();
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(args.tokens, Cfg::kBN)), static_cast<unsigned>(args.out / kBM),
                  static_cast<unsigned>(args.splits));
  kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(map_a, map_b, map_e, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (args.splits > 1) {
    const int64_t size = args.tokens * args.out;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(size, 256), 4L * sms));
    reduce_splits_kernel<T><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), args.bias, static_cast<T*>(y.data_ptr()),
                                                        args.tokens, args.out, args.splits, args.activation);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Tiles: N = 16 for up to 16 tokens (decode: the weight stream dominates, K split to fill the GPU),
// N = 64 up to 64 tokens, N = 128 otherwise.
using DecodeTile = Config<16, 8>;
using MediumTile = Config<64, 6>;
using LargeTile = Config<128, 4>;

template <typename T>
void dispatch(const Operands& ops, const Sm90Args& args, int device, int sms, const at::Tensor& y,
              cudaStream_t stream) {
  if (args.tokens <= DecodeTile::kBN) {
    launch<T, DecodeTile>(ops, args, device, sms, y, stream);
  } else if (args.tokens <= MediumTile::kBN) {
    launch<T, MediumTile>(ops, args, device, sms, y, stream);
  } else {
    launch<T, LargeTile>(ops, args, device, sms, y, stream);
  }
}

// Whether the library holds the sm_90a image of the kernel (a build without 9.0a in its arch list runs
// the sm_80 image on an H100, where the kernel is a trap).
// Asked once per device.
bool has_sm90a_image(int device) {
  static std::once_flag flags[C10_COMPILE_TIME_MAX_GPUS];
  static bool found[C10_COMPILE_TIME_MAX_GPUS];
  std::call_once(flags[device], [device] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, sparse24_linear_sm90_kernel<__half, LargeTile>));
    found[device] = attr.binaryVersion == 90;
  });
  return found[device];
}

at::Tensor sparse24_linear_sm90_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                     const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const auto [act, s] = check_linear_cuda(x, values, meta, bias, activation);
  TORCH_CHECK(s.out % kBM == 0 && s.out / kBM <= 65535,
              "sparse24_linear_sm90 needs out features that are a multiple of 128 (at most ", 65535 * kBM,
              "), got ", s.out, " (the mma.sp kernel, sparse24_linear, takes multiples of 64)");
  c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9 && prop->minor == 0,
              "sparse24_linear_sm90 runs on compute capability 9.0 (wgmma.mma_async.sp); ", prop->name, " (",
              x.device(), ") has ", prop->major, ".", prop->minor, " (use sparse24_linear)");
  TORCH_CHECK(has_sm90a_image(x.device().index()),
              "sparse24_linear_sm90: this build has no sm_90a image (TORCH_CUDA_ARCH_LIST without 9.0a); use "
              "sparse24_linear");
  if (s.in == 0) return linear_without_inputs(x, s.out, bias, act).view(linear_output_shape(x, s.out));
  const auto [x2, v, e, b] = linear_operands(x, values, meta, bias, s.in);
  at::Tensor y = at::empty({x2.size(0), s.out}, x.options());
  if (x2.size(0) > 0 && s.out > 0) {
    const Operands ops{x2.data_ptr(), v.data_ptr(), reinterpret_cast<const uint32_t*>(e.data_ptr<int32_t>()), s.in};
    const Sm90Args args{b ? b->data_ptr() : nullptr, y.data_ptr(), x2.size(0), s.out, static_cast<int>(s.in / kBK),
                        1, act};
    const int device = x.device().index();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (x.scalar_type() == at::kHalf) {
      dispatch<__half>(ops, args, device, prop->multiProcessorCount, y, stream);
    } else {
      dispatch<__nv_bfloat16>(ops, args, device, prop->multiProcessorCount, y, stream);
    }
  }
  return y.view(linear_output_shape(x, s.out));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) { m.impl("sparse24_linear_sm90", &sparse24_linear_sm90_cuda); }

}  // namespace pyprune_fast
