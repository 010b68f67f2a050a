// CPU kernel of nm_mask: one task per chunk of groups (at::parallel_for) over all tensors of the list;
// the selection rule is pyprune_fast/nm_select.h, shared with the CUDA kernel; groups of 4 of float
// scores (the 2:4 path) run 16 groups per SIMD step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "pyprune_fast/cpu_simd.h"
#include "pyprune_fast/nm_job.h"
#include "pyprune_fast/nm_select.h"

namespace pyprune_fast {
namespace {

using namespace vec;

// Groups of 4 (the 2:4 path), 16 at a time: the 64 scores are split into the vectors of the groups'
// first, second, third and fourth entries, ranked with whole-vector comparisons (the rule of
// nm_select.h: rank_i = #{j < i : s_j >= s_i} + #{j > i : s_j > s_i}), and the four keep-bytes of
// each group are written as one little-endian 32-bit word. The last groups go through nm_select.h.
template <typename T>
PPF_TARGET_CLONES int64_t select4_span(const T* __restrict s, bool* __restrict keep, int64_t groups, int64_t n) {
  vint nan = {};
  const vint limit = vint{} + static_cast<int32_t>(n);
  int64_t g = 0;
  for (; g + kWidth <= groups; g += kWidth) {
    const vfloat x0 = load(s + 4 * g), x1 = load(s + 4 * g + 16), x2 = load(s + 4 * g + 32), x3 = load(s + 4 * g + 48);
    const vfloat even01 = __builtin_shufflevector(x0, x1, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const vfloat odd01 = __builtin_shufflevector(x0, x1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const vfloat even23 = __builtin_shufflevector(x2, x3, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const vfloat odd23 = __builtin_shufflevector(x2, x3, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const vfloat a[4] = {
        __builtin_shufflevector(even01, even23, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
        __builtin_shufflevector(odd01, odd23, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
        __builtin_shufflevector(even01, even23, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
        __builtin_shufflevector(odd01, odd23, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)};
    vint word = {};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      vint rank = {};  // comparisons are 0 / -1 per lane
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (j < i) rank -= a[j] >= a[i];
        if (j > i) rank -= a[j] > a[i];
      }
      word |= ((rank < limit) & 1) << (8 * i);
      nan -= a[i] != a[i];
    }
    std::memcpy(keep + 4 * g, &word, sizeof(word));
  }
  int64_t total = 0;
  for (int k = 0; k < kWidth; ++k) total += nan[k];
  for (; g < groups; ++g) total += nm_select_group_fixed<4, float>(s + 4 * g, n, keep + 4 * g);
  return total;
}

// Selects `groups` groups of m scores from s into keep; returns the number of NaN scores seen.
template <typename T, typename Acc>
int64_t select_span(const T* s, bool* keep, int64_t groups, int64_t n, int64_t m) {
  int64_t nan = 0;
  switch (m) {
    case 2:
      for (int64_t g = 0; g < groups; ++g) nan += nm_select_group_fixed<2, Acc>(s + 2 * g, n, keep + 2 * g);
      break;
    case 4:
      if constexpr (std::is_same_v<Acc, float>) return select4_span(s, keep, groups, n);
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
