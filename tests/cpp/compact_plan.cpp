// The host side of csrc/include/pyprune_fast/select_compact.h (the CUDA selection's candidate
// compaction) compiled for the CPU, so that tests/test_select_compact.py can hold the emulation in
// pyprune_fast/reference/select_compact.py to the very functions the kernels call.
//
// stdin, one command a line; each answer is one line on stdout:
//   plan N K                                      -> "m r_lo r_hi capacity" of compact_plan
//   positions N M                                 -> the M sample positions of sample_position
//   decide K LO HI BELOW EQ_LO EQ_HI CAND CAP NAN  -> "path prefix rank less equal" of compact_decide
//                                                    (64-bit keys)
#include <cstdint>
#include <iostream>
#include <string>

#include "pyprune_fast/select_compact.h"

namespace ppf = pyprune_fast;

int main() {
  std::string cmd;
  while (std::cin >> cmd) {
    if (cmd == "plan") {
      int64_t n, k;
      std::cin >> n >> k;
      const ppf::CompactPlan p = ppf::compact_plan(n, k);
      std::cout << p.m << " " << p.r_lo << " " << p.r_hi << " " << p.capacity << "\n";
    } else if (cmd == "positions") {
      int64_t n, m;
      std::cin >> n >> m;
      for (int64_t i = 0; i < m; ++i) std::cout << (i ? " " : "") << ppf::sample_position(i, n, m);
      std::cout << "\n";
    } else {
      long long k, cap, nan;
      uint64_t lo, hi;
      ppf::CompactCounts c{};
      std::cin >> k >> lo >> hi >> c.below >> c.eq_lo >> c.eq_hi >> c.candidates >> cap >> nan;
      const ppf::CompactOutcome o = ppf::compact_decide<uint64_t>(k, lo, hi, c, cap, nan);
      std::cout << o.path << " " << o.prefix << " " << o.rank << " " << o.less << " " << o.equal << "\n";
    }
  }
  return 0;
}
