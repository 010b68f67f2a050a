// sparse24_linear on CUDA: y = act(x @ W^T + bias) with W 2:4-sparse, on the sparse tensor cores
// (mma.sp::ordered_metadata m16n8k32, fp16/bf16 inputs, fp32 accumulation), sm_80 and later;
// devices below 8.0 are refused before anything is launched (the kernel is a trap there, mma_sp.cuh).
//
// The product is computed transposed, D = W * X^T (M = out features, N = tokens, K = in features), so
// the sparse weight is operand A of mma.sp and X [tokens, in] row-major is operand B in its "col"
// layout. A block computes a BM x BN tile of D (BM outputs x BN tokens) with WM x WN warps; K advances
// in stages of kBK = 64 dense columns (two m16n8k32 steps) through a kStages-deep cp.async pipeline:
//   A stage: BM rows x 32 compressed values (+8 halves of padding: ldmatrix rows 80 bytes apart hit
//            distinct banks),
//   B stage: BN tokens x 64 values (+8 halves: 144 bytes apart); tokens past the end are zero-filled,
//   E stage: for each m16 row tile, the 32 metadata words of the two k32 steps (contiguous in global
//            memory, see csrc/include/pyprune_fast/sparse24.h).
// Epilogue: bias and activation in fp32, one rounding to the output type, the tile transposed through
// shared memory and written as 16-byte rows of y [tokens, out]; tokens past the end are not written.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/mma_sp.cuh"
#include "pyprune_fast/sparse24_args.h"
#include "pyprune_fast/sparse24_epilogue.cuh"

