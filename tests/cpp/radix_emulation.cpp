// Host emulation of the CUDA selection kernels (csrc/cuda/select.cu) from the header they share with
// the CPU kernels, csrc/include/pyprune_fast/radix.h, compiled for the CPU: the histogram pass (16-byte
// vectors, scalar head and tail, warp-wide adds of equal digits), the block-wide bin choice
// (one part of the bins per thread of a 256-thread block, select_bin_by_parts), the radix passes of
// kth_smallest_counts (11-bit digits) and of per_row_masks (8-bit digits, then the masked write with
// ties ranked by index). tests/test_radix_emulation.py builds it and compares it with the reference.
//
// stdin, one command a line; each answer is one line on stdout:
//   bins PARTS K N c_0 .. c_N-1        -> "bin below" of select_bin, of select_bin_by_parts, of the block
//                                          (all parts run), and the number of parts that claimed the bin
//   select WIDTH MANTISSA DIGIT K N x..   (x: bit patterns in hex) -> "value_bits less equal nan", plus
//                                          " several-holders" if a pass had more than one part claim its bin
//   rowmask WIDTH MANTISSA COUNT N x..    -> N characters 0/1 (1 = kept), "nan <count>" or "several-holders"
//   hist WIDTH MANTISSA PASS PREFIX MISALIGN N x..  (PREFIX in hex) -> "ok <nan> <warp-wide adds>" when the
//                                          kernel's vector/scalar split and warp-wide counting give the
//                                          plain histogram, else what differs
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "pyprune_fast/radix.h"

namespace ppf = pyprune_fast;

