// CPU kernels of the exact selection ops: k-th smallest over many tensors by radix select (16-bit
// digits, per-thread histograms), masks and in-place pruning by one fused compare pass (ties ranked
// in flat order only when the threshold value is partly pruned), layer-wise and per-row masks.
// The streaming loops work on 64-byte vectors of raw bits; keys are made with the vector form of
// radix.h's order_key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "pyprune_fast/cpu_memory.h"
#include "pyprune_fast/cpu_simd.h"
#include "pyprune_fast/radix.h"
#include "pyprune_fast/select_job.h"

namespace pyprune_fast {
namespace {

constexpr int kDigit = 16;

struct Selection {
  uint64_t key = 0;   // key of the k-th smallest value
  int64_t less = 0;   // elements below it
  int64_t equal = 0;  // elements equal to it
  std::vector<int64_t> nan;
};

template <typename Fmt>
const typename Fmt::Bits* chunk_ptr(const SelectJob& job, int64_t c, int64_t* n) {
  const int64_t t = job.plan.tensor[c], off = job.plan.offset[c];
  *n = std::min(kChunk, job.numels[t] - off);
  return static_cast<const typename Fmt::Bits*>(job.dense[t].data_ptr()) + off;
}

// order_key of radix.h on a vector of raw bits.
template <typename Bits>
typename Simd<Bits>::type order_keys(typename Simd<Bits>::type bits) {
  using V = typename Simd<Bits>::type;
  using SV = typename Simd<Bits>::signed_type;
  constexpr Bits sign = Bits(1) << (sizeof(Bits) * 8 - 1);
  const V sign_v = Simd<Bits>::splat(sign);
  bits = bits == sign_v ? V{} : bits;  // -0.0 -> +0.0
  const V negative = reinterpret_cast<V>(reinterpret_cast<SV>(bits) >> (sizeof(Bits) * 8 - 1));
  return bits ^ (negative | sign_v);
}

template <typename Fmt>
typename Simd<typename Fmt::Bits>::type nan_lanes(typename Simd<typename Fmt::Bits>::type bits) {
  using Bits = typename Fmt::Bits;
  using V = typename Simd<Bits>::type;
  constexpr Bits abs_mask = Bits(~(Bits(1) << (Fmt::kWidth - 1)));
  constexpr Bits exp_mask = Bits(abs_mask >> Fmt::kMantissa << Fmt::kMantissa);
  return reinterpret_cast<V>((bits & abs_mask) > Simd<Bits>::splat(exp_mask));
}

// Histogram of the first digit of n keys; returns the number of NaN, which are not counted. Lanes
// alternate between two sub-tables, h and h + stride: scores crowd into a few hundred bins, and
// back-to-back increments of one counter serialize (measured 8x faster on fp32 |N(0,1)| data).
template <typename Fmt>
PPF_TARGET_CLONES int64_t histogram_first(const typename Fmt::Bits* p, int64_t n, uint32_t* h, int64_t stride) {
  using Bits = typename Fmt::Bits;
  using S = Simd<Bits>;
  using Plan = RadixPlan<Fmt::kWidth, kDigit>;
  const int shift = Plan::shift(0);
  int64_t nans = 0, i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const typename S::type bits = S::load(p + i);
    if (S::any(nan_lanes<Fmt>(bits))) {
      for (int j = 0; j < S::kLanes; ++j) {
        if (Fmt::is_nan(bits[j])) {
          ++nans;
        } else {
          ++h[Plan::digit(Fmt::key(bits[j]), 0)];
        }
      }
      continue;
    }
    const typename S::type digits = order_keys<Bits>(bits) >> shift;
    Bits lanes[S::kLanes];
    std::memcpy(lanes, &digits, sizeof(lanes));
    for (int j = 0; j < S::kLanes; j += 2) {
      ++h[lanes[j]];
      ++h[stride + lanes[j + 1]];
    }
  }
  for (; i < n; ++i) {
    if (Fmt::is_nan(p[i])) {
      ++nans;
    } else {
      ++h[Plan::digit(Fmt::key(p[i]), 0)];
    }
  }
  return nans;
}

// Histogram of digit `pass` of the keys that carry the prefix. NaN keys lie outside the range of the
// ordered keys but may share a prefix with ±inf, so matching lanes are checked for NaN (never counted).
template <typename Fmt>
PPF_TARGET_CLONES void histogram_next(const typename Fmt::Bits* p, int64_t n, int pass, typename Fmt::Bits prefix,
                                      uint32_t* h) {
  using Bits = typename Fmt::Bits;
  using S = Simd<Bits>;
  using Plan = RadixPlan<Fmt::kWidth, kDigit>;
  const int high = Plan::prefix_shift(pass);
  const typename S::type want = S::splat(static_cast<Bits>(prefix >> high));
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const typename S::type bits = S::load(p + i);
    const typename S::type keys = order_keys<Bits>(bits);
    const typename S::type match = reinterpret_cast<typename S::type>((keys >> high) == want);
    if (!S::any(match)) continue;
    for (int j = 0; j < S::kLanes; ++j) {
      if (match[j] && !Fmt::is_nan(bits[j])) ++h[Plan::digit(keys[j], pass)];
    }
  }
  for (; i < n; ++i) {
    const Bits key = Fmt::key(p[i]);
    if (Plan::in_prefix(key, prefix, pass) && !Fmt::is_nan(p[i])) ++h[Plan::digit(key, pass)];
  }
}

