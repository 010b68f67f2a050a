// CUDA kernels of saliency / saliency_accumulate_: one launch for the whole list of tensors. A device
// table holds each tensor's pointers, size and dtype and each chunk's (tensor, offset); block c
// processes chunk c and writes its partial statistics, which a second one-block kernel reduces in
// chunk order (deterministic, no host synchronization).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pyprune_fast/cuda_utils.cuh"
#include "pyprune_fast/saliency_job.h"

namespace pyprune_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kEntryWords = 5;  // g, w, out, numel, dtype

// The sums are fp64 per thread: an fp32 partial sum (or square) of finite scores can overflow (scores
// from ~1.8e19 up square past FLT_MAX); on A100/H100 fp64 adds cost nothing in this memory-bound loop.
struct ThreadStats {
  double sum = 0.0, sumsq = 0.0;
  float min = INFINITY, max = -INFINITY;
  int nonfinite = 0, nan = 0;
  __device__ void add(float v) {
    const bool fin = is_finite_value(v);
    const double vf = fin ? static_cast<double>(v) : 0.0;
    sum += vf;
    sumsq += vf * vf;
    if (fin) {
      min = fminf(min, v);
      max = fmaxf(max, v);
    }
    nonfinite += !fin;
    nan += v != v;
  }
};

template <typename T, int kPower>
__device__ void saliency_chunk(const T* g, const T* w, float* out, int64_t n, float scale, ThreadStats& ts) {
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    float v = saliency_value(load_float(g + i), load_float(w + i));
    if (kPower > 0) v = saliency_accumulate(out[i], v, scale, kPower);
    out[i] = v;
    ts.add(v);
  }
}

// Block-wide reduction of the per-thread statistics into one record (fp64 for the sums).
__device__ SaliencyStats block_reduce(const ThreadStats& ts) {
  __shared__ double shared[kThreads / 32][6];
  double sum = warp_sum<double>(ts.sum);
  double sumsq = warp_sum<double>(ts.sumsq);
  double mn = warp_min<double>(ts.min);
  double mx = warp_max<double>(ts.max);
  double nonfinite = warp_sum<double>(ts.nonfinite);
  double nan = warp_sum<double>(ts.nan);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared[warp][0] = sum;
    shared[warp][1] = sumsq;
    shared[warp][2] = mn;
    shared[warp][3] = mx;
    shared[warp][4] = nonfinite;
    shared[warp][5] = nan;
  }
  __syncthreads();
  SaliencyStats st = stats_identity();
  if (threadIdx.x == 0) {
    for (int k = 0; k < kThreads / 32; ++k) {
      st = stats_combine(st, {0.0, shared[k][0], shared[k][1], shared[k][2], shared[k][3], shared[k][4],
                              shared[k][5]});
    }
  }
  return st;
}

template <int kPower>
__global__ void __launch_bounds__(kThreads)
    saliency_kernel(const int64_t* __restrict table, int64_t n_tensors, float scale, double* __restrict partial) {
  const int64_t c = blockIdx.x;
  const int64_t* chunk = table + n_tensors * kEntryWords + 2 * c;
  const int64_t* e = table + chunk[0] * kEntryWords;
  const int64_t off = chunk[1];
  const int64_t n = min(kChunk, e[3] - off);
  float* out = reinterpret_cast<float*>(e[2]) + off;
  ThreadStats ts;
  switch (e[4]) {
    case kF16:
      saliency_chunk<__half, kPower>(reinterpret_cast<const __half*>(e[0]) + off,
                                     reinterpret_cast<const __half*>(e[1]) + off, out, n, scale, ts);
      break;
    case kBF16:
      saliency_chunk<__nv_bfloat16, kPower>(reinterpret_cast<const __nv_bfloat16*>(e[0]) + off,
                                            reinterpret_cast<const __nv_bfloat16*>(e[1]) + off, out, n, scale,
                                            ts);
      break;
    default:
      saliency_chunk<float, kPower>(reinterpret_cast<const float*>(e[0]) + off,
                                    reinterpret_cast<const float*>(e[1]) + off, out, n, scale, ts);
  }
  const SaliencyStats st = block_reduce(ts);
  if (threadIdx.x == 0) {
    double* p = partial + c * kStatsSize;
    p[0] = static_cast<double>(n);
    p[1] = st.sum;
    p[2] = st.sumsq;
    p[3] = st.min;
    p[4] = st.max;
    p[5] = st.nonfinite;
    p[6] = st.nan;
  }
}

