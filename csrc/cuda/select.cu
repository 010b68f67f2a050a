// CUDA kernels of the exact selection ops. The k-th smallest value comes from radix select with
// 11-bit digits (2048-bin shared-memory histograms): per pass one histogram launch over every chunk of
// every tensor and one one-block launch that picks the bin by a block scan (block_select_bin: radix.h's
// select_bin, bit for bit) and extends the prefix kept in device memory, so the host never waits.
// From kCompactMinElements scores on (PYPRUNE_FAST_SELECT_PATH=full|compact forces either schedule), the
// passes read only candidates: a sample brackets the k-th key, one full pass counts the keys below the
// bracket and compacts those inside it, and the radix passes run over the compacted keys; when the bracket
// misses or the buffer overflows (decided on the device), the full passes run as before. The schedule is
// select_compact.h's, step for step as pyprune_fast/reference/select_compact.py emulates it (tested
// against reference/select.py on the CPU). Masks and in-place pruning are one compare pass; ties are
// ranked in flat order (ballot + popc tiles) only in the chunk where the partly pruned threshold value
// crosses the count. Per-row masks: one block per row, 8-bit digits, the bin chosen by the same block
// scan. radix_histogram (one pass with 16-bit digits, combined across processes by the caller): tiled
// shared-memory bins.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/radix.h"
#include "pyprune_fast/select_compact.h"
#include "pyprune_fast/select_job.h"

namespace pyprune_fast {
namespace {

constexpr int kThreads = kSelectParts;  // one bin range per thread in block_select_bin
constexpr int kWarps = kThreads / 32;
constexpr int kDigitGpu = 11;
constexpr int kRowDigit = 8;
constexpr int kTensorWords = 4;  // scores pointer, numel, output pointer, output element size

// Selection state in device memory (int64 words).
struct State {
  unsigned long long prefix;  // key bits decided so far
  long long rank;             // rank of the k-th key among keys carrying the prefix (1-based)
  long long less;             // keys below the prefix's range
  long long equal;            // keys in the selected bin of the last pass
  long long nan;              // NaN in all tensors
  long long path;             // CompactPath: the kernels of the other path return at once
  CompactCounts counted;      // the compaction pass's counts (select_compact.h)
};
constexpr int kStateWords = sizeof(State) / sizeof(int64_t);

// Device table: per tensor kTensorWords words, then per chunk (tensor, offset).
at::Tensor make_table(const SelectJob& job, const std::vector<at::Tensor>& outputs) {
  std::vector<int64_t> words;
  for (size_t t = 0; t < job.dense.size(); ++t) {
    words.push_back(reinterpret_cast<int64_t>(job.dense[t].data_ptr()));
    words.push_back(job.numels[t]);
    words.push_back(outputs.empty() ? 0 : reinterpret_cast<int64_t>(outputs[t].data_ptr()));
    words.push_back(outputs.empty() ? 0 : outputs[t].element_size());
  }
  for (int64_t c = 0; c < job.plan.size(); ++c) {
    words.push_back(job.plan.tensor[c]);
    words.push_back(job.plan.offset[c]);
  }
  return table_to_device(words, job.dense[0].device());
}

struct ChunkRef {
  int64_t tensor, offset, n;
  const int64_t* entry;
};

__device__ __forceinline__ ChunkRef chunk_ref(const int64_t* table, int64_t n_tensors, int64_t c) {
  const int64_t* chunk = table + n_tensors * kTensorWords + 2 * c;
  const int64_t* entry = table + chunk[0] * kTensorWords;
  return {chunk[0], chunk[1], min(kChunk, entry[1] - chunk[1]), entry};
}

// Rank of this thread's flag among the flags of lower threads of the block, and the block's total.
__device__ __forceinline__ int block_rank(bool flag, int* total) {
  __shared__ int warp_counts[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_counts[w] : 0;
    sum += warp_counts[w];
  }
  __syncthreads();  // warp_counts is reused by the next call
  *total = sum;
  return before + __popc(ballot & ((1u << lane) - 1));
}

// radix.h's bin choice (select_bin) by all threads of the block: thread t owns part t of the bins, a
// block scan of the parts' counts gives each part the count before it, and the one thread whose part holds
// the k-th key returns true with its bin and the count below it. Results are select_bin's, bit for bit
// (radix.h's select_bin_by_parts is the same code run part after part, which the CPU kernel uses).
// Call from all threads; the caller syncs before calling again.
template <typename Count>
__device__ __forceinline__ bool block_select_bin(const Count* hist, int bins, Count k, int* bin, Count* below) {
  using Scan = cub::BlockScan<Count, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  const Count mine = part_count(hist, bins, threadIdx.x, kThreads);
  Count before;
  Scan(scan).ExclusiveSum(mine, before);
  return part_select_bin(hist, bins, threadIdx.x, kThreads, before, mine, k, bin, below);
}

// Adds one element to the block's shared bins. kWarpWide: every lane of the warp calls it together; when
// every lane that counts has the same digit (runs of equal scores, such as the zeros of an already pruned
// model), the first of them adds them all, so that they do not serialize on one shared counter.
template <bool kWarpWide>
__device__ __forceinline__ void count_digit(unsigned int* bins, bool counted, uint32_t digit) {
  if constexpr (kWarpWide) {
    const unsigned voters = __ballot_sync(0xffffffffu, counted);
    const int leader = voters ? __ffs(voters) - 1 : 0;
    const uint32_t lead_digit = __shfl_sync(0xffffffffu, digit, leader);
    if (__all_sync(0xffffffffu, !counted || digit == lead_digit)) {
      if (voters && static_cast<int>(threadIdx.x % 32) == leader) atomicAdd(&bins[lead_digit], __popc(voters));
      return;
    }
  }
  if (counted) atomicAdd(&bins[digit], 1u);
}

// Vector v of a chunk's 16-byte vectors into lanes (16 / sizeof(Bits) elements), zeros past the last;
// returns whether v exists.
template <typename Bits>
__device__ __forceinline__ bool load_vector(const uint4* vectors, int64_t n_vectors, int64_t v, Bits* lanes) {
  const bool valid = v < n_vectors;
  const uint4 raw = valid ? __ldg(vectors + v) : make_uint4(0, 0, 0, 0);
  memcpy(lanes, &raw, sizeof(raw));
  return valid;
}

// One radix pass over every chunk: each chunk is read as 16-byte vectors (vector_split: 4 fp32, 8 fp16 or
// bf16, 2 fp64 per load) in rounds that every thread of the block takes part in (warp-wide count_digit),
// plus at most 2 x 15 scalar elements before the first and after the last 16-byte boundary.
template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const int64_t* __restrict table, int64_t n_tensors, int64_t chunks, int pass,
                     const int64_t* __restrict state_words, unsigned long long* __restrict hist,
                     unsigned long long* __restrict nan_per_tensor) {
  using Bits = typename Fmt::Bits;
  using Plan = RadixPlan<Fmt::kWidth, kDigitGpu>;
  constexpr int kVec = 16 / sizeof(Bits);
  const State* state = reinterpret_cast<const State*>(state_words);
  if (state->path != kPathFull || (pass > 0 && state->nan > 0)) return;
  __shared__ unsigned int bins[1 << kDigitGpu];
  const int n_bins = 1 << Plan::bits(pass);
  for (int b = threadIdx.x; b < n_bins; b += kThreads) bins[b] = 0;
  __syncthreads();
  const Bits prefix = static_cast<Bits>(state->prefix);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRef ref = chunk_ref(table, n_tensors, c);
    const Bits* p = reinterpret_cast<const Bits*>(ref.entry[0]) + ref.offset;
    const VectorSplit split = vector_split<sizeof(Bits)>(reinterpret_cast<uint64_t>(p), ref.n);
    unsigned int nans = 0;
    for (int64_t s = threadIdx.x; s < split.scalars; s += kThreads) {
      uint32_t digit = 0;
      const bool counted = histogram_digit<Fmt, Plan>(__ldg(p + scalar_element(split, s)), pass, prefix, &digit, &nans);
      count_digit<false>(bins, counted, digit);
    }
    const uint4* vectors = reinterpret_cast<const uint4*>(p + split.head);
    for (int64_t base = 0; base < split.vectors; base += kThreads) {
      Bits lanes[kVec];
      const bool valid = load_vector(vectors, split.vectors, base + threadIdx.x, lanes);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        uint32_t digit = 0;
        const bool counted = valid && histogram_digit<Fmt, Plan>(lanes[j], pass, prefix, &digit, &nans);
        count_digit<true>(bins, counted, digit);
      }
    }
    if (nans) atomicAdd(&nan_per_tensor[ref.tensor], static_cast<unsigned long long>(nans));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < n_bins; b += kThreads) {
    if (bins[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(bins[b]));
  }
}