// One histogram pass over all chunks: per-thread 32-bit histograms, flushed into 64-bit counts every
// kFlushChunks chunks (before a 32-bit count could wrap); pass 0 also counts NaN per tensor.
template <typename Fmt>
std::vector<int64_t> histogram_pass(const SelectJob& job, int pass, typename Fmt::Bits prefix,
                                    std::vector<int64_t>& nan) {
  using Plan = RadixPlan<Fmt::kWidth, kDigit>;
  constexpr int64_t kFlushChunks = (int64_t(1) << 31) / kChunk;
  const int bins = 1 << Plan::bits(pass);
  std::vector<int64_t> hist(bins, 0);
  std::mutex mu;
  at::parallel_for(0, job.plan.size(), 1, [&](int64_t begin, int64_t end) {
    const int64_t stride = bins + 16;  // two sub-tables, not a multiple of 4 KiB apart
    std::vector<uint32_t> h(2 * stride, 0);
    std::vector<int64_t> counts(bins, 0), local_nan(job.dense.size(), 0);
    auto flush = [&]() {
      for (int b = 0; b < bins; ++b) counts[b] += int64_t(h[b]) + h[stride + b];
      std::fill(h.begin(), h.end(), 0);
    };
    for (int64_t c = begin; c < end; ++c) {
      int64_t n;
      const auto* p = chunk_ptr<Fmt>(job, c, &n);
      if (pass == 0) {
        local_nan[job.plan.tensor[c]] += histogram_first<Fmt>(p, n, h.data(), stride);
      } else {
        histogram_next<Fmt>(p, n, pass, prefix, h.data());
      }
      if ((c - begin + 1) % kFlushChunks == 0) flush();
    }
    flush();
    std::lock_guard<std::mutex> lock(mu);
    for (int b = 0; b < bins; ++b) hist[b] += counts[b];
    for (size_t t = 0; t < local_nan.size(); ++t) nan[t] += local_nan[t];
  });
  return hist;
}

