// Host emulation of the CUDA selection kernels (csrc/cuda/select.cu) from the header they share with
// the CPU kernels, csrc/include/pyprune_fast/radix.h, compiled for the CPU: the block-wide bin choice
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
  long long n;
  in >> n;
  const auto xs = read_values<Fmt>(in, n);
  if (cmd == "select") {
    select<Fmt>(k, xs, digit);
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
