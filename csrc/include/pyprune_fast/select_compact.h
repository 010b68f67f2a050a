// Candidate compaction for the exact k-th smallest key (csrc/cuda/select.cu, kth_smallest_counts and the
// per-tensor selections of layerwise_masks): the schedule's plan and decisions, one definition shared by
// the CUDA kernels and checked on the CPU by tests/cpp/compact_emulation.cpp. The schedule, step for step as
// pyprune_fast/reference/select_compact.py emulates it:
//   1. sample: m = min(kCompactSample, n) keys, one per stratum of the flat position range [0, n) (stratum
//      i = [i n / m, (i + 1) n / m), the position inside it by a fixed hash of i), then sorted;
//   2. bracket: lo = sorted[r_lo] and hi = sorted[r_hi], ranks around the k-th key's expected sample rank
//      c = k m / n widened by kCompactSigmas standard deviations of it (plus kCompactSlack); a rank below 0
//      gives lo = key 0, one past the sample gives hi = the largest key (no bound on that side);
//   3. one full pass: NaN per tensor, and over the other keys `below` (key < lo), `eq_lo` (key == lo),
//      `eq_hi` (key == hi != lo), and the candidates lo < key < hi written (their bits) to a buffer of
//      `capacity` entries (all of them counted, written while they fit);
//   4. decide (compact_decide): NaN -> done (refused); the k-th key is lo or hi -> done, with its counts;
//      inside (lo, hi) with every candidate written -> radix select over the candidates only; otherwise
//      (the bracket missed, or the buffer overflowed) -> the full radix passes, as without compaction;
//   5. the radix passes (11-bit digits) over the candidates, or over everything.
// Ties, ±0, ±inf and NaN keep their meaning: every key equal to the k-th lies in the same class (below,
// lo, candidates, hi), so `less` and `equal` are exact counts in every path.
#pragma once

#include <cmath>
#include <cstdint>

#include "pyprune_fast/common.h"
#include "pyprune_fast/radix.h"

