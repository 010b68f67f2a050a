// CUDA kernel of nm_swap_gains: block b handles one position (b / tiles) against a tile of kChannels
// channels (b % tiles). The rows are walked kThreads at a time: each thread computes one row's
// threshold u and kept score into shared memory (pyprune_fast/nm_swap.h, shared with the CPU kernel),
// then warp w sums the deltas of channels w, w + kWarps, ... of the tile with its lanes striding over the
// rows (coalesced loads of the channel-major scores). Per-thread sums in double, one warp reduction per
// channel at the end.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/nm_swap.h"
#include "pyprune_fast/nm_swap_args.h"

namespace pyprune_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChannels = 32;
constexpr int kPerWarp = kChannels / kWarps;

template <typename T, typename Acc, typename Out>
__global__ void __launch_bounds__(kThreads)
    nm_swap_gains_kernel(const T* __restrict s, const int64_t* __restrict perm, const int64_t* __restrict positions,
                         int64_t channels, int64_t rows, int64_t n, int64_t m, Out* __restrict out) {
  __shared__ Acc u[kThreads];
  __shared__ Acc kept[kThreads];
  const int64_t tiles = ceil_div(channels, kChannels);
  const int64_t index = blockIdx.x / tiles, c0 = (blockIdx.x % tiles) * kChannels;
  const int64_t pos = positions[index], first = pos / m * m, i = pos % m;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double acc[kPerWarp] = {};
  for (int64_t r0 = 0; r0 < rows; r0 += kThreads) {
    const int64_t r = r0 + threadIdx.x;
    if (r < rows) {
      const auto value = [&](int64_t q) { return static_cast<Acc>(s[perm[first + q] * rows + r]); };
      const Acc ur = nth_highest_of_others<Acc>(value, m, n, i);
      const Acc own = value(i);
      u[threadIdx.x] = ur;
      kept[threadIdx.x] = own > ur ? own : ur;
    }
    __syncthreads();
    const int64_t len = min(static_cast<int64_t>(kThreads), rows - r0);
#pragma unroll
    for (int k = 0; k < kPerWarp; ++k) {
      const int64_t c = c0 + warp + k * kWarps;
      if (c >= channels) continue;
      const T* x = s + c * rows + r0;
      Acc partial = 0;
      for (int64_t t = lane; t < len; t += 32) partial += swap_delta<Acc>(static_cast<Acc>(x[t]), u[t], kept[t]);
      acc[k] += partial;
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kPerWarp; ++k) {
    const double total = warp_sum<double>(acc[k]);
    const int64_t c = c0 + warp + k * kWarps;
    if (lane == 0 && c < channels) out[index * channels + c] = static_cast<Out>(total);
  }
}

template <typename T, typename Acc, typename Out>
void launch(const at::Tensor& s, const at::Tensor& perm, const at::Tensor& positions, int64_t n, int64_t m,
            at::Tensor& out) {
  const int64_t channels = s.size(0), rows = s.size(1), count = positions.numel();
  const int64_t blocks = count * ceil_div(channels, kChannels);
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "nm_swap_gains: too many positions x channel tiles for one launch");
  nm_swap_gains_kernel<T, Acc, Out><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<T>(), perm.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), channels, rows, n, m,
      out.data_ptr<Out>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// perm must be a permutation and positions indices in [0, C): checked by the Python wrapper
// (pyprune_fast.ops.nm_swap_gains), not here, where a check would synchronize with the device.
at::Tensor nm_swap_gains_cuda(const at::Tensor& channel_scores, const at::Tensor& perm, const at::Tensor& positions,
                              int64_t n, int64_t m) {
  const bool f64 = check_nm_swap_args(channel_scores, perm, positions, n, m);
  c10::cuda::CUDAGuard guard(channel_scores.device());
  const at::Tensor s = channel_scores.contiguous(), p = perm.contiguous(), pos = positions.contiguous();
  at::Tensor out = at::empty({pos.numel(), s.size(0)}, s.options().dtype(f64 ? at::kDouble : at::kFloat));
  switch (channel_scores.scalar_type()) {
    case at::kHalf:
      launch<c10::Half, float, float>(s, p, pos, n, m, out);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16, float, float>(s, p, pos, n, m, out);
      break;
    case at::kDouble:
      launch<double, double, double>(s, p, pos, n, m, out);
      break;
    default:
      launch<float, float, float>(s, p, pos, n, m, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) { m.impl("nm_swap_gains", &nm_swap_gains_cuda); }

}  // namespace pyprune_fast
