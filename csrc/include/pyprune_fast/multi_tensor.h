// Host-side helpers for ops over lists of tensors, shared by the CPU and CUDA launchers:
// argument checks, layout preparation and the chunk plan (which tensor and offset each chunk covers).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "pyprune_fast/common.h"

namespace pyprune_fast {

inline int64_t dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    case at::kDouble:
      return kF64;
    default:
      TORCH_CHECK(false, what, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
}

// Checks that grads[i] and weights[i] pair up (same shape and dtype) and that all of them are on one
// device of this type (the kernels are launched on weights[0]'s device with all their pointers).
inline void check_pairs(at::TensorList grads, at::TensorList weights, c10::DeviceType device) {
  TORCH_CHECK(grads.size() == weights.size(), "grads and weights must have the same length, got ",
              grads.size(), " and ", weights.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const auto& w = weights[i];
    TORCH_CHECK(g.sizes() == w.sizes(), "grads[", i, "] has shape ", g.sizes(), " but weights[", i,
                "] has shape ", w.sizes());
    TORCH_CHECK(g.scalar_type() == w.scalar_type(), "grads[", i, "] is ", g.scalar_type(),
                " but weights[", i, "] is ", w.scalar_type());
    const int64_t code = dtype_code(w, "weights");
    TORCH_CHECK(code != kF64, "weights[", i, "] must be float32, float16 or bfloat16, got Double");
    TORCH_CHECK(w.device().type() == device, "weights[", i, "] must be on ", c10::DeviceTypeName(device), ", got ",
                w.device());
    TORCH_CHECK(w.device() == weights[0].device(), "weights[", i, "] is on ", w.device(), " but weights[0] is on ",
                weights[0].device());
    TORCH_CHECK(g.device() == w.device(), "grads[", i, "] is on ", g.device(), " but weights[", i, "] is on ",
                w.device());
  }
}

// Both tensors walked in memory order: kept as they are when they share one dense layout
// (contiguous, transposed, channels-last, ...), otherwise made contiguous.
inline std::pair<at::Tensor, at::Tensor> same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.strides() == b.strides() && a.is_non_overlapping_and_dense()) {
    return {a, b};
  }
  return {a.contiguous(), b.contiguous()};
}

// Chunk plan over a list of sizes: chunk c covers elements [offset[c], offset[c] + kChunk) of
// tensor tensor[c] (clipped to its size). Empty tensors get no chunk.
struct ChunkPlan {
  std::vector<int64_t> tensor;
  std::vector<int64_t> offset;
  int64_t size() const { return static_cast<int64_t>(tensor.size()); }
};

inline ChunkPlan plan_chunks(const std::vector<int64_t>& numels, int64_t chunk = kChunk) {
  ChunkPlan plan;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t off = 0; off < numels[t]; off += chunk) {
      plan.tensor.push_back(static_cast<int64_t>(t));
      plan.offset.push_back(off);
    }
  }
  return plan;
}

}  // namespace pyprune_fast
