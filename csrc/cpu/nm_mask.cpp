// CPU kernel of nm_mask: one task per chunk of groups (at::parallel_for) over all tensors of the list;
// the selection rule is pyprune_fast/nm_select.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "pyprune_fast/nm_job.h"
#include "pyprune_fast/nm_select.h"

namespace pyprune_fast {
namespace {

// Selects `groups` groups of m scores from s into keep; returns the number of NaN scores seen.
template <typename T, typename Acc>
int64_t select_span(const T* s, bool* keep, int64_t groups, int64_t n, int64_t m) {
  int64_t nan = 0;
  switch (m) {
    case 2:
      for (int64_t g = 0; g < groups; ++g) nan += nm_select_group_fixed<2, Acc>(s + 2 * g, n, keep + 2 * g);
      break;
    case 4:
      for (int64_t g = 0; g < groups; ++g) nan += nm_select_group_fixed<4, Acc>(s + 4 * g, n, keep + 4 * g);
      break;
    case 8:
      for (int64_t g = 0; g < groups; ++g) nan += nm_select_group_fixed<8, Acc>(s + 8 * g, n, keep + 8 * g);
      break;
    default:
      for (int64_t g = 0; g < groups; ++g) nan += nm_select_group<Acc>(s + m * g, m, n, keep + m * g);
  }
  return nan;
}

int64_t run_chunk(const NmEntry& e, int64_t first, int64_t groups, int64_t n, int64_t m) {
  bool* keep = e.keep + first * m;
  const int64_t off = first * m;
  switch (e.dtype) {
    case kF16:
      return select_span<c10::Half, float>(static_cast<const c10::Half*>(e.scores) + off, keep, groups, n, m);
    case kBF16:
      return select_span<c10::BFloat16, float>(static_cast<const c10::BFloat16*>(e.scores) + off, keep, groups, n,
                                               m);
    case kF64:
      return select_span<double, double>(static_cast<const double*>(e.scores) + off, keep, groups, n, m);
    default:
      return select_span<float, float>(static_cast<const float*>(e.scores) + off, keep, groups, n, m);
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor> nm_mask_cpu(at::TensorList scores, int64_t n, int64_t m) {
  NmJob job = make_nm_job(scores, n, m, c10::DeviceType::CPU);
  const int64_t chunks = job.plan.size();
  std::vector<int64_t> partial(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const NmEntry& e = job.entries[job.plan.tensor[c]];
      const int64_t first = job.plan.offset[c];
      partial[c] = run_chunk(e, first, std::min(job.chunk_groups, e.groups - first), n, m);
    }
  });
  at::Tensor nan = at::zeros({static_cast<int64_t>(scores.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* counts = nan.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c) counts[job.plan.tensor[c]] += partial[c];
  return {job.outputs, nan};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CPU, m) { m.impl("nm_mask", &nm_mask_cpu); }

}  // namespace pyprune_fast
