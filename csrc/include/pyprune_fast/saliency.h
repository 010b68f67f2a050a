// The saliency element rule and its statistics, shared by csrc/cpu/saliency.cpp and
// csrc/cuda/saliency.cu.
//
//   s = |g * w|                         (computed in fp32 from fp32/fp16/bf16 inputs)
//   accumulate variant: acc += scale * s^power, power in {1, 2}
//
// Statistics of the written values (s, or acc after the update), one record per call:
//   [0] count      number of elements
//   [1] sum        sum of the finite values            (fp64)
//   [2] sumsq      sum of squares of the finite values (fp64)
//   [3] min        smallest finite value (+inf if none)
//   [4] max        largest finite value  (-inf if none)
//   [5] nonfinite  number of +-inf and NaN values
//   [6] nan        number of NaN values
#pragma once

#include <cmath>
#include <limits>

#include "pyprune_fast/common.h"

namespace pyprune_fast {

constexpr int kStatsSize = 7;

// Per-chunk partial statistics. Sums within a chunk are kept in fp32 lanes over short runs and
// flushed into the fp64 fields (see the kernels); this record is what a chunk reports.
struct SaliencyStats {
  double count;
  double sum;
  double sumsq;
  double min;
  double max;
  double nonfinite;
  double nan;
};

PPF_HD SaliencyStats stats_identity() {
  const double inf = INFINITY;
  return {0.0, 0.0, 0.0, inf, -inf, 0.0, 0.0};
}

PPF_HD SaliencyStats stats_combine(const SaliencyStats& a, const SaliencyStats& b) {
  return {a.count + b.count,
          a.sum + b.sum,
          a.sumsq + b.sumsq,
          b.min < a.min ? b.min : a.min,
          b.max > a.max ? b.max : a.max,
          a.nonfinite + b.nonfinite,
          a.nan + b.nan};
}

// |g * w| in fp32.
PPF_HD float saliency_value(float g, float w) { return fabsf(g * w); }

// acc + scale * s^power (power 1 or 2).
PPF_HD float saliency_accumulate(float acc, float s, float scale, int power) {
  const float t = power == 2 ? s * s : s;
  return acc + scale * t;
}

// A value counts in sum/sumsq/min/max only when finite; `v < inf && v > -inf` is false for NaN.
PPF_HD bool is_finite_value(float v) { return v < INFINITY && v > -INFINITY; }

}  // namespace pyprune_fast