// One block of kThreads, for the passes of path `serve` (it returns at once on the other path): the NaN
// total (pass 0 when reduce_nan; the compaction schedule's decide_kernel reduces it otherwise), then the
// bin of the rank-th key by block_select_bin; then it zeroes the histogram for the next pass.
template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    select_bin_kernel(unsigned long long* __restrict hist, int pass, int64_t* state_words,
                      const unsigned long long* __restrict nan_per_tensor, int64_t n_tensors, int64_t serve,
                      bool reduce_nan) {
  using Plan = RadixPlan<Fmt::kWidth, kDigitGpu>;
  State* state = reinterpret_cast<State*>(state_words);
  if (state->path != serve) return;
  if (pass == 0 && reduce_nan) {
    using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
    __shared__ typename Reduce::TempStorage reduce;
    unsigned long long mine = 0;
    for (int64_t t = threadIdx.x; t < n_tensors; t += kThreads) mine += nan_per_tensor[t];
    const unsigned long long nan = Reduce(reduce).Sum(mine);
    if (threadIdx.x == 0) state->nan = static_cast<long long>(nan);
    __syncthreads();
  }
  if (state->nan > 0) return;
  const auto rank = static_cast<unsigned long long>(state->rank);  // read by all before the scan's barriers
  const int n_bins = 1 << Plan::bits(pass);
  int bin;
  unsigned long long below;
  if (block_select_bin<unsigned long long>(hist, n_bins, rank, &bin, &below)) {
    state->less += static_cast<long long>(below);
    state->rank -= static_cast<long long>(below);
    state->prefix |= static_cast<unsigned long long>(bin) << Plan::shift(pass);
    state->equal = static_cast<long long>(hist[bin]);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < n_bins; b += kThreads) hist[b] = 0;
}

// ---- Candidate compaction (select_compact.h; reference/select_compact.py emulates these steps) ----

// Step 1: the keys of the m sampled flat positions (each tensor in its memory order: the selection does
// not depend on order). starts[t] = the flat position of tensor t's first element, starts[n_tensors] = n.
template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const int64_t* __restrict table, const int64_t* __restrict starts, int64_t n_tensors, int64_t n,
                  int64_t m, typename Fmt::Bits* __restrict sample) {
  using Bits = typename Fmt::Bits;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= m) return;
  const int64_t pos = sample_position(i, n, m);
  int64_t lo = 0, hi = n_tensors;  // the last tensor t with starts[t] <= pos (it holds pos: pos < n)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (starts[mid] <= pos) lo = mid; else hi = mid;
  }
  const Bits* p = reinterpret_cast<const Bits*>(table[lo * kTensorWords]);
  sample[i] = Fmt::key(__ldg(p + (pos - starts[lo])));
}

