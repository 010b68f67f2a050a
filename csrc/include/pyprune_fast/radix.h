// Exact selection by radix: order-preserving integer keys and the bin logic, shared by the CPU
// (csrc/cpu/select.cpp) and CUDA (csrc/cuda/select.cu) kernels.
//
// key(x) maps a float to an unsigned integer of the same width whose unsigned order is the float
// order: -inf < ... < -0.0 == 0.0 < ... < +inf. -0.0 is mapped to the key of +0.0, so the two are one
// value. NaN is not ordered: callers count NaN and refuse it.
//
// The k-th smallest key is found digit by digit from the most significant end: a histogram pass counts
// the keys that share the prefix found so far by their next digit, the bin holding the k-th key
// extends the prefix, and k becomes its rank inside that bin.
#pragma once

#include <cstdint>
#include <cstring>

#include "pyprune_fast/common.h"

namespace pyprune_fast {

template <typename Bits>
PPF_HD Bits order_key(Bits bits) {
  constexpr Bits sign = Bits(1) << (sizeof(Bits) * 8 - 1);
  if (bits == sign) bits = 0;  // -0.0 -> +0.0
  return (bits & sign) ? Bits(~bits) : Bits(bits | sign);
}

template <typename Bits>
PPF_HD Bits key_to_bits(Bits key) {
  constexpr Bits sign = Bits(1) << (sizeof(Bits) * 8 - 1);
  return (key & sign) ? Bits(key & ~sign) : Bits(~key);
}

// The bits of the value a selection returns: the float of the selected key, or +0.0 when the inputs
// hold NaN (the selection is then refused, and every backend returns the reference's 0). Key 0, the
// prefix of a selection stopped by NaN, would otherwise map to all ones: a NaN value.
template <typename Bits>
PPF_HD Bits selection_bits(Bits key, bool has_nan) {
  return has_nan ? Bits(0) : key_to_bits<Bits>(key);
}

// Exponent all ones and a non-zero mantissa.
template <typename Bits, int kMantissaBits>
PPF_HD bool bits_are_nan(Bits bits) {
  constexpr int kWidth = sizeof(Bits) * 8;
  constexpr Bits abs_mask = Bits(~(Bits(1) << (kWidth - 1)));
  constexpr Bits exp_mask = Bits(abs_mask >> kMantissaBits << kMantissaBits);
  return (bits & abs_mask) > exp_mask;
}

// Float formats by storage width and mantissa width (fp32, fp64, fp16, bf16).
template <typename Bits_, int kMantissa_>
struct FloatFormat {
  using Bits = Bits_;
  static constexpr int kMantissa = kMantissa_;
  static constexpr int kWidth = sizeof(Bits) * 8;
  PPF_HD static Bits key(Bits bits) { return order_key<Bits>(bits); }
  PPF_HD static bool is_nan(Bits bits) { return bits_are_nan<Bits, kMantissa>(bits); }
};
using F32Format = FloatFormat<uint32_t, 23>;
using F64Format = FloatFormat<uint64_t, 52>;
using F16Format = FloatFormat<uint16_t, 10>;
using BF16Format = FloatFormat<uint16_t, 7>;

// Digit `pass` (0 = most significant) of a key of kWidth bits cut into digits of kDigit bits; the
// last digit may be narrower.
template <int kWidth, int kDigit>
struct RadixPlan {
  static constexpr int kPasses = (kWidth + kDigit - 1) / kDigit;
  PPF_HD static int shift(int pass) {
    const int s = kWidth - (pass + 1) * kDigit;
    return s > 0 ? s : 0;
  }
  PPF_HD static int bits(int pass) { return kWidth - pass * kDigit - shift(pass); }
  // Bits of the key above digit `pass`: the prefix already decided.
  PPF_HD static int prefix_shift(int pass) { return kWidth - pass * kDigit; }
  template <typename Key>
  PPF_HD static uint32_t digit(Key key, int pass) {
    return static_cast<uint32_t>((key >> shift(pass)) & ((Key(1) << bits(pass)) - 1));
  }
  template <typename Key>
  PPF_HD static bool in_prefix(Key key, Key prefix, int pass) {
    const int s = prefix_shift(pass);
    return s >= kWidth || (key >> s) == (prefix >> s);
  }
};

// The histogram pass of a radix select on one element: whether it is counted, and in which bin. Pass 0
// counts every non-NaN element (NaN adds to *nans); later passes count the keys carrying the prefix
// (a selection with NaN stops after pass 0, so no NaN reaches them).
template <typename Fmt, typename Plan>
PPF_HD bool histogram_digit(typename Fmt::Bits bits, int pass, typename Fmt::Bits prefix, uint32_t* digit,
                            unsigned int* nans) {
  if (pass == 0) {
    if (Fmt::is_nan(bits)) {
      ++*nans;
      return false;
    }
    *digit = Plan::digit(Fmt::key(bits), 0);
    return true;
  }
  const typename Fmt::Bits key = Fmt::key(bits);
  if (!Plan::in_prefix(key, prefix, pass)) return false;
  *digit = Plan::digit(key, pass);
  return true;
}

// Finds the bin of the k-th smallest key (1-based k within the current prefix): the first bin whose
// cumulative count reaches k. Returns the bin; `below` gets the count of the bins before it.
template <typename Count>
PPF_HD int select_bin(const Count* hist, int bins, Count k, Count* below) {
  Count cum = 0;
  for (int b = 0; b < bins; ++b) {
    if (cum + hist[b] >= k) {
      *below = cum;
      return b;
    }
    cum += hist[b];
  }
  *below = cum;
  return bins - 1;
}

// The same choice split over `parts` workers (the threads of a CUDA block), exactly equal to select_bin:
// part p owns the bins [p * per, min((p + 1) * per, bins)), per = ceil(bins / parts), and sums them
// (part_count); an exclusive scan of those sums gives each part the count of the bins before its range
// (`before`); then exactly one part finds the bin (part_select_bin): the part holding the first bin whose
// inclusive count reaches k, or, when k exceeds the total (select_bin's fallback), the last part.
constexpr int kSelectParts = 256;  // the block size of the CUDA selection kernels

PPF_HD int bins_per_part(int bins, int parts) { return (bins + parts - 1) / parts; }

template <typename Count>
PPF_HD Count part_count(const Count* hist, int bins, int part, int parts) {
  const int per = bins_per_part(bins, parts), begin = part * per, end = begin + per < bins ? begin + per : bins;
  Count sum = 0;
  for (int b = begin; b < end; ++b) sum += hist[b];
  return sum;
}

// True in the one part that holds the bin, which then gets the bin and the count below it.
template <typename Count>
PPF_HD bool part_select_bin(const Count* hist, int bins, int part, int parts, Count before, Count mine, Count k,
                            int* bin, Count* below) {
  const bool holds = before + mine >= k && (part == 0 || before < k);
  const bool fallback = part == parts - 1 && before + mine < k;
  if (!holds && !fallback) return false;
  const int per = bins_per_part(bins, parts), begin = part * per, end = begin + per < bins ? begin + per : bins;
  Count cum = before;
  for (int b = begin; b < end; ++b) {
    if (cum + hist[b] >= k) {
      *bin = b;
      *below = cum;
      return true;
    }
    cum += hist[b];
  }
  *bin = bins - 1;  // k beyond the total
  *below = cum;
  return true;
}

// The parts run one after another: the host emulation of the CUDA kernels' block-wide choice (radix
// select on the CPU takes its bins this way, so the CPU tests run the code the GPU runs).
template <typename Count>
PPF_HD int select_bin_by_parts(const Count* hist, int bins, Count k, Count* below, int parts) {
  Count before = 0;
  int bin = bins - 1;
  for (int p = 0; p < parts; ++p) {
    const Count mine = part_count(hist, bins, p, parts);
    if (part_select_bin(hist, bins, p, parts, before, mine, k, &bin, below)) return bin;
    before += mine;
  }
  *below = before;  // parts < 1
  return bin;
}

}  // namespace pyprune_fast