namespace pyprune_fast {
namespace {

using namespace sparse24;

constexpr int kBK = 64;                                       // dense K per pipeline stage
constexpr int kAStride = kBK / 2 + 8;                         // halves per shared row of compressed A
constexpr int kBStride = kBK + 8;                             // halves per shared row of B
constexpr int kStageWords = kBK / kTileCols * kTileWords;     // metadata words per m16 tile and stage

struct LinearArgs {
  const void* x;         // [tokens, in]
  const void* values;    // [out, in / 2]
  const uint32_t* meta;  // [out / 16, in / 32, 16]
  const void* bias;      // [out] or nullptr
  void* y;               // [tokens, out]
  int64_t tokens;
  int64_t in;
  int64_t out;
  int activation;
};

template <int BM, int BN, int WM, int WN, int STAGES>
struct Config {
  static constexpr int kBM = BM, kBN = BN, kStages = STAGES;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWarpM = BM / WM, kWarpN = BN / WN;  // warp tile: outputs x tokens
  static constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;  // m16 and n8 tiles per warp
  static constexpr int kABytes = BM * kAStride * 2, kBBytes = BN * kBStride * 2;
  static constexpr int kEBytes = BM / kTileRows * kStageWords * 4;
  static constexpr int kStageBytes = kABytes + kBBytes + kEBytes;
  static constexpr int kOutStride = BM + 8;  // halves per shared row of the output tile
  static constexpr int kSmemBytes = std::max(STAGES * kStageBytes, BN * kOutStride * 2);
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0, "warp tile must be whole m16 x n8 tiles");
  static_assert(BM % 64 == 0, "BM must divide every out that is a multiple of 64");
  static_assert(kABytes % 16 == 0 && kBBytes % 16 == 0 && kEBytes % 16 == 0, "stage parts must stay 16-byte aligned");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) sparse24_linear_kernel(const LinearArgs args) {
  extern __shared__ __align__(16) unsigned char smem[];
  const T* x = static_cast<const T*>(args.x);
  const T* values = static_cast<const T*>(args.values);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / (Cfg::kBN / Cfg::kWarpN), warp_n = warp % (Cfg::kBN / Cfg::kWarpN);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::kBN;  // first token of the block
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * Cfg::kBM;  // first output feature of the block
  const int64_t in = args.in;
  const int ktiles = static_cast<int>(in / kBK);

  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes + Cfg::kABytes); };
  auto stage_e = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * Cfg::kStageBytes + Cfg::kABytes + Cfg::kBBytes);
  };

  auto load_stage = [&](int s, int kt) {
    const int64_t k0 = static_cast<int64_t>(kt) * kBK;
    T* sa = stage_a(s);
    for (int i = tid; i < Cfg::kBM * 4; i += Cfg::kThreads) {  // 4 x 16 bytes of compressed values per row
      const int r = i / 4, c = i % 4;
      cp_async_16(sa + r * kAStride + c * 8, values + (m0 + r) * (in / 2) + k0 / 2 + c * 8, true);
    }
    T* sb = stage_b(s);
    for (int i = tid; i < Cfg::kBN * 8; i += Cfg::kThreads) {  // 8 x 16 bytes per token
      const int r = i / 8, c = i % 8;
      const bool valid = n0 + r < args.tokens;
      cp_async_16(sb + r * kBStride + c * 8, x + (valid ? n0 + r : 0) * in + k0 + c * 8, valid);
    }
    uint32_t* se = stage_e(s);
    for (int i = tid; i < Cfg::kBM / kTileRows * (kStageWords / 4); i += Cfg::kThreads) {
      const int t = i / (kStageWords / 4), c = i % (kStageWords / 4);
      const int64_t first = word_of(m0 + t * kTileRows, k0 / 4, in);  // word 0 of k32 step k0 / 32
      cp_async_16(se + t * kStageWords + c * 4, args.meta + first + c * 4, true);
    }
  };

  float acc[Cfg::kMT][Cfg::kNT][4] = {};

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();  // stage kt has landed (for this thread) ...
    __syncthreads();                    // ... for every thread, and stage kt - 1 is no longer read
    const int next = kt + Cfg::kStages - 1;
    if (next < ktiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();

    const T* sa = stage_a(kt % Cfg::kStages);
    const T* sb = stage_b(kt % Cfg::kStages);
    const uint32_t* se = stage_e(kt % Cfg::kStages);
#pragma unroll
    for (int ks = 0; ks < kBK / kTileCols; ++ks) {
      uint32_t a[Cfg::kMT][4];
      uint32_t e[Cfg::kMT];
#pragma unroll
      for (int mi = 0; mi < Cfg::kMT; ++mi) {
        // Matrices 0..3 of ldmatrix: rows 0-7 / 8-15 of the m16 tile, compressed columns 0-7 / 8-15
        // of the k32 step: a[0..3] exactly as mma.sp expects them (see mma_sp.cuh).
        const int row = warp_m * Cfg::kWarpM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = ks * 16 + (lane >> 4) * 8;
        ldmatrix_x4(a[mi], sa + row * kAStride + col);
        e[mi] = se[(warp_m * Cfg::kMT + mi) * kStageWords + ks * kTileWords + 2 * (lane >> 2) + (lane & 1)];
      }
#pragma unroll
      for (int ni = 0; ni < Cfg::kNT; ++ni) {
        // Matrix j of ldmatrix: the 8 tokens of the n8 tile, dense columns 8j..8j+7 of the k32 step.
        uint32_t b[4];
        const int row = warp_n * Cfg::kWarpN + ni * 8 + (lane & 7);
        const int col = ks * kTileCols + (lane >> 3) * 8;
        ldmatrix_x4(b, sb + row * kBStride + col);
#pragma unroll
        for (int mi = 0; mi < Cfg::kMT; ++mi) mma_sp_16832<T>(acc[mi][ni], a[mi], b, e[mi]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the output tile

  T* tile = reinterpret_cast<T*>(smem);  // [BN tokens][kOutStride]
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < Cfg::kMT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int o = warp_m * Cfg::kWarpM + mi * 16 + g + 8 * h;  // output feature within the block
      const float b = bias_at<T>(args.bias, m0 + o);
#pragma unroll
      for (int ni = 0; ni < Cfg::kNT; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int token = warp_n * Cfg::kWarpN + ni * 8 + 2 * t + j;
          tile[token * Cfg::kOutStride + o] = from_float<T>(activate(acc[mi][ni][2 * h + j] + b, args.activation));
        }
      }
    }
  }
  __syncthreads();
  T* y = static_cast<T*>(args.y);
  for (int i = tid; i < Cfg::kBN * (Cfg::kBM / 8); i += Cfg::kThreads) {
    const int r = i / (Cfg::kBM / 8), c = i % (Cfg::kBM / 8);
    if (n0 + r < args.tokens) {
      *reinterpret_cast<uint4*>(y + (n0 + r) * args.out + m0 + c * 8) =
          *reinterpret_cast<const uint4*>(tile + r * Cfg::kOutStride + c * 8);
    }
  }
}