// One block: thread t combines chunks t, t + kThreads, ... in order, then thread 0 combines the
// threads in order. Deterministic for a given chunk plan.
__global__ void __launch_bounds__(kThreads) reduce_stats_kernel(const double* __restrict partial, int64_t chunks,
                                                                double* __restrict stats) {
  __shared__ SaliencyStats per_thread[kThreads];
  SaliencyStats st = stats_identity();
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    const double* p = partial + c * kStatsSize;
    st = stats_combine(st, {p[0], p[1], p[2], p[3], p[4], p[5], p[6]});
  }
  per_thread[threadIdx.x] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    SaliencyStats total = stats_identity();
    for (int t = 0; t < kThreads; ++t) total = stats_combine(total, per_thread[t]);
    stats[0] = total.count;
    stats[1] = total.sum;
    stats[2] = total.sumsq;
    stats[3] = total.min;
    stats[4] = total.max;
    stats[5] = total.nonfinite;
    stats[6] = total.nan;
  }
}

at::Tensor run_job(const SaliencyJob& job, const at::Device& device, int power, float scale) {
  const int64_t n_tensors = static_cast<int64_t>(job.entries.size());
  const int64_t chunks = job.plan.size();
  std::vector<int64_t> words;
  words.reserve(n_tensors * kEntryWords + 2 * chunks);
  for (const auto& e : job.entries) {
    words.push_back(reinterpret_cast<int64_t>(e.g));
    words.push_back(reinterpret_cast<int64_t>(e.w));
    words.push_back(reinterpret_cast<int64_t>(e.out));
    words.push_back(e.numel);
    words.push_back(e.dtype);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    words.push_back(job.plan.tensor[c]);
    words.push_back(job.plan.offset[c]);
  }
  auto opts = at::TensorOptions().device(device).dtype(at::kDouble);
  at::Tensor stats = at::empty({kStatsSize}, opts);
  at::Tensor partial = at::empty({std::max<int64_t>(chunks, 1), kStatsSize}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (chunks > 0) {
    at::Tensor table = table_to_device(words, device);
    const int64_t* t = table.data_ptr<int64_t>();
    double* p = partial.data_ptr<double>();
    if (power == 0) {
      saliency_kernel<0><<<chunks, kThreads, 0, stream>>>(t, n_tensors, scale, p);
    } else if (power == 1) {
      saliency_kernel<1><<<chunks, kThreads, 0, stream>>>(t, n_tensors, scale, p);
    } else {
      saliency_kernel<2><<<chunks, kThreads, 0, stream>>>(t, n_tensors, scale, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  reduce_stats_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), chunks, stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

// The device of the launch, once every tensor has been checked (check_pairs: all on one CUDA device):
// a CUDAGuard built from an unchecked CPU tensor would raise c10's internal error instead of ours.
at::Device checked_device(at::TensorList grads, at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), "saliency on CUDA needs at least one tensor");
  check_pairs(grads, weights, c10::DeviceType::CUDA);
  return weights[0].device();
}

std::tuple<std::vector<at::Tensor>, at::Tensor> saliency_cuda(at::TensorList grads, at::TensorList weights) {
  const at::Device device = checked_device(grads, weights);
  c10::cuda::CUDAGuard guard(device);
  SaliencyJob job = make_saliency_job(grads, weights, std::nullopt, c10::DeviceType::CUDA);
  at::Tensor stats = run_job(job, device, 0, 1.f);
  return {job.outputs, stats};
}

at::Tensor saliency_accumulate_cuda(at::TensorList acc, at::TensorList grads, at::TensorList weights, double scale,
                                    int64_t power) {
  TORCH_CHECK(power == 1 || power == 2, "power must be 1 or 2, got ", power);
  const at::Device device = checked_device(grads, weights);
  c10::cuda::CUDAGuard guard(device);
  SaliencyJob job = make_saliency_job(grads, weights, acc, c10::DeviceType::CUDA);
  at::Tensor stats = run_job(job, device, static_cast<int>(power), static_cast<float>(scale));
  job.finish();
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) {
  m.impl("saliency", &saliency_cuda);
  m.impl("saliency_accumulate_", &saliency_accumulate_cuda);
}

}  // namespace pyprune_fast
