// Host-side preparation of a saliency call, shared by the CPU and CUDA launchers: checks, the
// per-tensor table, the chunk plan, and the write-back of accumulators that had another layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "pyprune_fast/multi_tensor.h"
#include "pyprune_fast/saliency.h"

namespace pyprune_fast {

struct SaliencyEntry {
  const void* g;
  const void* w;
  float* out;
  int64_t numel;
  int64_t dtype;
};

struct SaliencyJob {
  std::vector<SaliencyEntry> entries;
  ChunkPlan plan;
  std::vector<at::Tensor> outputs;                            // what the kernel writes
  std::vector<at::Tensor> keep_alive;                         // contiguous copies of the inputs
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks;  // (user accumulator, working copy)

  // Copies working accumulators back into the user's tensors that had another layout.
  void finish() {
    for (auto& [user, work] : writebacks) user.copy_(work);
  }
};

inline SaliencyJob make_saliency_job(at::TensorList grads, at::TensorList weights,
                                     std::optional<at::TensorList> acc, c10::DeviceType device) {
  check_pairs(grads, weights, device);
  if (acc) {
    TORCH_CHECK(acc->size() == weights.size(), "acc and weights must have the same length, got ",
                acc->size(), " and ", weights.size());
  }
  SaliencyJob job;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto [g, w] = same_dense_layout(grads[i], weights[i]);
    at::Tensor out;
    if (acc) {
      const at::Tensor& a = (*acc)[i];
      TORCH_CHECK(a.scalar_type() == at::kFloat, "acc[", i, "] must be float32, got ", a.scalar_type());
      TORCH_CHECK(a.sizes() == w.sizes(), "acc[", i, "] has shape ", a.sizes(), " but weights[", i,
                  "] has shape ", w.sizes());
      TORCH_CHECK(a.device() == w.device(), "acc[", i, "] is on ", a.device(), " but weights[", i,
                  "] is on ", w.device());
      if (a.strides() == w.strides() && a.is_non_overlapping_and_dense()) {
        out = a;
      } else {
        out = at::empty_like(w, w.options().dtype(at::kFloat)).copy_(a);
        job.writebacks.emplace_back(a, out);
      }
    } else {
      out = at::empty_like(w, w.options().dtype(at::kFloat));
    }
    job.entries.push_back({g.data_ptr(), w.data_ptr(), out.data_ptr<float>(), w.numel(),
                           dtype_code(w, "weights")});
    numels.push_back(w.numel());
    job.keep_alive.push_back(g);
    job.keep_alive.push_back(w);
    job.outputs.push_back(out);
  }
  job.plan = plan_chunks(numels);
  return job;
}

}  // namespace pyprune_fast