// Step 3's staging: every lane of the warp calls it together; the candidates of the warp take consecutive
// slots of the block's shared stage (one shared add per warp).
template <typename Bits>
__device__ __forceinline__ void stage_candidate(Bits* stage, unsigned int* staged, bool candidate, Bits bits) {
  const unsigned voters = __ballot_sync(0xffffffffu, candidate);
  if (!voters) return;
  const int lane = threadIdx.x % 32, leader = __ffs(voters) - 1;
  unsigned int base = 0;
  if (lane == leader) base = atomicAdd(staged, static_cast<unsigned int>(__popc(voters)));
  base = __shfl_sync(0xffffffffu, base, leader);
  if (candidate) stage[base + __popc(voters & ((1u << lane) - 1))] = bits;
}

// Step 3: the one full pass. Reads each chunk as histogram_kernel does (16-byte vectors, a scalar head and
// tail); counts NaN per tensor, keys below lo, equal to lo, equal to hi (!= lo); stages the candidates
// lo < key < hi in shared memory and flushes them every kFlushRounds vector rounds and at each chunk's end
// (one global add per flush reserves their slots; slots past the capacity are counted, not written).
template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(const int64_t* __restrict table, int64_t n_tensors, int64_t chunks,
                   const typename Fmt::Bits* __restrict sorted, CompactPlan plan, int64_t* state_words,
                   unsigned long long* __restrict nan_per_tensor, typename Fmt::Bits* __restrict candidates) {
  using Bits = typename Fmt::Bits;
  constexpr int kVec = 16 / sizeof(Bits);
  constexpr int kFlushRounds = compact_flush_rounds<sizeof(Bits)>(kThreads);
  constexpr int kStageSlots = compact_stage_slots<sizeof(Bits)>();
  static_assert(kFlushRounds >= 1, "one vector round must fit the stage");
  State* state = reinterpret_cast<State*>(state_words);
  __shared__ Bits stage[kStageSlots];
  __shared__ unsigned int staged, flush_count;
  __shared__ unsigned long long flush_base;
  if (threadIdx.x == 0) staged = 0;
  __syncthreads();
  const Bits lo = bracket_lo(sorted, plan.r_lo), hi = bracket_hi(sorted, plan.r_hi, plan.m);
  unsigned long long below = 0, eq_lo = 0, eq_hi = 0;
  unsigned int nans = 0;
  auto classify = [&](Bits bits, bool valid) {  // true for a candidate
    const int cls = valid ? compact_class<Fmt>(bits, lo, hi) : kClassAbove;
    nans += cls == kClassNan;
    below += cls == kClassBelow;
    eq_lo += cls == kClassLo;
    eq_hi += cls == kClassHi;
    return cls == kClassCandidate;
  };
  auto flush = [&]() {
    __syncthreads();
    if (threadIdx.x == 0) {
      flush_count = staged;
      staged = 0;
      flush_base = flush_count ? atomicAdd(&state->counted.candidates, static_cast<unsigned long long>(flush_count))
                               : 0;
    }
    __syncthreads();
    for (unsigned int i = threadIdx.x; i < flush_count; i += kThreads) {
      if (flush_base + i < static_cast<unsigned long long>(plan.capacity)) candidates[flush_base + i] = stage[i];
    }
    __syncthreads();
  };
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRef ref = chunk_ref(table, n_tensors, c);
    const Bits* p = reinterpret_cast<const Bits*>(ref.entry[0]) + ref.offset;
    const VectorSplit split = vector_split<sizeof(Bits)>(reinterpret_cast<uint64_t>(p), ref.n);
    nans = 0;
    for (int64_t s0 = 0; s0 < split.scalars; s0 += kThreads) {  // every lane takes part (stage_candidate)
      const int64_t s = s0 + threadIdx.x;
      const bool valid = s < split.scalars;
      const Bits bits = valid ? __ldg(p + scalar_element(split, s)) : Bits(0);
      stage_candidate(stage, &staged, classify(bits, valid), bits);
    }
    const uint4* vectors = reinterpret_cast<const uint4*>(p + split.head);
    int round = 0;
    for (int64_t base = 0; base < split.vectors; base += kThreads) {
      Bits lanes[kVec];
      const bool valid = load_vector(vectors, split.vectors, base + threadIdx.x, lanes);
#pragma unroll
      for (int j = 0; j < kVec; ++j) stage_candidate(stage, &staged, classify(lanes[j], valid), lanes[j]);
      if (++round == kFlushRounds) {
        flush();
        round = 0;
      }
    }
    flush();
    if (nans) atomicAdd(&nan_per_tensor[ref.tensor], static_cast<unsigned long long>(nans));
  }
  add_block_count<kThreads>(static_cast<int64_t>(below), &state->counted.below);
  __syncthreads();
  add_block_count<kThreads>(static_cast<int64_t>(eq_lo), &state->counted.eq_lo);
  __syncthreads();
  add_block_count<kThreads>(static_cast<int64_t>(eq_hi), &state->counted.eq_hi);
}