namespace {

constexpr int kParts = ppf::kSelectParts;

// block_select_bin of select.cu with every thread run: each part's count, the exclusive scan, then
// part_select_bin in every part. `holders` gets the number of parts that claimed the bin (the kernel
// needs exactly one: two would both write the selection state).
template <typename Count>
int block_choice(const Count* hist, int bins, Count k, int parts, Count* below, int* holders) {
  std::vector<Count> mine(parts), before(parts);
  Count sum = 0;
  for (int p = 0; p < parts; ++p) {
    mine[p] = ppf::part_count(hist, bins, p, parts);
    before[p] = sum;
    sum += mine[p];
  }
  int chosen = -1;
  *holders = 0;
  for (int p = 0; p < parts; ++p) {
    int bin;
    Count b;
    if (ppf::part_select_bin(hist, bins, p, parts, before[p], mine[p], k, &bin, &b)) {
      ++*holders;
      chosen = bin;
      *below = b;
    }
  }
  return chosen;
}

struct Result {
  uint64_t prefix = 0;
  long long rank = 0, less = 0, equal = 0, nan = 0;
  bool one_holder = true;  // every pass had exactly one part claiming the bin
};

// The passes of select_on_device / per_row_kernel: histogram of the keys carrying the prefix (NaN counted
// in pass 0 and never binned; a selection with NaN stops there), then the block-wide bin choice.
template <typename Fmt, int kDigit, typename Count>
Result radix_select(const std::vector<typename Fmt::Bits>& xs, long long k) {
  using Bits = typename Fmt::Bits;
  using Plan = ppf::RadixPlan<Fmt::kWidth, kDigit>;
  Result r;
  r.rank = k;
  for (int pass = 0; pass < Plan::kPasses; ++pass) {
    std::vector<Count> hist(1u << Plan::bits(pass), 0);
    const Bits prefix = static_cast<Bits>(r.prefix);
    for (Bits bits : xs) {
      if (pass == 0 && Fmt::is_nan(bits)) {
        ++r.nan;
        continue;
      }
      const Bits key = Fmt::key(bits);
      if (Plan::in_prefix(key, prefix, pass)) ++hist[Plan::digit(key, pass)];
    }
    if (r.nan > 0) return r;
    Count below = 0;
    int holders = 0;
    const int bin = block_choice<Count>(hist.data(), static_cast<int>(hist.size()), static_cast<Count>(r.rank), kParts,
                                        &below, &holders);
    r.one_holder = r.one_holder && holders == 1;
    r.less += static_cast<long long>(below);
    r.rank -= static_cast<long long>(below);
    r.prefix |= static_cast<uint64_t>(bin) << Plan::shift(pass);
    r.equal = static_cast<long long>(hist[bin]);
  }
  return r;
}

template <typename Fmt>
void select(long long k, const std::vector<typename Fmt::Bits>& xs, int digit) {
  using Bits = typename Fmt::Bits;
  const Result r = digit == 8 ? radix_select<Fmt, 8, unsigned long long>(xs, k)
                              : radix_select<Fmt, 11, unsigned long long>(xs, k);
  const Bits value = ppf::selection_bits<Bits>(static_cast<Bits>(r.prefix), r.nan > 0);
  std::cout << std::hex << static_cast<uint64_t>(value) << std::dec << " " << (r.nan ? 0 : r.less) << " "
            << (r.nan ? 0 : r.equal) << " " << r.nan << (r.one_holder ? "" : " several-holders") << "\n";
}

// per_row_kernel for one row: 8-bit digits with 32-bit counts, then keep = key > t, or a tie whose rank
// among the row's ties (by index) is >= need.
template <typename Fmt>
void rowmask(long long count, const std::vector<typename Fmt::Bits>& xs) {
  using Bits = typename Fmt::Bits;
  const Result r = radix_select<Fmt, 8, unsigned int>(xs, count > 0 ? count : 1);
  if (r.nan > 0) {
    std::cout << "nan " << r.nan << "\n";
    return;
  }
  if (!r.one_holder) {
    std::cout << "several-holders\n";
    return;
  }
  const Bits t = static_cast<Bits>(r.prefix);
  const long long need = count - (count > 0 ? r.less : 0);
  const bool ranked = !(need <= 0 || need >= r.equal);
  long long ties = 0;
  std::string out;
  for (Bits bits : xs) {
    const Bits key = Fmt::key(bits);
    const bool tie = key == t;
    const bool keep = ranked ? key > t || (tie && ties >= need) : key > t || (need <= 0 && tie);
    ties += tie;
    out += keep ? '1' : '0';
  }
  std::cout << out << "\n";
}

// histogram_kernel on one chunk that starts `misalign` elements past a 16-byte boundary: the scalar head
// and tail, then the vector rounds of a 256-thread block, each warp's 32 lanes counting element j of their
// vectors together (count_digit<true>: one add for the lanes that share one digit). Compared with a plain
// histogram; prints "ok <nan> <warp-wide adds>" or what differs.
template <typename Fmt>
void histogram(int pass, uint64_t prefix_in, long long misalign, const std::vector<typename Fmt::Bits>& xs) {
  using Bits = typename Fmt::Bits;
  using Plan = ppf::RadixPlan<Fmt::kWidth, 11>;
  constexpr int kVec = 16 / sizeof(Bits);
  constexpr int kThreads = ppf::kSelectParts;
  const Bits prefix = static_cast<Bits>(prefix_in);
  const int64_t n = static_cast<int64_t>(xs.size());
  const int bins = 1 << Plan::bits(pass);
  std::vector<unsigned long long> got(bins, 0), want(bins, 0);
  std::vector<int> seen(n, 0);
  unsigned int nans = 0, want_nans = 0;
  long long aggregated = 0;
  for (Bits bits : xs) {
    uint32_t digit = 0;
    if (ppf::histogram_digit<Fmt, Plan>(bits, pass, prefix, &digit, &want_nans)) ++want[digit];
  }
  const uint64_t address = 4096 + misalign * sizeof(Bits);
  const auto split = ppf::vector_split<sizeof(Bits)>(address, n);
  if (split.vectors > 0 && (address + split.head * sizeof(Bits)) % 16 != 0) {
    std::cout << "vectors not 16-byte aligned\n";
    return;
  }
  for (int64_t s = 0; s < split.scalars; ++s) {
    const int64_t e = ppf::scalar_element(split, s);
    ++seen[e];
    uint32_t digit = 0;
    if (ppf::histogram_digit<Fmt, Plan>(xs[e], pass, prefix, &digit, &nans)) ++got[digit];
  }
  for (int64_t base = 0; base < split.vectors; base += kThreads) {
    for (int warp = 0; warp < kThreads / 32; ++warp) {
      for (int j = 0; j < kVec; ++j) {
        bool counted[32];
        uint32_t digit[32];
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t v = base + warp * 32 + lane;
          digit[lane] = 0;
          counted[lane] = false;
          if (v < split.vectors) {
            const int64_t e = split.head + v * kVec + j;
            ++seen[e];
            counted[lane] = ppf::histogram_digit<Fmt, Plan>(xs[e], pass, prefix, &digit[lane], &nans);
          }
        }
        int leader = -1, voters = 0;
        bool same = true;
        for (int lane = 0; lane < 32; ++lane) {
          if (!counted[lane]) continue;
          if (leader < 0) leader = lane;
          ++voters;
          same = same && digit[lane] == digit[leader];
        }
        if (same) {
          if (voters) got[digit[leader]] += voters, ++aggregated;
        } else {
          for (int lane = 0; lane < 32; ++lane) got[digit[lane]] += counted[lane];
        }
      }
    }
  }
  for (int64_t e = 0; e < n; ++e) {
    if (seen[e] != 1) {
      std::cout << "element " << e << " read " << seen[e] << " times\n";
      return;
    }
  }
  if (got != want || nans != want_nans) {
    std::cout << "histogram differs\n";
    return;
  }
  std::cout << "ok " << nans << " " << aggregated << "\n";
}

