// CPU kernels of saliency / saliency_accumulate_: one task per chunk (at::parallel_for); the inner
// loop works on 16-float SIMD vectors (GCC/Clang vector extensions), compiled for x86-64-v4, x86-64-v3
// (AVX2 + F16C + FMA) and baseline x86-64 with selection at load time (x86-64-v4 = AVX-512).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "pyprune_fast/cpu_simd.h"
#include "pyprune_fast/saliency_job.h"

namespace pyprune_fast {
namespace {

using namespace vec;

constexpr int64_t kRun = 1024;  // elements summed in fp32 lanes before flushing to fp64

// kPower: 0 = plain |g*w|, 1 or 2 = accumulate scale * |g*w|^kPower into out.
template <typename T, int kPower>
PPF_TARGET_CLONES SaliencyStats saliency_span(const T* __restrict g, const T* __restrict w,
                                              float* __restrict out, int64_t n, float scale) {
  SaliencyStats st = stats_identity();
  st.count = static_cast<double>(n);
  const vfloat zero = {}, inf = zero + INFINITY, ninf = zero - INFINITY;
  const vint abs_mask = (vint){} + 0x7fffffff, exp_mask = (vint){} + 0x7f800000;
  int64_t i = 0;
  for (; i + kWidth <= n;) {
    const int64_t run_begin = i, run_end = std::min(n, i + kRun);
    vfloat s = zero, ss = zero, mn = inf, mx = ninf;
    vint nonfinite = {}, nan = {};
    for (; i + kWidth <= run_end; i += kWidth) {
      vfloat v = reinterpret_cast<vfloat>(reinterpret_cast<vint>(load(g + i) * load(w + i)) & abs_mask);
      if constexpr (kPower > 0) {
        const vfloat t = kPower == 2 ? v * v : v;
        v = load(out + i) + scale * t;
      }
      store(out + i, v);
      // Finite / NaN from the bits: one integer compare each (GCC scalarizes `(a < b) & (c > d)`).
      const vint magnitude = reinterpret_cast<vint>(v) & abs_mask;
      const vint fin = magnitude < exp_mask;
      const vfloat vf = fin ? v : zero;
      s += vf;
      ss += vf * vf;
      const vfloat lo = fin ? v : inf, hi = fin ? v : ninf;
      mn = lo < mn ? lo : mn;
      mx = hi > mx ? hi : mx;
      nonfinite -= ~fin;  // lanes are 0 or -1: subtracting ~fin adds 1 where not finite
      nan -= magnitude > exp_mask;
    }
    bool overflow = false;
    for (int j = 0; j < kWidth; ++j) overflow |= std::isinf(s[j]) || std::isinf(ss[j]);
    if (overflow) {  // finite scores whose fp32 lane sum or square overflowed: this run again in fp64
      s = zero;
      ss = zero;
      for (int64_t k = run_begin; k < i; ++k) {
        const double v = out[k];
        if (is_finite_value(out[k])) {
          st.sum += v;
          st.sumsq += v * v;
        }
      }
    }
    for (int j = 0; j < kWidth; ++j) {
      st.sum += s[j];
      st.sumsq += ss[j];
      st.min = std::min<double>(st.min, mn[j]);
      st.max = std::max<double>(st.max, mx[j]);
      st.nonfinite += nonfinite[j];
      st.nan += nan[j];
    }
  }
  for (; i < n; ++i) {  // the tail, element by element with the same rule
    float v = saliency_value(static_cast<float>(g[i]), static_cast<float>(w[i]));
    if constexpr (kPower > 0) v = saliency_accumulate(out[i], v, scale, kPower);
    out[i] = v;
    const bool fin = is_finite_value(v);
    st.sum += fin ? v : 0.f;
    st.sumsq += fin ? static_cast<double>(v) * v : 0.0;
    if (fin) {
      st.min = std::min<double>(st.min, v);
      st.max = std::max<double>(st.max, v);
    }
    st.nonfinite += !fin;
    st.nan += v != v;
  }
  return st;
}

template <int kPower>
SaliencyStats run_chunk(const SaliencyEntry& e, int64_t offset, float scale) {
  const int64_t n = std::min(kChunk, e.numel - offset);
  float* out = e.out + offset;
  switch (e.dtype) {
    case kF16:
      return saliency_span<c10::Half, kPower>(static_cast<const c10::Half*>(e.g) + offset,
                                              static_cast<const c10::Half*>(e.w) + offset, out, n, scale);
    case kBF16:
      return saliency_span<c10::BFloat16, kPower>(static_cast<const c10::BFloat16*>(e.g) + offset,
                                                  static_cast<const c10::BFloat16*>(e.w) + offset, out, n,
                                                  scale);
    default:
      return saliency_span<float, kPower>(static_cast<const float*>(e.g) + offset,
                                          static_cast<const float*>(e.w) + offset, out, n, scale);
  }
}

// Runs every chunk of the job and reduces the per-chunk statistics in chunk order.
at::Tensor run_job(const SaliencyJob& job, int power, float scale) {
  const int64_t chunks = job.plan.size();
  std::vector<SaliencyStats> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const SaliencyEntry& e = job.entries[job.plan.tensor[c]];
      const int64_t off = job.plan.offset[c];
      partial[c] = power == 0   ? run_chunk<0>(e, off, scale)
                   : power == 1 ? run_chunk<1>(e, off, scale)
                                : run_chunk<2>(e, off, scale);
    }
  });
  SaliencyStats total = stats_identity();
  for (const auto& p : partial) total = stats_combine(total, p);
  at::Tensor stats = at::empty({kStatsSize}, at::TensorOptions().dtype(at::kDouble));
  double* d = stats.data_ptr<double>();
  d[0] = total.count;
  d[1] = total.sum;
  d[2] = total.sumsq;
  d[3] = total.min;
  d[4] = total.max;
  d[5] = total.nonfinite;
  d[6] = total.nan;
  return stats;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> saliency_cpu(at::TensorList grads, at::TensorList weights) {
  SaliencyJob job = make_saliency_job(grads, weights, std::nullopt, c10::DeviceType::CPU);
  at::Tensor stats = run_job(job, 0, 1.f);
  return {job.outputs, stats};
}

at::Tensor saliency_accumulate_cpu(at::TensorList acc, at::TensorList grads, at::TensorList weights,
                                   double scale, int64_t power) {
  TORCH_CHECK(power == 1 || power == 2, "power must be 1 or 2, got ", power);
  SaliencyJob job = make_saliency_job(grads, weights, acc, c10::DeviceType::CPU);
  at::Tensor stats = run_job(job, static_cast<int>(power), static_cast<float>(scale));
  job.finish();
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CPU, m) {
  m.impl("saliency", &saliency_cpu);
  m.impl("saliency_accumulate_", &saliency_accumulate_cpu);
}

}  // namespace pyprune_fast