// Step 4, one block: the NaN total, then compact_decide's path and state.
template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    decide_kernel(const typename Fmt::Bits* __restrict sorted, CompactPlan plan, int64_t k, int64_t* state_words,
                  const unsigned long long* __restrict nan_per_tensor, int64_t n_tensors) {
  using Bits = typename Fmt::Bits;
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage reduce;
  State* state = reinterpret_cast<State*>(state_words);
  unsigned long long mine = 0;
  for (int64_t t = threadIdx.x; t < n_tensors; t += kThreads) mine += nan_per_tensor[t];
  const unsigned long long nan = Reduce(reduce).Sum(mine);
  if (threadIdx.x != 0) return;
  const Bits lo = bracket_lo(sorted, plan.r_lo), hi = bracket_hi(sorted, plan.r_hi, plan.m);
  const CompactOutcome out = compact_decide<Bits>(k, lo, hi, state->counted, plan.capacity, static_cast<long long>(nan));
  state->nan = static_cast<long long>(nan);
  state->path = out.path;
  state->prefix = out.prefix;
  state->rank = out.rank;
  state->less = out.less;
  state->equal = out.equal;
}

// Step 5 on the candidates: histogram_kernel's count over the compacted bits (all of them ordered: no NaN).
template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    candidate_histogram_kernel(const typename Fmt::Bits* __restrict candidates, int pass,
                               const int64_t* __restrict state_words, unsigned long long* __restrict hist) {
  using Plan = RadixPlan<Fmt::kWidth, kDigitGpu>;
  const State* state = reinterpret_cast<const State*>(state_words);
  if (state->path != kPathCandidates) return;
  const auto count = static_cast<int64_t>(state->counted.candidates);  // <= the capacity on this path
  __shared__ unsigned int bins[1 << kDigitGpu];
  const int n_bins = 1 << Plan::bits(pass);
  for (int b = threadIdx.x; b < n_bins; b += kThreads) bins[b] = 0;
  __syncthreads();
  const auto prefix = static_cast<typename Fmt::Bits>(state->prefix);
  unsigned int nans = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < count;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {  // uniform per warp (count_digit<true>)
    const int64_t i = base + threadIdx.x;
    uint32_t digit = 0;
    const bool counted = i < count && histogram_digit<Fmt, Plan>(__ldg(candidates + i), pass, prefix, &digit, &nans);
    count_digit<true>(bins, counted, digit);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < n_bins; b += kThreads) {
    if (bins[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(bins[b]));
  }
}

template <typename Fmt>
__global__ void finish_kernel(const int64_t* state_words, typename Fmt::Bits* value, int64_t* counts,
                              const unsigned long long* nan_per_tensor, int64_t* nan_out, int64_t n_tensors) {
  const State* state = reinterpret_cast<const State*>(state_words);
  using Bits = typename Fmt::Bits;
  *value = selection_bits<Bits>(static_cast<Bits>(state->prefix), state->nan > 0);
  counts[0] = state->less;
  counts[1] = state->equal;
  for (int64_t t = 0; t < n_tensors; ++t) nan_out[t] = static_cast<int64_t>(nan_per_tensor[t]);
}

int grid_for(int64_t chunks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Several blocks per SM; enough blocks that none counts more than 2^31 keys in 32-bit bins.
  const int64_t grid = std::max<int64_t>(std::min<int64_t>(chunks, 8 * sms), ceil_div(chunks, 32768));
  return static_cast<int>(std::max<int64_t>(grid, 1));
}

// Whether kth_smallest_counts compacts candidates for n scores: PYPRUNE_FAST_SELECT_PATH = "full" (the radix
// passes over everything, as before compaction), "compact" (at every size), or "auto"/unset (from
// kCompactMinElements on: below it the launches of the sample and the decision outweigh the passes saved).
bool use_compaction(int64_t n) {
  const char* env = std::getenv("PYPRUNE_FAST_SELECT_PATH");
  const std::string path = env ? env : "";
  TORCH_CHECK(path.empty() || path == "auto" || path == "full" || path == "compact",
              "PYPRUNE_FAST_SELECT_PATH must be 'auto', 'full' or 'compact', got '", path, "'");
  return path == "compact" || (path != "full" && n >= kCompactMinElements);
}

// Steps 1-5 of the compaction schedule (select_compact.h) on the stream, no host wait: sample, sort, the
// full compaction pass, the device-side decision, and the radix passes over the candidates (which return
// at once unless the decision chose them).
template <typename Fmt>
void compact_on_device(const SelectJob& job, int64_t k, const at::Tensor& table, at::Tensor& state,
                       unsigned long long* hist, unsigned long long* nan_acc) {
  using Bits = typename Fmt::Bits;
  using Plan = RadixPlan<Fmt::kWidth, kDigitGpu>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_tensors = static_cast<int64_t>(job.dense.size()), chunks = job.plan.size();
  const CompactPlan plan = compact_plan(job.total, k);
  std::vector<int64_t> starts{0};
  for (const int64_t n : job.numels) starts.push_back(starts.back() + n);
  const at::Tensor starts_d = table_to_device(starts, job.dense[0].device());
  const auto bytes = job.dense[0].options().dtype(at::kByte);
  at::Tensor keys = at::empty({2 * plan.m * static_cast<int64_t>(sizeof(Bits))}, bytes);
  auto* sample = reinterpret_cast<Bits*>(keys.data_ptr());
  Bits* sorted = sample + plan.m;
  sample_kernel<Fmt><<<ceil_div(plan.m, kThreads), kThreads, 0, stream>>>(
      table.data_ptr<int64_t>(), starts_d.data_ptr<int64_t>(), n_tensors, job.total, plan.m, sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t sort_bytes = 0;
  const int m = static_cast<int>(plan.m);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, sort_bytes, sample, sorted, m, 0, Fmt::kWidth, stream));
  at::Tensor sort_temp = at::empty({static_cast<int64_t>(sort_bytes)}, bytes);
  C10_CUDA_CHECK(
      cub::DeviceRadixSort::SortKeys(sort_temp.data_ptr(), sort_bytes, sample, sorted, m, 0, Fmt::kWidth, stream));
  at::Tensor buffer = at::empty({plan.capacity * static_cast<int64_t>(sizeof(Bits))}, bytes);
  auto* candidates = reinterpret_cast<Bits*>(buffer.data_ptr());
  compact_kernel<Fmt><<<grid_for(chunks), kThreads, 0, stream>>>(table.data_ptr<int64_t>(), n_tensors, chunks,
                                                                  sorted, plan, state.data_ptr<int64_t>(), nan_acc,
                                                                  candidates);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decide_kernel<Fmt><<<1, kThreads, 0, stream>>>(sorted, plan, k, state.data_ptr<int64_t>(), nan_acc, n_tensors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int grid = static_cast<int>(std::clamp<int64_t>(ceil_div(plan.capacity, 16 * kThreads), 1, 4 * sms));
  for (int pass = 0; pass < Plan::kPasses; ++pass) {
    candidate_histogram_kernel<Fmt><<<grid, kThreads, 0, stream>>>(candidates, pass, state.data_ptr<int64_t>(),
                                                                   hist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    select_bin_kernel<Fmt><<<1, kThreads, 0, stream>>>(hist, pass, state.data_ptr<int64_t>(), nan_acc, n_tensors,
                                                       kPathCandidates, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs the selection; value (0-d, dtype of xs), counts int64 [2], nan int64 [n] come back filled. With
// compaction the full radix passes below are the fallback: their kernels return at once unless the
// decision chose them (State::path), so the host launches them without knowing.
template <typename Fmt>
void select_on_device(const SelectJob& job, int64_t k, at::Tensor& value, at::Tensor& counts, at::Tensor& nan) {
  using Plan = RadixPlan<Fmt::kWidth, kDigitGpu>;
  const auto device = job.dense[0].device();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_tensors = static_cast<int64_t>(job.dense.size()), chunks = job.plan.size();
  at::Tensor state = table_to_device({0, k, 0, 0, 0, kPathFull, 0, 0, 0, 0}, device);
  static_assert(kStateWords == 10, "State layout");
  at::Tensor hist = at::zeros({1 << kDigitGpu}, state.options());  // select_bin_kernel zeroes it after each pass
  at::Tensor nan_acc = at::zeros({n_tensors}, state.options());
  const at::Tensor table = make_table(job, {});
  auto* hist_ptr = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  auto* nan_ptr = reinterpret_cast<unsigned long long*>(nan_acc.data_ptr<int64_t>());
  const bool compact = chunks > 0 && use_compaction(job.total);
  if (compact) compact_on_device<Fmt>(job, k, table, state, hist_ptr, nan_ptr);
  for (int pass = 0; pass < Plan::kPasses; ++pass) {
    if (chunks > 0) {
      histogram_kernel<Fmt><<<grid_for(chunks), kThreads, 0, stream>>>(table.data_ptr<int64_t>(), n_tensors, chunks,
                                                                        pass, state.data_ptr<int64_t>(), hist_ptr,
                                                                        nan_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    select_bin_kernel<Fmt><<<1, kThreads, 0, stream>>>(hist_ptr, pass, state.data_ptr<int64_t>(), nan_ptr,
                                                       n_tensors, kPathFull, !compact);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_kernel<Fmt><<<1, 1, 0, stream>>>(state.data_ptr<int64_t>(),
                                          reinterpret_cast<typename Fmt::Bits*>(value.data_ptr()),
                                          counts.data_ptr<int64_t>(), nan_ptr, nan.data_ptr<int64_t>(), n_tensors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// radix_histogram: one pass with 16-bit digits, the digit every backend and process agrees on. 65536
// 32-bit bins do not fit one block's shared memory, so blockIdx.y picks a tile of kHistTileBins bins
// (64 KiB of dynamic shared memory) and each tile's blocks read the data once more; per-block counts
// stay below 2^31 (grid_for), then are added to the int64 histogram in global memory.
constexpr int kHistDigit = 16;
constexpr int kHistTileBins = 1 << 14;
constexpr int kHistTiles = (1 << kHistDigit) / kHistTileBins;

template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(const int64_t* __restrict table, int64_t n_tensors, int64_t chunks, int pass,
                           unsigned long long prefix, unsigned long long* __restrict hist,
                           unsigned long long* __restrict nan_per_tensor) {
  using Bits = typename Fmt::Bits;
  using Plan = RadixPlan<Fmt::kWidth, kHistDigit>;
  extern __shared__ unsigned int tile_bins[];
  const uint32_t tile_begin = blockIdx.y * kHistTileBins;
  for (int b = threadIdx.x; b < kHistTileBins; b += kThreads) tile_bins[b] = 0;
  __syncthreads();
  const Bits want = static_cast<Bits>(prefix);
  const bool count_nan = pass == 0 && blockIdx.y == 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRef ref = chunk_ref(table, n_tensors, c);
    const Bits* p = reinterpret_cast<const Bits*>(ref.entry[0]) + ref.offset;
    unsigned int nans = 0;
    for (int64_t i = threadIdx.x; i < ref.n; i += kThreads) {
      const Bits bits = __ldg(p + i);
      if (Fmt::is_nan(bits)) {
        nans += count_nan ? 1u : 0u;
        continue;
      }
      const Bits key = Fmt::key(bits);
      if (!Plan::in_prefix(key, want, pass)) continue;
      const uint32_t bin = Plan::digit(key, pass) - tile_begin;  // wraps above 2^32 below the tile
      if (bin < static_cast<uint32_t>(kHistTileBins)) atomicAdd(&tile_bins[bin], 1u);
    }
    if (nans) atomicAdd(&nan_per_tensor[ref.tensor], static_cast<unsigned long long>(nans));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kHistTileBins; b += kThreads) {
    if (tile_bins[b]) atomicAdd(&hist[tile_begin + b], static_cast<unsigned long long>(tile_bins[b]));
  }
}

std::tuple<at::Tensor, at::Tensor> radix_histogram_cuda(at::TensorList xs, int64_t pass, int64_t prefix) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CUDA, /*row_major=*/false);
  c10::cuda::CUDAGuard guard(job.dense[0].device());  // after the checks: xs[0] may be a CPU tensor
  const auto opts = job.dense[0].options().dtype(at::kLong);
  const int64_t n_tensors = static_cast<int64_t>(job.dense.size()), chunks = job.plan.size();
  at::Tensor hist = at::zeros({1 << kHistDigit}, opts);
  at::Tensor nan = at::zeros({n_tensors}, opts);
  dispatch_format(job.dtype, [&]<typename Fmt>() {
    using Plan = RadixPlan<Fmt::kWidth, kHistDigit>;
    TORCH_CHECK(pass >= 0 && pass < Plan::kPasses, "pass must be in [0, ", Plan::kPasses, ") for ", job.dtype,
                ", got ", pass);
    if (chunks == 0) return 0;
    const at::Tensor table = make_table(job, {});
    const int smem = kHistTileBins * static_cast<int>(sizeof(unsigned int));
    auto* kernel = &radix_histogram_kernel<Fmt>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(grid_for(chunks), kHistTiles);
    kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        table.data_ptr<int64_t>(), n_tensors, chunks, static_cast<int>(pass), static_cast<unsigned long long>(prefix),
        reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
        reinterpret_cast<unsigned long long*>(nan.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return 0;
  });
  return {hist, nan};
}

void check_k(int64_t k, int64_t total) {
  TORCH_CHECK(k >= 1 && k <= total, "k must be in [1, ", total, "] (the number of elements), got ", k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kth_smallest_counts_cuda(at::TensorList xs, int64_t k) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CUDA, /*row_major=*/false);
  c10::cuda::CUDAGuard guard(job.dense[0].device());  // after the checks: xs[0] may be a CPU tensor
  check_k(k, job.total);
  auto [value, counts, nan] = selection_outputs(job);
  dispatch_format(job.dtype, [&]<typename Fmt>() {
    select_on_device<Fmt>(job, k, value, counts, nan);
    return 0;
  });
  return {value, counts, nan};
}

// The threshold on the device: key of value, need = k - less, equal.
template <typename Fmt>
struct DeviceThreshold {
  typename Fmt::Bits key;
  long long need, equal;
  __device__ static DeviceThreshold load(const typename Fmt::Bits* value, const int64_t* counts, int64_t k) {
    return {Fmt::key(*value), static_cast<long long>(k - counts[0]), static_cast<long long>(counts[1])};
  }
  __device__ bool ranked() const { return need > 0 && need < equal; }
};

template <typename Fmt>
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(const int64_t* __restrict table, int64_t n_tensors, const typename Fmt::Bits* value,
                     const int64_t* counts, int64_t k, int64_t* __restrict ties) {
  using Bits = typename Fmt::Bits;
  const auto th = DeviceThreshold<Fmt>::load(value, counts, k);
  const int64_t c = blockIdx.x;
  if (!th.ranked()) {
    if (threadIdx.x == 0) ties[c] = 0;
    return;
  }
  const ChunkRef ref = chunk_ref(table, n_tensors, c);
  const Bits* p = reinterpret_cast<const Bits*>(ref.entry[0]) + ref.offset;
  __shared__ unsigned long long total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  unsigned int mine = 0;
  for (int64_t i = threadIdx.x; i < ref.n; i += kThreads) mine += Fmt::key(__ldg(p + i)) == th.key;
  mine = warp_sum<unsigned int>(mine);
  if (threadIdx.x % 32 == 0 && mine) atomicAdd(&total, static_cast<unsigned long long>(mine));
  __syncthreads();
  if (threadIdx.x == 0) ties[c] = static_cast<int64_t>(total);
}

template <int kSize>
__device__ __forceinline__ void zero_if_pruned(char* out, int64_t i, bool keep) {
  if (keep) return;
  if constexpr (kSize == 2) reinterpret_cast<uint16_t*>(out)[i] = 0;
  if constexpr (kSize == 4) reinterpret_cast<uint32_t*>(out)[i] = 0;
  if constexpr (kSize == 8) reinterpret_cast<uint64_t*>(out)[i] = 0;
}

// kApply = false: out is the bool mask; true: out is the parameter, whose pruned entries become 0.
template <typename Fmt, bool kApply>
__global__ void __launch_bounds__(kThreads)
    threshold_kernel(const int64_t* __restrict table, int64_t n_tensors, const typename Fmt::Bits* value,
                     const int64_t* counts, int64_t k, const int64_t* __restrict ties,
                     const int64_t* __restrict ties_inclusive) {
  using Bits = typename Fmt::Bits;
  const auto th = DeviceThreshold<Fmt>::load(value, counts, k);
  const ChunkRef ref = chunk_ref(table, n_tensors, blockIdx.x);
  const Bits* p = reinterpret_cast<const Bits*>(ref.entry[0]) + ref.offset;
  char* out = reinterpret_cast<char*>(ref.entry[2]) + ref.offset * ref.entry[3];
  const int size = static_cast<int>(ref.entry[3]);
  auto emit = [&](int64_t i, bool keep) {
    if constexpr (!kApply) {
      reinterpret_cast<bool*>(out)[i] = keep;
    } else if (size == 2) {
      zero_if_pruned<2>(out, i, keep);
    } else if (size == 8) {
      zero_if_pruned<8>(out, i, keep);
    } else {
      zero_if_pruned<4>(out, i, keep);
    }
  };
  long long first_rank = 0;
  bool ranked = th.ranked();
  bool keep_ties = th.need <= 0;
  if (ranked) {
    const long long end = ties_inclusive[blockIdx.x];
    first_rank = end - ties[blockIdx.x];
    if (end <= th.need || first_rank >= th.need) {  // every tie of this chunk pruned, or every one kept
      ranked = false;
      keep_ties = first_rank >= th.need;
    }
  }
  if (!ranked) {
    for (int64_t i = threadIdx.x; i < ref.n; i += kThreads) {
      const Bits key = Fmt::key(__ldg(p + i));
      emit(i, key > th.key || (keep_ties && key == th.key));
    }
    return;
  }
  long long running = first_rank;
  for (int64_t base = 0; base < ref.n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const Bits key = i < ref.n ? Fmt::key(__ldg(p + i)) : Bits(0);
    const bool tie = i < ref.n && key == th.key;
    int tile_ties;
    const int rank = block_rank(tie, &tile_ties);
    if (i < ref.n) emit(i, key > th.key || (tie && running + rank >= th.need));
    running += tile_ties;
  }
}

template <typename Fmt, bool kApply>
void threshold_on_device(const SelectJob& job, const std::vector<at::Tensor>& outputs, const at::Tensor& value,
                         const at::Tensor& counts, int64_t k) {
  const int64_t n_tensors = static_cast<int64_t>(job.dense.size()), chunks = job.plan.size();
  if (chunks == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor table = make_table(job, outputs);
  const at::Tensor value_c = value.to(job.dense[0].device(), job.dtype).contiguous();
  const at::Tensor counts_c = counts.to(job.dense[0].device(), at::kLong).contiguous();
  const auto* v = reinterpret_cast<const typename Fmt::Bits*>(value_c.data_ptr());
  at::Tensor ties = at::empty({chunks}, counts_c.options());
  tie_count_kernel<Fmt><<<chunks, kThreads, 0, stream>>>(table.data_ptr<int64_t>(), n_tensors, v,
                                                         counts_c.data_ptr<int64_t>(), k, ties.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor inclusive = at::cumsum(ties, 0);
  threshold_kernel<Fmt, kApply><<<chunks, kThreads, 0, stream>>>(table.data_ptr<int64_t>(), n_tensors, v,
                                                                 counts_c.data_ptr<int64_t>(), k,
                                                                 ties.data_ptr<int64_t>(),
                                                                 inclusive.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> empty_masks(const SelectJob& job) {
  std::vector<at::Tensor> masks;
  for (const auto& x : job.dense) masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
  return masks;
}

std::vector<at::Tensor> threshold_masks_cuda(at::TensorList xs, const at::Tensor& value, const at::Tensor& counts,
                                             int64_t k) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CUDA, /*row_major=*/true);
  c10::cuda::CUDAGuard guard(job.dense[0].device());  // after the checks: xs[0] may be a CPU tensor
  check_threshold(job, value, counts);
  std::vector<at::Tensor> masks = empty_masks(job);
  dispatch_format(job.dtype, [&]<typename Fmt>() {
    threshold_on_device<Fmt, false>(job, masks, value, counts, k);
    return 0;
  });
  return masks;
}

void threshold_apply_cuda(at::TensorList params, at::TensorList xs, const at::Tensor& value, const at::Tensor& counts,
                          int64_t k) {
  const SelectJob job = make_select_job(xs, c10::DeviceType::CUDA, /*row_major=*/true);
  c10::cuda::CUDAGuard guard(job.dense[0].device());  // after the checks: xs[0] may be a CPU tensor
  check_threshold(job, value, counts);
  check_params(params, job);
  const std::vector<at::Tensor> outputs(params.begin(), params.end());
  dispatch_format(job.dtype, [&]<typename Fmt>() {
    threshold_on_device<Fmt, true>(job, outputs, value, counts, k);
    return 0;
  });
}

// Each tensor its own group: the pipeline above per tensor, with device-side results only.
std::tuple<std::vector<at::Tensor>, at::Tensor> layerwise_masks_cuda(at::TensorList xs, at::IntArrayRef ks) {
  const SelectJob all = make_select_job(xs, c10::DeviceType::CUDA, /*row_major=*/true);
  c10::cuda::CUDAGuard guard(all.dense[0].device());  // after the checks: xs[0] may be a CPU tensor
  TORCH_CHECK(ks.size() == xs.size(), "ks must have one count per tensor, got ", ks.size(), " for ", xs.size());
  std::vector<at::Tensor> masks = empty_masks(all);
  at::Tensor nan = at::zeros({static_cast<int64_t>(xs.size())}, all.dense[0].options().dtype(at::kLong));
  dispatch_format(all.dtype, [&]<typename Fmt>() {
    for (size_t i = 0; i < xs.size(); ++i) {
      TORCH_CHECK(ks[i] >= 0 && ks[i] <= xs[i].numel(), "ks[", i, "] must be in [0, ", xs[i].numel(), "], got ", ks[i]);
      if (xs[i].numel() == 0) continue;
      const SelectJob one = make_select_job({all.dense[i]}, c10::DeviceType::CUDA, true);
      auto [value, counts, one_nan] = selection_outputs(one);
      // k = 0 still runs the selection (for its NaN count) at k = 1, whose `less` is 0: need = 0.
      select_on_device<Fmt>(one, std::max<int64_t>(ks[i], 1), value, counts, one_nan);
      threshold_on_device<Fmt, false>(one, {masks[i]}, value, counts, ks[i]);
      nan.narrow(0, static_cast<int64_t>(i), 1).copy_(one_nan);
    }
    return 0;
  });
  return {masks, nan};
}

// One block per row: radix select over the row with 8-bit digits, then the masked write with ties
// ranked by index.
template <typename Fmt>
__global__ void __launch_bounds__(kThreads) per_row_kernel(const typename Fmt::Bits* __restrict x,
                                                           bool* __restrict mask, int64_t len, int64_t count,
                                                           unsigned long long* __restrict nan_count) {
  using Bits = typename Fmt::Bits;
  using Plan = RadixPlan<Fmt::kWidth, kRowDigit>;
  const Bits* p = x + blockIdx.x * len;
  bool* m = mask + blockIdx.x * len;
  __shared__ unsigned int bins[1 << kRowDigit];
  __shared__ unsigned long long s_prefix;
  __shared__ long long s_rank, s_less, s_equal;
  __shared__ unsigned int s_nan;
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_rank = count > 0 ? count : 1;
    s_less = 0;
    s_equal = 0;
    s_nan = 0;
  }
  for (int pass = 0; pass < Plan::kPasses; ++pass) {
    for (int b = threadIdx.x; b < (1 << kRowDigit); b += kThreads) bins[b] = 0;
    __syncthreads();
    const Bits prefix = static_cast<Bits>(s_prefix);
    unsigned int nans = 0;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const Bits bits = p[i];
      if (pass == 0 && Fmt::is_nan(bits)) {
        ++nans;
        continue;
      }
      const Bits key = Fmt::key(bits);
      if (Plan::in_prefix(key, prefix, pass)) atomicAdd(&bins[Plan::digit(key, pass)], 1u);
    }
    if (nans) atomicAdd(&s_nan, nans);
    __syncthreads();
    if (s_nan > 0) {  // refused: report, keep everything
      if (threadIdx.x == 0) atomicAdd(nan_count, static_cast<unsigned long long>(s_nan));
      for (int64_t i = threadIdx.x; i < len; i += kThreads) m[i] = true;
      return;
    }
    int bin;
    unsigned int below;
    if (block_select_bin<unsigned int>(bins, 1 << Plan::bits(pass), static_cast<unsigned int>(s_rank), &bin, &below)) {
      s_less += below;
      s_rank -= below;
      s_prefix |= static_cast<unsigned long long>(bin) << Plan::shift(pass);
      s_equal = bins[bin];
    }
    __syncthreads();
  }
  const Bits t = static_cast<Bits>(s_prefix);
  const long long need = count - (count > 0 ? s_less : 0);
  if (need <= 0 || need >= s_equal) {
    const bool keep_ties = need <= 0;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const Bits key = Fmt::key(p[i]);
      m[i] = key > t || (keep_ties && key == t);
    }
    return;
  }
  long long running = 0;
  for (int64_t base = 0; base < len; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const Bits key = i < len ? Fmt::key(p[i]) : Bits(0);
    const bool tie = i < len && key == t;
    int tile_ties;
    const int rank = block_rank(tie, &tile_ties);
    if (i < len) m[i] = key > t || (tie && running + rank >= need);
    running += tile_ties;
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor> per_row_masks_cuda(at::TensorList xs, at::IntArrayRef counts) {
  const SelectJob all = make_select_job(xs, c10::DeviceType::CUDA, /*row_major=*/true);
  c10::cuda::CUDAGuard guard(all.dense[0].device());  // after the checks: xs[0] may be a CPU tensor
  TORCH_CHECK(counts.size() == xs.size(), "counts must have one count per tensor, got ", counts.size(), " for ",
              xs.size());
  std::vector<at::Tensor> masks = empty_masks(all);
  at::Tensor nan = at::zeros({static_cast<int64_t>(xs.size())}, all.dense[0].options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_format(all.dtype, [&]<typename Fmt>() {
    for (size_t i = 0; i < xs.size(); ++i) {
      const at::Tensor& x = all.dense[i];
      if (x.numel() == 0) continue;
      const int64_t rows = x.dim() == 0 ? 1 : x.size(0), len = x.numel() / rows;
      TORCH_CHECK(counts[i] >= 0 && counts[i] <= len, "counts[", i, "] must be in [0, ", len, "], got ", counts[i]);
      TORCH_CHECK(rows <= INT32_MAX, "xs[", i, "] has ", rows, " rows; at most 2^31 - 1 are supported");
      TORCH_CHECK(len <= INT32_MAX, "xs[", i, "] has rows of ", len, " entries; at most 2^31 - 1 are supported");
      per_row_kernel<Fmt><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
          reinterpret_cast<const typename Fmt::Bits*>(x.data_ptr()), masks[i].data_ptr<bool>(), len, counts[i],
          reinterpret_cast<unsigned long long*>(nan.data_ptr<int64_t>() + i));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return 0;
  });
  return {masks, nan};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) {
  m.impl("kth_smallest_counts", &kth_smallest_counts_cuda);
  m.impl("radix_histogram", &radix_histogram_cuda);
  m.impl("threshold_masks", &threshold_masks_cuda);
  m.impl("threshold_apply_", &threshold_apply_cuda);
  m.impl("layerwise_masks", &layerwise_masks_cuda);
  m.impl("per_row_masks", &per_row_masks_cuda);
}

}  // namespace pyprune_fast