// The k-th smallest key (1 <= k <= total) and the counts below and equal to it; stops after the
// first pass when there is NaN (sel.nan tells where).
template <typename Fmt>
Selection select_kth(const SelectJob& job, int64_t k) {
  using Key = typename Fmt::Bits;
  using Plan = RadixPlan<Fmt::kWidth, kDigit>;
  Selection sel;
  sel.nan.assign(job.dense.size(), 0);
  Key prefix = 0;
  int64_t rank = k;
  for (int pass = 0; pass < Plan::kPasses; ++pass) {
    const std::vector<int64_t> hist = histogram_pass<Fmt>(job, pass, prefix, sel.nan);
    if (pass == 0 && std::any_of(sel.nan.begin(), sel.nan.end(), [](int64_t v) { return v > 0; })) return sel;
    int64_t below = 0;
    const int bin = select_bin_by_parts<int64_t>(hist.data(), static_cast<int>(hist.size()), rank, &below, kSelectParts);
    sel.less += below;
    rank -= below;
    prefix |= static_cast<Key>(static_cast<Key>(bin) << Plan::shift(pass));
    sel.equal = hist[bin];
  }
  sel.key = prefix;
  return sel;
}

// keep[i] = key_i > t (or >= t when keep_ties), as bytes; returns the number of keys equal to t.
template <typename Fmt>
PPF_TARGET_CLONES int64_t compare_keep(const typename Fmt::Bits* p, int64_t n, typename Fmt::Bits t, bool keep_ties,
                                       bool* keep) {
  using Bits = typename Fmt::Bits;
  using S = Simd<Bits>;
  const typename S::type t_v = S::splat(t);
  const typename S::type one = S::splat(1);
  const typename S::type keep_ties_v = S::splat(keep_ties ? 1 : 0);
  typename S::type ties = {};
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const typename S::type keys = order_keys<Bits>(S::load(p + i));
    const typename S::type tie = reinterpret_cast<typename S::type>(keys == t_v) & one;
    const typename S::type above = (reinterpret_cast<typename S::type>(keys > t_v) & one) | (tie & keep_ties_v);
    ties += tie;  // a lane counts at most kChunk / kLanes ties
    const typename S::bytes bytes = __builtin_convertvector(above, typename S::bytes);
    std::memcpy(keep + i, &bytes, sizeof(bytes));
  }
  int64_t total = 0;
  for (int j = 0; j < S::kLanes; ++j) total += ties[j];
  for (; i < n; ++i) {
    const Bits key = Fmt::key(p[i]);
    keep[i] = key > t || (keep_ties && key == t);
    total += key == t;
  }
  return total;
}

// keep = key > t, or key == t and the tie's rank (flat order) >= need. When the threshold value is
// partly pruned (0 < need < equal), one pass keeps every tie and counts ties per chunk, and only the
// chunks holding ties of rank < need are walked again. Each chunk's flags go to
// sink.target(c, scratch) (the mask itself, or scratch), then sink.done(c, flags, n).
template <typename Fmt, typename Sink>
void threshold_pass(const SelectJob& job, uint64_t tkey, int64_t need, int64_t equal, Sink& sink) {
  using Key = typename Fmt::Bits;
  const Key t = static_cast<Key>(tkey);
  const int64_t chunks = job.plan.size();
  const bool ranked = need > 0 && need < equal;
  std::vector<int64_t> ties(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    bool scratch[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      int64_t n;
      const Key* p = chunk_ptr<Fmt>(job, c, &n);
      bool* keep = sink.target(c, scratch);
      ties[c + 1] = compare_keep<Fmt>(p, n, t, /*keep_ties=*/need == 0 || ranked, keep);
      sink.done(c, keep, n);
    }
  });
  if (!ranked) return;
  for (int64_t c = 0; c < chunks; ++c) ties[c + 1] += ties[c];
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    bool scratch[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      if (ties[c] >= need || ties[c + 1] == ties[c]) continue;  // no tie of this chunk is pruned
      int64_t n;
      const Key* p = chunk_ptr<Fmt>(job, c, &n);
      bool* keep = sink.target(c, scratch);
      if (ties[c + 1] <= need) {
        compare_keep<Fmt>(p, n, t, /*keep_ties=*/false, keep);
      } else {
        int64_t rank = ties[c];
        for (int64_t i = 0; i < n; ++i) {
          const Key key = Fmt::key(p[i]);
          const bool tie = key == t;
          keep[i] = key > t || (tie && rank >= need);
          rank += tie;
        }
      }
      sink.done(c, keep, n);
    }
  });
}

