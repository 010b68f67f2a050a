// Host-side argument checks of nm_swap_gains, shared by the CPU and CUDA launchers (the Python face in
// pyprune_fast/ops/nm_swap.py checks the same with friendlier messages, and that perm is a permutation;
// these guard direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>

namespace pyprune_fast {

// channel_scores [C, R] of a float type with C % m == 0, perm int64 [C], positions int64 [P], all on
// channel_scores' device, 0 <= n <= m, m >= 1. Returns whether the scores are float64.
inline bool check_nm_swap_args(const at::Tensor& channel_scores, const at::Tensor& perm, const at::Tensor& positions,
                               int64_t n, int64_t m) {
  TORCH_CHECK(channel_scores.dim() == 2, "nm_swap_gains: channel_scores must be [C, R], got ", channel_scores.sizes());
  const auto dtype = channel_scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "nm_swap_gains: channel_scores must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(m >= 1 && 0 <= n && n <= m, "nm_swap_gains: n:m must satisfy 0 <= n <= m and m >= 1, got ", n, ":", m);
  const int64_t channels = channel_scores.size(0);
  TORCH_CHECK(channels % m == 0, "nm_swap_gains: C=", channels, " is not a multiple of m=", m);
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.dim() == 1 && perm.numel() == channels,
              "nm_swap_gains: perm must be int64 [C] with C=", channels);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1, "nm_swap_gains: positions must be int64 [P]");
  for (const auto* t : {&perm, &positions}) {
    TORCH_CHECK(t->device() == channel_scores.device(), "nm_swap_gains: all tensors must be on ",
                channel_scores.device(), ", got ", t->device());
  }
  return dtype == at::kDouble;
}

}  // namespace pyprune_fast
