// N:M group selection, shared by csrc/cpu/nm_mask.cpp and csrc/cuda/nm_mask.cu.
//
// A group is m consecutive scores s_0..s_{m-1}; the n highest are kept:
//
//   rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}        keep_i = rank_i < n
//
// so among equal scores the lower index ranks first and is kept first. Comparisons are IEEE: -0.0
// equals 0.0 and +-inf are ordinary values. NaN would make the ranks meaningless, so the selection also
// counts the NaN scores of the group and callers refuse scores that hold any.
#pragma once

#include <cstdint>

#include "pyprune_fast/common.h"

namespace pyprune_fast {

// Keep-flags of one group whose size m is known at run time; returns the number of NaN scores.
// Acc is the comparison type (float for fp32/fp16/bf16 scores, double for fp64).
template <typename Acc, typename T>
PPF_HD int64_t nm_select_group(const T* s, int64_t m, int64_t n, bool* keep) {
  int64_t nan = 0;
  for (int64_t i = 0; i < m; ++i) {
    const Acc si = static_cast<Acc>(s[i]);
    nan += si != si;
    int64_t rank = 0;
    for (int64_t j = 0; j < m; ++j) {
      const Acc sj = static_cast<Acc>(s[j]);
      rank += (sj > si) | ((j < i) & (sj == si));
    }
    keep[i] = rank < n;
  }
  return nan;
}

// The same rule for a group size fixed at compile time (the scores are loaded once into registers).
template <int M, typename Acc, typename T>
PPF_HD int64_t nm_select_group_fixed(const T* s, int64_t n, bool* keep) {
  Acc v[M];
  int64_t nan = 0;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    v[i] = static_cast<Acc>(s[i]);
    nan += v[i] != v[i];
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    int rank = 0;
#pragma unroll
    for (int j = 0; j < M; ++j) rank += (v[j] > v[i]) | ((j < i) & (v[j] == v[i]));
    keep[i] = rank < n;
  }
  return nan;
}

}  // namespace pyprune_fast