// The value of a selection (radix.h's selection_bits: +0.0 when there was NaN).
at::Tensor value_of_key(uint64_t key, bool has_nan, const at::Tensor& like) {
  at::Tensor value = at::empty({}, like.options());
  switch (like.element_size()) {
    case 2: {
      const uint16_t bits = selection_bits<uint16_t>(static_cast<uint16_t>(key), has_nan);
      std::memcpy(value.data_ptr(), &bits, 2);
      break;
    }
    case 8: {
      const uint64_t bits = selection_bits<uint64_t>(key, has_nan);
      std::memcpy(value.data_ptr(), &bits, 8);
      break;
    }
    default: {
      const uint32_t bits = selection_bits<uint32_t>(static_cast<uint32_t>(key), has_nan);
      std::memcpy(value.data_ptr(), &bits, 4);
    }
  }
  return value;
}

at::Tensor nan_tensor(const std::vector<int64_t>& nan) {
  return at::tensor(nan, at::TensorOptions().dtype(at::kLong));
}

void check_k(int64_t k, int64_t total) {
  TORCH_CHECK(k >= 1 && k <= total, "k must be in [1, ", total, "] (the number of elements), got ", k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kth_smallest_counts_cpu(at::TensorList xs, int64_t k) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CPU, /*row_major=*/false);
  check_k(k, job.total);
  return dispatch_format(job.dtype, [&]<typename Fmt>() {
    const Selection sel = select_kth<Fmt>(job, k);
    const at::Tensor counts = at::tensor(std::vector<int64_t>{sel.less, sel.equal}, at::TensorOptions().dtype(at::kLong));
    const bool has_nan = std::any_of(sel.nan.begin(), sel.nan.end(), [](int64_t v) { return v > 0; });
    return std::make_tuple(value_of_key(sel.key, has_nan, job.dense[0]), counts, nan_tensor(sel.nan));
  });
}

// radix_histogram: the int64 histogram of 16-bit digit `digit` of the order keys of the non-NaN
// elements whose higher digits equal those of `prefix` (a key, given as its int64 bit pattern), and
// the NaN count per tensor (counted by pass 0 only). The building block of selections whose histogram
// passes are combined outside (a sum over processes): every backend and rank uses the same digits.
std::tuple<at::Tensor, at::Tensor> radix_histogram_cpu(at::TensorList xs, int64_t digit, int64_t prefix) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CPU, /*row_major=*/false);
  return dispatch_format(job.dtype, [&]<typename Fmt>() {
    using Key = typename Fmt::Bits;
    using Plan = RadixPlan<Fmt::kWidth, kDigit>;
    TORCH_CHECK(digit >= 0 && digit < Plan::kPasses, "digit must be in [0, ", Plan::kPasses, ") for ", job.dtype,
                ", got ", digit);
    std::vector<int64_t> nan(job.dense.size(), 0);
    const std::vector<int64_t> hist =
        histogram_pass<Fmt>(job, static_cast<int>(digit), static_cast<Key>(static_cast<uint64_t>(prefix)), nan);
    return std::make_tuple(at::tensor(hist, at::TensorOptions().dtype(at::kLong)), nan_tensor(nan));
  });
}

// The (less, equal) counts and the threshold key of a selection given by value/counts tensors.
struct Threshold {
  uint64_t key;
  int64_t need;
  int64_t equal;
};

