// CUDA kernel of nm_mask: one launch for the whole list. A device table holds each tensor's pointers,
// group count and dtype and each chunk's (tensor, first group); block c selects the groups of chunk c,
// one group per thread (rule: pyprune_fast/nm_select.h, shared with the CPU kernel), and adds its NaN
// count to the tensor's counter.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/nm_job.h"
#include "pyprune_fast/nm_select.h"

namespace pyprune_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kEntryWords = 4;  // scores, keep, groups, dtype

template <typename T, typename Acc>
__device__ int64_t select_chunk(const T* s, bool* keep, int64_t groups, int64_t n, int64_t m) {
  int64_t nan = 0;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    nan += m == 4 ? nm_select_group_fixed<4, Acc>(s + 4 * g, n, keep + 4 * g)
                  : nm_select_group<Acc>(s + m * g, m, n, keep + m * g);
  }
  return nan;
}

__global__ void __launch_bounds__(kThreads)
    nm_mask_kernel(const int64_t* __restrict table, int64_t n_tensors, int64_t chunk_groups, int64_t n, int64_t m,
                   unsigned long long* __restrict nan_counts) {
  const int64_t* chunk = table + n_tensors * kEntryWords + 2 * blockIdx.x;
  const int64_t* e = table + chunk[0] * kEntryWords;
  const int64_t first = chunk[1];
  const int64_t groups = min(chunk_groups, e[2] - first);
  bool* keep = reinterpret_cast<bool*>(e[1]) + first * m;
  const int64_t off = first * m;
  int64_t nan;
  switch (e[3]) {
    case kF16:
      nan = select_chunk<c10::Half, float>(reinterpret_cast<const c10::Half*>(e[0]) + off, keep, groups, n, m);
      break;
    case kBF16:
      nan = select_chunk<c10::BFloat16, float>(reinterpret_cast<const c10::BFloat16*>(e[0]) + off, keep, groups, n,
                                               m);
      break;
    case kF64:
      nan = select_chunk<double, double>(reinterpret_cast<const double*>(e[0]) + off, keep, groups, n, m);
      break;
    default:
      nan = select_chunk<float, float>(reinterpret_cast<const float*>(e[0]) + off, keep, groups, n, m);
  }
  add_block_count<kThreads>(nan, nan_counts + chunk[0]);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> nm_mask_cuda(at::TensorList scores, int64_t n, int64_t m) {
  TORCH_CHECK(!scores.empty(), "nm_mask on CUDA needs at least one tensor");
  NmJob job = make_nm_job(scores, n, m, c10::DeviceType::CUDA);  // checks first: scores[0] may be a CPU tensor
  const at::Device device = scores[0].device();
  c10::cuda::CUDAGuard guard(device);
  const int64_t n_tensors = static_cast<int64_t>(job.entries.size());
  const int64_t chunks = job.plan.size();
  at::Tensor nan = at::zeros({n_tensors}, at::TensorOptions().device(device).dtype(at::kLong));
  if (chunks > 0) {
    std::vector<int64_t> words;
    words.reserve(n_tensors * kEntryWords + 2 * chunks);
    for (const auto& e : job.entries) {
      words.push_back(reinterpret_cast<int64_t>(e.scores));
      words.push_back(reinterpret_cast<int64_t>(e.keep));
      words.push_back(e.groups);
      words.push_back(e.dtype);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      words.push_back(job.plan.tensor[c]);
      words.push_back(job.plan.offset[c]);
    }
    at::Tensor table = table_to_device(words, device);
    nm_mask_kernel<<<chunks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        table.data_ptr<int64_t>(), n_tensors, job.chunk_groups, n, m,
        reinterpret_cast<unsigned long long*>(nan.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {job.outputs, nan};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) { m.impl("nm_mask", &nm_mask_cuda); }

}  // namespace pyprune_fast
