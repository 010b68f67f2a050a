// CUDA kernels of compress_24 / decompress_24: one thread per metadata word (the per-word rules are
// pyprune_fast/sparse24.h, shared with the CPU kernels); chunks that are not 2:4 are counted on the
// device and returned, so the caller decides when to synchronize.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/sparse24_args.h"

namespace pyprune_fast {
namespace {

using namespace sparse24;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    compress_kernel(const T* __restrict w, const bool* __restrict mask, T* __restrict values,
                    int32_t* __restrict meta, int64_t words, int64_t in, unsigned long long* invalid) {
  int64_t local = 0;
  for (int64_t word = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; word < words;
       word += static_cast<int64_t>(gridDim.x) * kThreads) {
    meta[word] = static_cast<int32_t>(compress_word(w, mask, values, word, in, &local));
  }
  add_block_count<kThreads>(local, invalid);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    decompress_kernel(const T* __restrict values, const uint32_t* __restrict meta, T* __restrict dense,
                      int64_t words, int64_t in, unsigned long long* invalid) {
  int64_t local = 0;
  for (int64_t word = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; word < words;
       word += static_cast<int64_t>(gridDim.x) * kThreads) {
    local += decompress_word(values, meta[word], dense, word, in);
  }
  add_block_count<kThreads>(local, invalid);
}

unsigned blocks_for(int64_t words) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, ceil_div(words, kThreads))));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_24_cuda(const at::Tensor& w_in,
                                                                const std::optional<at::Tensor>& mask_in) {
  const Shape s = check_dense(w_in, mask_in);
  c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const at::Tensor mask = mask_in ? mask_in->contiguous() : at::Tensor();
  at::Tensor values = at::empty({s.out, s.in / 2}, w.options());
  at::Tensor meta = at::empty({s.out / kTileRows, s.in / kTileCols, kTileWords}, w.options().dtype(at::kInt));
  at::Tensor invalid = at::zeros({}, w.options().dtype(at::kLong));
  const int64_t words = meta.numel();
  if (words > 0) {
    auto* count = reinterpret_cast<unsigned long long*>(invalid.data_ptr<int64_t>());
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    const auto stream = at::cuda::getCurrentCUDAStream();
    switch (w.scalar_type()) {
      case at::kHalf:
        compress_kernel<c10::Half><<<blocks_for(words), kThreads, 0, stream>>>(
            w.data_ptr<c10::Half>(), m, values.data_ptr<c10::Half>(), meta.data_ptr<int32_t>(), words, s.in, count);
        break;
      case at::kBFloat16:
        compress_kernel<c10::BFloat16><<<blocks_for(words), kThreads, 0, stream>>>(
            w.data_ptr<c10::BFloat16>(), m, values.data_ptr<c10::BFloat16>(), meta.data_ptr<int32_t>(), words, s.in,
            count);
        break;
      default:
        compress_kernel<float><<<blocks_for(words), kThreads, 0, stream>>>(
            w.data_ptr<float>(), m, values.data_ptr<float>(), meta.data_ptr<int32_t>(), words, s.in, count);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {values, meta, invalid};
}

std::tuple<at::Tensor, at::Tensor> decompress_24_cuda(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const Shape s = check_compressed(values_in, meta_in);
  c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  at::Tensor dense = at::empty({s.out, s.in}, values.options());
  at::Tensor invalid = at::zeros({}, values.options().dtype(at::kLong));
  const int64_t words = meta.numel();
  if (words > 0) {
    auto* count = reinterpret_cast<unsigned long long*>(invalid.data_ptr<int64_t>());
    const auto* e = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
    const auto stream = at::cuda::getCurrentCUDAStream();
    switch (values.scalar_type()) {
      case at::kHalf:
        decompress_kernel<c10::Half><<<blocks_for(words), kThreads, 0, stream>>>(
            values.data_ptr<c10::Half>(), e, dense.data_ptr<c10::Half>(), words, s.in, count);
        break;
      case at::kBFloat16:
        decompress_kernel<c10::BFloat16><<<blocks_for(words), kThreads, 0, stream>>>(
            values.data_ptr<c10::BFloat16>(), e, dense.data_ptr<c10::BFloat16>(), words, s.in, count);
        break;
      default:
        decompress_kernel<float><<<blocks_for(words), kThreads, 0, stream>>>(values.data_ptr<float>(), e,
                                                                            dense.data_ptr<float>(), words, s.in,
                                                                            count);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dense, invalid};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) {
  m.impl("compress_24", &compress_24_cuda);
  m.impl("decompress_24", &decompress_24_cuda);
}

}  // namespace pyprune_fast