template <typename Fmt>
Threshold threshold_of(const at::Tensor& value, const at::Tensor& counts, int64_t k) {
  typename Fmt::Bits bits;
  std::memcpy(&bits, value.contiguous().data_ptr(), sizeof(bits));
  const at::Tensor c = counts.to(at::kLong).contiguous();
  const int64_t less = c.data_ptr<int64_t>()[0], equal = c.data_ptr<int64_t>()[1];
  TORCH_CHECK(k >= less && k <= less + equal, "k = ", k, " is not consistent with the counts (", less, ", ", equal, ")");
  return {Fmt::key(bits), k - less, equal};
}

// The masks are huge-page backed where possible and zero-filled before the compare pass writes them:
// faulting fresh pages in with one bulk fill is cheaper than faulting them one 16-byte store at a time
// inside the compare loop (1 B masks on the 2-core test machine: 0.5 s with the fill, 1.4 s without).
std::vector<at::Tensor> new_masks(const SelectJob& job) {
  std::vector<at::Tensor> masks;
  for (const auto& x : job.dense) masks.push_back(empty_output(x.sizes(), x.options().dtype(at::kBool)).zero_());
  return masks;
}

// Flags written straight into the masks.
struct MaskSink {
  const SelectJob& job;
  std::vector<at::Tensor>& masks;
  bool* target(int64_t c, bool*) { return masks[job.plan.tensor[c]].data_ptr<bool>() + job.plan.offset[c]; }
  void done(int64_t, const bool*, int64_t) {}
};

template <typename Fmt>
void fill_masks(const SelectJob& job, const Threshold& th, std::vector<at::Tensor>& masks) {
  MaskSink sink{job, masks};
  threshold_pass<Fmt>(job, th.key, th.need, th.equal, sink);
}

std::vector<at::Tensor> threshold_masks_cpu(at::TensorList xs, const at::Tensor& value, const at::Tensor& counts,
                                            int64_t k) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CPU, /*row_major=*/true);
  check_threshold(job, value, counts);
  std::vector<at::Tensor> masks = new_masks(job);
  dispatch_format(job.dtype, [&]<typename Fmt>() {
    fill_masks<Fmt>(job, threshold_of<Fmt>(value, counts, k), masks);
    return 0;
  });
  return masks;
}

template <typename Word>
void zero_pruned(void* data, const bool* keep, int64_t n) {
  Word* w = static_cast<Word*>(data);
  for (int64_t i = 0; i < n; ++i) w[i] = keep[i] ? w[i] : Word(0);
}

// Flags computed into scratch, then the pruned entries of the parameters zeroed.
struct ZeroSink {
  const SelectJob& job;
  at::TensorList params;
  bool* target(int64_t, bool* scratch) { return scratch; }
  void done(int64_t c, const bool* keep, int64_t n) {
    const at::Tensor& p = params[job.plan.tensor[c]];
    char* base = static_cast<char*>(p.data_ptr()) + job.plan.offset[c] * p.element_size();
    switch (p.element_size()) {
      case 2:
        zero_pruned<uint16_t>(base, keep, n);
        break;
      case 8:
        zero_pruned<uint64_t>(base, keep, n);
        break;
      default:
        zero_pruned<uint32_t>(base, keep, n);
    }
  }
};

void threshold_apply_cpu(at::TensorList params, at::TensorList xs, const at::Tensor& value, const at::Tensor& counts,
                         int64_t k) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CPU, /*row_major=*/true);
  check_threshold(job, value, counts);
  check_params(params, job);
  ZeroSink sink{job, params};
  dispatch_format(job.dtype, [&]<typename Fmt>() {
    const Threshold th = threshold_of<Fmt>(value, counts, k);
    threshold_pass<Fmt>(job, th.key, th.need, th.equal, sink);
    return 0;
  });
}

