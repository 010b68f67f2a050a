// The fp32 epilogue of both CUDA sparse24_linear kernels (sparse24_linear.cu on mma.sp, sparse24_linear_sm90.cu
// on wgmma.mma_async.sp): the bias of output o and the activation, as the CPU path (sparse24_args.h) applies
// them to the same fp32 sums before the one rounding to the output type.
#pragma once

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/sparse24_args.h"

namespace pyprune_fast {
namespace sparse24 {

__device__ __forceinline__ float activate(float v, int activation) {
  if (activation == kActRelu) return v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
  if (activation == kActGelu) return 0.5f * v * (1.f + erff(v * 0.7071067811865475f));
  return v;
}

template <typename T>
__device__ __forceinline__ float bias_at(const void* bias, int64_t o) {
  return bias ? load_float(static_cast<const T*>(bias) + o) : 0.f;
}

}  // namespace sparse24
}  // namespace pyprune_fast
