// The host side of csrc/include/pyprune_fast/select_compact.h (the CUDA selection's candidate
// compaction) compiled for the CPU, so that tests/test_select_compact.py can hold the emulation in
// pyprune_fast/reference/select_compact.py to the very functions the kernels call, and run compact_kernel's
// loop over one chunk (select.cu) as a 256-thread block would: the scalar head and tail, the 16-byte vector
// rounds, each warp's candidates taking consecutive stage slots, the flushes.
//
// stdin, one command a line; each answer is one line on stdout:
//   plan N K                                      -> "m r_lo r_hi capacity" of compact_plan
//   positions N M                                 -> the M sample positions of sample_position
//   decide K LO HI BELOW EQ_LO EQ_HI CAND CAP NAN  -> "path prefix rank less equal" of compact_decide
//                                                    (64-bit keys)
//   pass WIDTH MANTISSA MISALIGN LO HI N x..      (LO, HI keys and x bit patterns in hex) -> "nan below eq_lo
//                                                    eq_hi candidates most-staged stage-slots written", where
//                                                    written is "ok" when the flushes wrote every candidate
//                                                    once and nothing else
#include <algorithm>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "pyprune_fast/select_compact.h"

namespace ppf = pyprune_fast;

namespace {

constexpr int kThreads = ppf::kSelectParts;  // select.cu's block

template <typename Fmt>
void compact_pass(int64_t misalign, uint64_t lo_in, uint64_t hi_in, const std::vector<typename Fmt::Bits>& xs) {
  using Bits = typename Fmt::Bits;
  constexpr int kVec = 16 / sizeof(Bits);
  constexpr int kFlushRounds = ppf::compact_flush_rounds<sizeof(Bits)>(kThreads);
  constexpr int kSlots = ppf::compact_stage_slots<sizeof(Bits)>();
  const Bits lo = static_cast<Bits>(lo_in), hi = static_cast<Bits>(hi_in);
  const int64_t n = static_cast<int64_t>(xs.size());
  long long counts[6] = {0, 0, 0, 0, 0, 0};  // by CompactClass
  std::vector<Bits> stage, written;
  size_t most = 0;
  // One step of all lanes of a warp: element[lane] (or -1), candidates staged in lane order.
  auto warp_step = [&](const int64_t* element) {
    for (int lane = 0; lane < 32; ++lane) {
      if (element[lane] < 0) continue;
      const Bits bits = xs[element[lane]];
      const int cls = ppf::compact_class<Fmt>(bits, lo, hi);
      ++counts[cls];
      if (cls == ppf::kClassCandidate) stage.push_back(bits);
    }
    most = std::max(most, stage.size());
  };
  auto flush = [&] {
    written.insert(written.end(), stage.begin(), stage.end());
    stage.clear();
  };
  const auto split = ppf::vector_split<sizeof(Bits)>(4096 + misalign * sizeof(Bits), n);
  int64_t element[32];
  for (int64_t s0 = 0; s0 < split.scalars; s0 += kThreads) {
    for (int warp = 0; warp < kThreads / 32; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t s = s0 + warp * 32 + lane;
        element[lane] = s < split.scalars ? ppf::scalar_element(split, s) : -1;
      }
      warp_step(element);
    }
  }
  int round = 0;
  for (int64_t base = 0; base < split.vectors; base += kThreads) {
    for (int warp = 0; warp < kThreads / 32; ++warp) {
      for (int j = 0; j < kVec; ++j) {
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t v = base + warp * 32 + lane;
          element[lane] = v < split.vectors ? split.head + v * kVec + j : -1;
        }
        warp_step(element);
      }
    }
    if (++round == kFlushRounds) {
      flush();
      round = 0;
    }
  }
  flush();
  std::vector<Bits> want;
  for (Bits bits : xs) {
    if (ppf::compact_class<Fmt>(bits, lo, hi) == ppf::kClassCandidate) want.push_back(bits);
  }
  std::sort(want.begin(), want.end());
  std::sort(written.begin(), written.end());
  std::cout << counts[ppf::kClassNan] << " " << counts[ppf::kClassBelow] << " " << counts[ppf::kClassLo] << " "
            << counts[ppf::kClassHi] << " " << counts[ppf::kClassCandidate] << " " << most << " " << kSlots << " "
            << (written == want ? "ok" : "differs") << "\n";
}

template <typename Fmt>
void run_pass(std::istream& in) {
  int64_t misalign, n;
  uint64_t lo, hi;
  in >> misalign >> std::hex >> lo >> hi >> std::dec >> n;
  std::vector<typename Fmt::Bits> xs(n);
  for (auto& x : xs) {
    uint64_t v;
    in >> std::hex >> v >> std::dec;
    x = static_cast<typename Fmt::Bits>(v);
  }
  compact_pass<Fmt>(misalign, lo, hi, xs);
}

}  // namespace

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
    } else if (cmd == "decide") {
      long long k, cap, nan;
      uint64_t lo, hi;
      ppf::CompactCounts c{};
      std::cin >> k >> lo >> hi >> c.below >> c.eq_lo >> c.eq_hi >> c.candidates >> cap >> nan;
      const ppf::CompactOutcome o = ppf::compact_decide<uint64_t>(k, lo, hi, c, cap, nan);
      std::cout << o.path << " " << o.prefix << " " << o.rank << " " << o.less << " " << o.equal << "\n";
    } else {
      int width, mantissa;
      std::cin >> width >> mantissa;
      if (width == 16 && mantissa == 10) {
        run_pass<ppf::F16Format>(std::cin);
      } else if (width == 16) {
        run_pass<ppf::BF16Format>(std::cin);
      } else if (width == 64) {
        run_pass<ppf::F64Format>(std::cin);
      } else {
        run_pass<ppf::F32Format>(std::cin);
      }
    }
  }
  return 0;
}