// Each tensor its own group: ks[i] entries of tensor i pruned (lowest first, ties by flat index).
std::tuple<std::vector<at::Tensor>, at::Tensor> layerwise_masks_cpu(at::TensorList xs, at::IntArrayRef ks) {
  const SelectJob all = make_select_job(xs, c10::DeviceType::CPU, /*row_major=*/true);
  TORCH_CHECK(ks.size() == xs.size(), "ks must have one count per tensor, got ", ks.size(), " for ", xs.size());
  std::vector<at::Tensor> masks = new_masks(all);
  std::vector<int64_t> nan(xs.size(), 0);
  dispatch_format(all.dtype, [&]<typename Fmt>() {
    for (size_t i = 0; i < xs.size(); ++i) {
      TORCH_CHECK(ks[i] >= 0 && ks[i] <= xs[i].numel(), "ks[", i, "] must be in [0, ", xs[i].numel(), "], got ", ks[i]);
      const SelectJob one = make_select_job({all.dense[i]}, c10::DeviceType::CPU, true);
      std::vector<at::Tensor> mask = {masks[i]};
      if (xs[i].numel() == 0) continue;
      const Selection sel = select_kth<Fmt>(one, std::max<int64_t>(ks[i], 1));
      nan[i] = sel.nan[0];
      if (nan[i] > 0) continue;
      // ks[i] == 0: the smallest value with need 0 keeps everything.
      fill_masks<Fmt>(one, {sel.key, ks[i] - (ks[i] == 0 ? 0 : sel.less), sel.equal}, mask);
    }
    return 0;
  });
  return {masks, nan_tensor(nan)};
}

// Each row of each tensor (viewed as (size(0), -1)) its own group: counts[i] entries of every row of
// tensor i pruned, lowest first, ties by lower index: an nth_element over (key, index) per row.
std::tuple<std::vector<at::Tensor>, at::Tensor> per_row_masks_cpu(at::TensorList xs, at::IntArrayRef counts) {
  const SelectJob all = make_select_job(xs, c10::DeviceType::CPU, /*row_major=*/true);
  TORCH_CHECK(counts.size() == xs.size(), "counts must have one count per tensor, got ", counts.size(), " for ",
              xs.size());
  std::vector<at::Tensor> masks = new_masks(all);
  std::vector<int64_t> nan(xs.size(), 0);
  dispatch_format(all.dtype, [&]<typename Fmt>() {
    using Key = typename Fmt::Bits;
    for (size_t i = 0; i < xs.size(); ++i) {
      const at::Tensor& x = all.dense[i];
      if (x.numel() == 0) continue;
      const int64_t rows = x.dim() == 0 ? 1 : x.size(0), len = x.numel() / rows, count = counts[i];
      TORCH_CHECK(count >= 0 && count <= len, "counts[", i, "] must be in [0, ", len, "], got ", count);
      const Key* p = static_cast<const Key*>(x.data_ptr());
      bool* m = masks[i].data_ptr<bool>();
      std::atomic<int64_t> nans{0};
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<std::pair<Key, int64_t>> items(len);
        for (int64_t r = begin; r < end; ++r) {
          const Key* row = p + r * len;
          bool* keep = m + r * len;
          int64_t row_nan = 0;
          for (int64_t j = 0; j < len; ++j) {
            row_nan += Fmt::is_nan(row[j]);
            items[j] = {Fmt::key(row[j]), j};
            keep[j] = true;
          }
          nans += row_nan;
          if (count == 0 || row_nan) continue;
          std::nth_element(items.begin(), items.begin() + (count - 1), items.end());
          for (int64_t j = 0; j < count; ++j) keep[items[j].second] = false;
        }
      });
      nan[i] = nans.load();
    }
    return 0;
  });
  return {masks, nan_tensor(nan)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CPU, m) {
  m.impl("kth_smallest_counts", &kth_smallest_counts_cpu);
  m.impl("radix_histogram", &radix_histogram_cpu);
  m.impl("threshold_masks", &threshold_masks_cpu);
  m.impl("threshold_apply_", &threshold_apply_cpu);
  m.impl("layerwise_masks", &layerwise_masks_cpu);
  m.impl("per_row_masks", &per_row_masks_cpu);
}

}  // namespace pyprune_fast
