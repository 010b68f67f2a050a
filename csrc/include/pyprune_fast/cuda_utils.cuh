// Small CUDA helpers shared by the kernels in csrc/cuda/.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <vector>

#include "pyprune_fast/common.h"

namespace pyprune_fast {

template <typename T>
__device__ __forceinline__ float load_float(const T* p);
template <>
__device__ __forceinline__ float load_float<float>(const float* p) {
  return __ldg(p);
}
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) {
  return __half2float(__ldg(p));
}
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_down_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_down_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Adds the sum over the block of every thread's `local` count to *total (one atomic per block, none
// when the block's sum is 0). Call from all threads of a block of kThreads threads.
template <int kThreads>
__device__ void add_block_count(int64_t local, unsigned long long* total) {
  __shared__ unsigned long long per_warp[kThreads / 32];
  const unsigned long long w = warp_sum<unsigned long long>(static_cast<unsigned long long>(local));
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = w;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long sum = 0;
    for (int i = 0; i < kThreads / 32; ++i) sum += per_warp[i];
    if (sum) atomicAdd(total, sum);
  }
}

// Copies a host table of int64 values to the device without synchronizing the host: the values go
// through pinned memory and an asynchronous copy on the current stream. Such a copy cannot be captured
// in a CUDA graph (a replay would read the pinned buffer of the captured call, since freed or reused),
// so the ops that use it (saliency, nm_mask, the selection ops) refuse to run during a capture.
inline at::Tensor table_to_device(const std::vector<int64_t>& values, const at::Device& device) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(device.index()), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "pyprune_fast's saliency, nm_mask and selection ops cannot run during CUDA graph capture: each call "
              "copies a table of pointers from host memory, which a graph replay would not repeat");
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

// The opt-in of `Kernel` to kBytes of dynamic shared memory (above 48 KB), once per device: the attribute
// is per device and lasts, and cudaFuncSetAttribute on every launch costs host time at small sizes.
template <auto Kernel, int kBytes>
void opt_in_shared_memory(int device) {
  static std::once_flag flags[C10_COMPILE_TIME_MAX_GPUS];
  std::call_once(flags[device], [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
  });
}

}  // namespace pyprune_fast
