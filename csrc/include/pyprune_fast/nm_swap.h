// The kept-score change of an N:M channel swap, shared by csrc/cpu/nm_swap.cpp and csrc/cuda/nm_swap.cu.
//
// In one row of a score matrix a group holds m channels with scores s_0..s_{m-1}; the N:M mask keeps
// the n highest, so the group keeps the sum of its n highest scores. Replacing the channel at index i
// by a channel of score x changes that sum by
//
//   delta_i(x) = max(x, u_i) - kept_i,   kept_i = max(s_i, u_i),
//   u_i = the n-th highest of the other m - 1 scores  (+inf when n = 0: nothing is kept;
//                                                       -inf when n = m: everything is kept)
//
// since x enters the kept set exactly when it beats u_i, which then leaves it. Ties do not matter: the
// kept sum depends on the values only. Equal operands differ by exactly 0, so +-inf are ordinary values
// (an infinite score that stays kept changes nothing). NaN scores are refused by the callers.
#pragma once

#include <cmath>
#include <cstdint>

#include "pyprune_fast/common.h"

namespace pyprune_fast {

// u_i of a group of m scores, read as value(0) .. value(m - 1), for the channel at index i (see above).
template <typename Acc, typename Value>
PPF_HD Acc nth_highest_of_others(const Value& value, int64_t m, int64_t n, int64_t i) {
  if (n <= 0) return static_cast<Acc>(INFINITY);
  if (n >= m) return static_cast<Acc>(-INFINITY);
  for (int64_t j = 0; j < m; ++j) {
    if (j == i) continue;
    const Acc vj = value(j);
    int64_t greater = 0, equal = 0;
    for (int64_t k = 0; k < m; ++k) {
      if (k == i) continue;
      const Acc vk = value(k);
      greater += vk > vj;
      equal += vk == vj;
    }
    if (greater < n && n <= greater + equal) return vj;
  }
  return value(i == 0 ? 1 : 0);  // unreachable for NaN-free scores
}

// max(x, u) - kept, with equal operands giving exactly 0.
template <typename Acc>
PPF_HD Acc swap_delta(Acc x, Acc u, Acc kept) {
  const Acc p = x > u ? x : u;
  return p == kept ? static_cast<Acc>(0) : p - kept;
}

}  // namespace pyprune_fast