template <typename Fmt>
std::vector<typename Fmt::Bits> read_values(std::istream& in, long long n) {
  std::vector<typename Fmt::Bits> xs(n);
  for (auto& x : xs) {
    uint64_t v;
    in >> std::hex >> v >> std::dec;
    x = static_cast<typename Fmt::Bits>(v);
  }
  return xs;
}

template <typename Fmt>
void run(const std::string& cmd, long long k, int digit, std::istream& in) {
  uint64_t prefix = 0;
  long long misalign = 0, n;
  if (cmd == "hist") in >> std::hex >> prefix >> std::dec >> misalign;
  in >> n;
  const auto xs = read_values<Fmt>(in, n);
  if (cmd == "select") {
    select<Fmt>(k, xs, digit);
  } else if (cmd == "hist") {
    histogram<Fmt>(static_cast<int>(k), prefix, misalign, xs);
  } else {
    rowmask<Fmt>(k, xs);
  }
}

}  // namespace

int main() {
  std::string cmd;
  while (std::cin >> cmd) {
    if (cmd == "bins") {
      int parts;
      long long k, n;
      std::cin >> parts >> k >> n;
      std::vector<unsigned long long> hist(n);
      for (auto& c : hist) std::cin >> c;
      unsigned long long below = 0, below_parts = 0, below_block = 0;
      int holders = 0;
      const auto kk = static_cast<unsigned long long>(k);
      const int bins = static_cast<int>(n);
      const int bin = ppf::select_bin<unsigned long long>(hist.data(), bins, kk, &below);
      const int bin_parts = ppf::select_bin_by_parts<unsigned long long>(hist.data(), bins, kk, &below_parts, parts);
      const int bin_block = block_choice<unsigned long long>(hist.data(), bins, kk, parts, &below_block, &holders);
      std::cout << bin << " " << below << " " << bin_parts << " " << below_parts << " " << bin_block << " "
                << below_block << " " << holders << "\n";
      continue;
    }
    int width, mantissa, digit = 8;
    long long k;
    std::cin >> width >> mantissa;
    if (cmd == "select") std::cin >> digit;
    std::cin >> k;
    if (width == 16 && mantissa == 10) {
      run<ppf::F16Format>(cmd, k, digit, std::cin);
    } else if (width == 16) {
      run<ppf::BF16Format>(cmd, k, digit, std::cin);
    } else if (width == 64) {
      run<ppf::F64Format>(cmd, k, digit, std::cin);
    } else {
      run<ppf::F32Format>(cmd, k, digit, std::cin);
    }
  }
  return 0;
}