template <typename T, typename Cfg>
void launch(const LinearArgs& args, cudaStream_t stream) {
  constexpr auto kernel = sparse24_linear_kernel<T, Cfg>;
  opt_in_shared_memory<kernel, Cfg::kSmemBytes>(c10::cuda::current_device());
  const dim3 grid(static_cast<unsigned>(ceil_div(args.tokens, Cfg::kBN)), static_cast<unsigned>(args.out / Cfg::kBM));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile shapes: 128 x 128 (8 warps of 64 x 32) when it fills the GPU; 64 x 16 (4 warps of 16 x 16,
// 4 stages) for up to 16 tokens, where the weight stream dominates; 64 x 64 (4 warps of 32 x 32) otherwise.
using LargeTile = Config<128, 128, 2, 4, 3>;
using MediumTile = Config<64, 64, 2, 2, 3>;
using SmallTile = Config<64, 16, 4, 1, 4>;

template <typename T>
void dispatch(const LinearArgs& args, cudaStream_t stream, int sms) {
  const int64_t large_blocks = ceil_div(args.tokens, LargeTile::kBN) * (args.out / LargeTile::kBM);
  if (args.out % LargeTile::kBM == 0 && large_blocks >= sms) {
    launch<T, LargeTile>(args, stream);
  } else if (args.tokens <= SmallTile::kBN) {
    launch<T, SmallTile>(args, stream);
  } else {
    launch<T, MediumTile>(args, stream);
  }
}

at::Tensor sparse24_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const auto [act, s] = check_linear_cuda(x, values, meta, bias, activation);
  TORCH_CHECK(s.out / 64 <= 65535, "sparse24_linear supports at most ", 65535 * 64, " output features, got ", s.out);
  c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major * 10 + prop->minor >= kSparseMmaMinArch,
              "sparse24_linear on CUDA needs the sparse tensor cores of compute capability 8.0 or newer; ", prop->name,
              " (", x.device(), ") has ", prop->major, ".", prop->minor,
              " (pyprune_fast.sparse24_linear uses the reference path there)");
  if (s.in == 0) return linear_without_inputs(x, s.out, bias, act).view(linear_output_shape(x, s.out));
  const auto [x2, v, e, b] = linear_operands(x, values, meta, bias, s.in);
  at::Tensor y = at::empty({x2.size(0), s.out}, x.options());
  if (x2.size(0) > 0 && s.out > 0) {  // an empty result launches nothing (a grid of 0 blocks is an error)
    const LinearArgs args{x2.data_ptr(),
                          v.data_ptr(),
                          reinterpret_cast<const uint32_t*>(e.data_ptr<int32_t>()),
                          b ? b->data_ptr() : nullptr,
                          y.data_ptr(),
                          x2.size(0),
                          s.in,
                          s.out,
                          act};
    const int sms = prop->multiProcessorCount;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (x.scalar_type() == at::kHalf) {
      dispatch<__half>(args, stream, sms);
    } else {
      dispatch<__nv_bfloat16>(args, stream, sms);
    }
  }
  return y.view(linear_output_shape(x, s.out));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) { m.impl("sparse24_linear", &sparse24_linear_cuda); }

}  // namespace pyprune_fast
