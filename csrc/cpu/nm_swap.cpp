// CPU kernel of nm_swap_gains: one task per block of kBlock positions (at::parallel_for). The score
// matrix is walked in tiles of kTile rows: for each position of the block, the tile's thresholds u and
// kept scores (pyprune_fast/nm_swap.h, shared with the CUDA kernel), then every channel's tile is loaded
// once and summed against all positions of the block (16 lanes at a time for float/half/bfloat16
// scores, accumulated in float within a tile and in double across tiles).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "pyprune_fast/cpu_simd.h"
#include "pyprune_fast/nm_swap.h"
#include "pyprune_fast/nm_swap_args.h"

namespace pyprune_fast {
namespace {

constexpr int64_t kTile = 1024;
constexpr int64_t kBlock = 4;

// u and kept of position `pos` for rows r0 .. r0 + len of the channel-major scores s [C, R].
template <typename T, typename Acc>
void thresholds(const T* s, const int64_t* perm, int64_t pos, int64_t rows, int64_t r0, int64_t len, int64_t n,
                int64_t m, Acc* u, Acc* kept) {
  const int64_t first = pos / m * m, i = pos % m;
  std::vector<Acc> v(m);
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t q = 0; q < m; ++q) v[q] = static_cast<Acc>(s[perm[first + q] * rows + r0 + t]);
    u[t] = nth_highest_of_others<Acc>([&](int64_t q) { return v[q]; }, m, n, i);
    kept[t] = v[i] > u[t] ? v[i] : u[t];
  }
}

// acc[b] += sum over t < len of swap_delta(x[t], u[b * kTile + t], kept[b * kTile + t]), b < block.
template <typename T>
PPF_TARGET_CLONES void tile_sums(const T* __restrict x, const float* __restrict u, const float* __restrict kept,
                                 int64_t len, int64_t block, double* __restrict acc) {
  using namespace vec;
  vfloat sums[kBlock] = {};
  int64_t t = 0;
  for (; t + kWidth <= len; t += kWidth) {
    const vfloat xv = load(x + t);
    for (int64_t b = 0; b < block; ++b) {
      const vfloat uv = load(u + b * kTile + t), kv = load(kept + b * kTile + t);
      const vfloat p = xv > uv ? xv : uv;
      sums[b] += p == kv ? vfloat{} : p - kv;
    }
  }
  for (int64_t b = 0; b < block; ++b) {
    float total = 0.0f;
    for (int k = 0; k < kWidth; ++k) total += sums[b][k];
    for (int64_t r = t; r < len; ++r) {
      total += swap_delta<float>(static_cast<float>(x[r]), u[b * kTile + r], kept[b * kTile + r]);
    }
    acc[b] += total;
  }
}

void tile_sums(const double* x, const double* u, const double* kept, int64_t len, int64_t block, double* acc) {
  for (int64_t b = 0; b < block; ++b) {
    double total = 0.0;
    for (int64_t r = 0; r < len; ++r) total += swap_delta<double>(x[r], u[b * kTile + r], kept[b * kTile + r]);
    acc[b] += total;
  }
}

// Gains of positions pos[0 .. block) against every channel, into out rows of width `channels`.
template <typename T, typename Acc, typename Out>
void block_gains(const T* s, const int64_t* perm, const int64_t* pos, int64_t block, int64_t channels, int64_t rows,
                 int64_t n, int64_t m, Out* out) {
  std::vector<Acc> u(kBlock * kTile), kept(kBlock * kTile);
  std::vector<double> acc(kBlock * channels, 0.0);
  std::vector<double> column(kBlock);
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t len = std::min(kTile, rows - r0);
    for (int64_t b = 0; b < block; ++b) {
      thresholds(s, perm, pos[b], rows, r0, len, n, m, u.data() + b * kTile, kept.data() + b * kTile);
    }
    for (int64_t c = 0; c < channels; ++c) {
      std::fill(column.begin(), column.end(), 0.0);
      tile_sums(s + c * rows + r0, u.data(), kept.data(), len, block, column.data());
      for (int64_t b = 0; b < block; ++b) acc[b * channels + c] += column[b];
    }
  }
  for (int64_t b = 0; b < block; ++b) {
    for (int64_t c = 0; c < channels; ++c) out[b * channels + c] = static_cast<Out>(acc[b * channels + c]);
  }
}

template <typename T, typename Acc, typename Out>
void run(const at::Tensor& s, const at::Tensor& perm, const at::Tensor& positions, int64_t n, int64_t m,
         at::Tensor& out) {
  const int64_t channels = s.size(0), rows = s.size(1), count = positions.numel();
  const T* sp = s.data_ptr<T>();
  const int64_t* pp = perm.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  Out* op = out.data_ptr<Out>();
  at::parallel_for(0, ceil_div(count, kBlock), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * kBlock, block = std::min(kBlock, count - first);
      block_gains<T, Acc, Out>(sp, pp, pos + first, block, channels, rows, n, m, op + first * channels);
    }
  });
}

at::Tensor nm_swap_gains_cpu(const at::Tensor& channel_scores, const at::Tensor& perm, const at::Tensor& positions,
                             int64_t n, int64_t m) {
  const bool f64 = check_nm_swap_args(channel_scores, perm, positions, n, m);
  TORCH_CHECK(channel_scores.device().is_cpu(), "nm_swap_gains: the tensors must be on the CPU here");
  const int64_t channels = channel_scores.size(0);
  const at::Tensor s = channel_scores.contiguous(), p = perm.contiguous(), pos = positions.contiguous();
  for (const auto& [t, what] : {std::pair{&p, "perm"}, std::pair{&pos, "positions"}}) {
    if (t->numel()) {
      TORCH_CHECK(t->min().item<int64_t>() >= 0 && t->max().item<int64_t>() < channels, "nm_swap_gains: ", what,
                  " must hold channel indices in [0, ", channels, ")");
    }
  }
  at::Tensor out = at::empty({pos.numel(), channels}, s.options().dtype(f64 ? at::kDouble : at::kFloat));
  switch (channel_scores.scalar_type()) {
    case at::kHalf:
      run<c10::Half, float, float>(s, p, pos, n, m, out);
      break;
    case at::kBFloat16:
      run<c10::BFloat16, float, float>(s, p, pos, n, m, out);
      break;
    case at::kDouble:
      run<double, double, double>(s, p, pos, n, m, out);
      break;
    default:
      run<float, float, float>(s, p, pos, n, m, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CPU, m) { m.impl("nm_swap_gains", &nm_swap_gains_cpu); }

}  // namespace pyprune_fast
