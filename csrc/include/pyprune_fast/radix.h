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

}  // namespace pyprune_fast