namespace pyprune_fast {

constexpr int64_t kCompactSample = 1 << 14;        // sampled keys (all of them below this size)
constexpr double kCompactSigmas = 5.0;             // bracket half-width in standard deviations ...
constexpr int64_t kCompactSlack = 8;               // ... plus this many sample ranks
constexpr int64_t kCompactMinElements = 1 << 24;   // "auto": compaction from 16 M scores on
constexpr int64_t kCompactStageElements = 1 << 12;  // per block, staged in shared memory between flushes

// The selection paths after the decision (State::path in select.cu).
enum CompactPath : int64_t { kPathFull = 0, kPathCandidates = 1, kPathDone = 2 };

struct CompactPlan {
  int64_t m;         // sample size
  int64_t r_lo;      // sorted-sample index of lo (< 0: no lower bound)
  int64_t r_hi;      // sorted-sample index of hi (>= m: no upper bound)
  int64_t capacity;  // candidate buffer entries
};

// The plan for n keys (n >= 1) and 1 <= k <= n. The sample rank of the k-th key is about Binomial(m, k/n)
// (jittered strata only narrow it), so c = k m / n with sigma = sqrt(m p (1 - p)); the candidates then
// hold about n (r_hi - r_lo) / m keys, and the buffer takes 5/4 of that (plus one block's stage).
inline CompactPlan compact_plan(int64_t n, int64_t k) {
  const int64_t m = n < kCompactSample ? n : kCompactSample;
  const int64_t c = k * m / n;  // k m < 2^63 for n < 2^49
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double sigma = std::sqrt(static_cast<double>(m) * p * (1.0 - p));
  const int64_t margin = static_cast<int64_t>(std::ceil(kCompactSigmas * sigma)) + kCompactSlack;
  const int64_t r_lo = c - 1 - margin, r_hi = c - 1 + margin;
  const int64_t width = (r_hi < m - 1 ? r_hi : m - 1) - (r_lo > 0 ? r_lo : 0) + 1;
  const int64_t capacity = ceil_div(n, m) * width * 5 / 4 + kCompactStageElements;
  return {m, r_lo, r_hi, capacity < n ? capacity : n};
}

// A fixed 32-bit mix (lowbias32) of the stratum number: the sample's position inside its stratum.
PPF_HD uint32_t sample_hash(uint32_t i) {
  i ^= i >> 16;
  i *= 0x7feb352du;
  i ^= i >> 15;
  i *= 0x846ca68bu;
  i ^= i >> 16;
  return i;
}

// Flat position (in [0, n)) of sample i of m (m <= n).
PPF_HD int64_t sample_position(int64_t i, int64_t n, int64_t m) {
  const int64_t begin = i * n / m, size = (i + 1) * n / m - begin;
  return begin + static_cast<int64_t>(sample_hash(static_cast<uint32_t>(i)) % static_cast<uint64_t>(size));
}

// The bracket's keys from the sorted sample keys.
template <typename Bits>
PPF_HD Bits bracket_lo(const Bits* sorted, int64_t r_lo) {
  return r_lo < 0 ? Bits(0) : sorted[r_lo];
}
template <typename Bits>
PPF_HD Bits bracket_hi(const Bits* sorted, int64_t r_hi, int64_t m) {
  return r_hi >= m ? Bits(~Bits(0)) : sorted[r_hi];
}

// Step 3 for one element: which count it adds to, or whether it is a candidate.
enum CompactClass : int { kClassNan, kClassBelow, kClassLo, kClassHi, kClassCandidate, kClassAbove };

template <typename Fmt>
PPF_HD int compact_class(typename Fmt::Bits bits, typename Fmt::Bits lo, typename Fmt::Bits hi) {
  if (Fmt::is_nan(bits)) return kClassNan;
  const typename Fmt::Bits key = Fmt::key(bits);
  if (key < lo) return kClassBelow;
  if (key == lo) return kClassLo;
  if (key == hi) return kClassHi;
  return key < hi ? kClassCandidate : kClassAbove;
}

// Step 3's shared-memory stage, per block of `threads` threads reading 16-byte vectors of kSize-byte
// elements: flushed every compact_flush_rounds vector rounds (kCompactStageElements elements) and at each
// chunk's end, so it holds at most that plus the chunk's scalar head and tail (< 16 bytes each).
template <int kSize>
constexpr int compact_flush_rounds(int threads) {
  return static_cast<int>(kCompactStageElements) / (threads * (16 / kSize));
}
template <int kSize>
constexpr int compact_stage_slots() {
  return static_cast<int>(kCompactStageElements) + 2 * (16 / kSize);
}

// What the full pass counted (NaN aside).
struct CompactCounts {
  unsigned long long below, eq_lo, eq_hi, candidates;
};

// The decision after the full pass: the path, and for kPathDone the selection (prefix = the k-th key,
// less, equal); for kPathCandidates the rank of the k-th key among the candidates and the keys below them.
struct CompactOutcome {
  int64_t path;
  uint64_t prefix;
  long long rank, less, equal;
};

template <typename Bits>
PPF_HD CompactOutcome compact_decide(long long k, Bits lo, Bits hi, CompactCounts n, long long capacity,
                                     long long nan) {
  const auto below = static_cast<long long>(n.below), eq_lo = static_cast<long long>(n.eq_lo);
  const auto eq_hi = static_cast<long long>(n.eq_hi), cand = static_cast<long long>(n.candidates);
  CompactOutcome out{kPathFull, 0, k, 0, 0};
  if (nan > 0) {
    out.path = kPathDone;  // refused: the value is +0.0 and the counts 0 (finish_kernel)
  } else if (k <= below) {
    // missed: the k-th key is below lo
  } else if (k <= below + eq_lo) {
    out = {kPathDone, static_cast<uint64_t>(lo), 0, below, eq_lo};
  } else if (lo == hi) {
    // missed: the k-th key is above lo == hi
  } else if (k <= below + eq_lo + cand) {
    if (cand <= capacity) out = {kPathCandidates, 0, k - below - eq_lo, below + eq_lo, 0};
  } else if (k <= below + eq_lo + cand + eq_hi) {
    out = {kPathDone, static_cast<uint64_t>(hi), 0, below + eq_lo + cand, eq_hi};
  }
  return out;
}

}  // namespace pyprune_fast
