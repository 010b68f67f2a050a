// Host-side preparation of the selection ops, shared by the CPU and CUDA launchers: checks, the dense
// views the kernels walk, the chunk plan, and the dispatch on the scores' float format.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "pyprune_fast/multi_tensor.h"
#include "pyprune_fast/radix.h"

namespace pyprune_fast {

// Calls f.template operator()<Fmt>() with the float format (radix.h) of a selection dtype.
template <typename F>
auto dispatch_format(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf:
      return f.template operator()<F16Format>();
    case at::kBFloat16:
      return f.template operator()<BF16Format>();
    case at::kDouble:
      return f.template operator()<F64Format>();
    default:
      return f.template operator()<F32Format>();
  }
}

struct SelectJob {
  std::vector<at::Tensor> dense;  // the tensors the kernels walk (the inputs themselves when possible)
  std::vector<int64_t> numels;
  ChunkPlan plan;
  at::ScalarType dtype;
  int64_t total = 0;
};

// row_major: the walk must follow each tensor's row-major (flat index) order, as the tie rule of the
// masks needs; otherwise any dense memory order will do (selection does not depend on order).
inline SelectJob make_select_job(at::TensorList xs, c10::DeviceType device, bool row_major, const char* name = "xs") {
  TORCH_CHECK(!xs.empty(), name, " must hold at least one tensor");
  SelectJob job;
  job.dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.scalar_type() == job.dtype, name, "[", i, "] is ", x.scalar_type(), " but ", name, "[0] is ",
                job.dtype, "; all tensors must have one dtype");
    TORCH_CHECK(x.device().type() == device, name, "[", i, "] must be on ", c10::DeviceTypeName(device), ", got ",
                x.device());
    TORCH_CHECK(x.device() == xs[0].device(), name, "[", i, "] is on ", x.device(), " but ", name, "[0] is on ",
                xs[0].device());
    dtype_code(x, name);
    const bool keep = row_major ? x.is_contiguous() : x.is_non_overlapping_and_dense();
    job.dense.push_back(keep ? x : x.contiguous());
    job.numels.push_back(x.numel());
    job.total += x.numel();
  }
  job.plan = plan_chunks(job.numels);
  return job;
}

// value and counts of a selection (as kth_smallest_counts returns them) before a launcher reads their
// bytes: value one element of the scores' dtype, counts int64 [2], each on the scores' device or the CPU.
inline void check_threshold(const SelectJob& job, const at::Tensor& value, const at::Tensor& counts) {
  const at::Device device = job.dense[0].device();
  TORCH_CHECK(value.numel() == 1 && value.scalar_type() == job.dtype, "value must be a single ", job.dtype,
              " element (the k-th smallest score, of the scores' dtype), got ", value.scalar_type(), " of shape ",
              value.sizes());
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.size(0) == 2,
              "counts must be an int64 tensor of shape [2] (elements below and equal to value), got ",
              counts.scalar_type(), " of shape ", counts.sizes());
  TORCH_CHECK(value.device() == device || value.is_cpu(), "value is on ", value.device(), " but the scores are on ",
              device);
  TORCH_CHECK(counts.device() == device || counts.is_cpu(), "counts is on ", counts.device(),
              " but the scores are on ", device);
}

// The parameters that threshold_apply_ zeroes: one per score tensor, same shape and device, contiguous,
// float32/float16/bfloat16/float64 (each its own dtype; the kernels write 2, 4 or 8 bytes per entry).
inline void check_params(at::TensorList params, const SelectJob& job) {
  TORCH_CHECK(params.size() == job.dense.size(), "params and scores must have the same length, got ", params.size(),
              " and ", job.dense.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.sizes() == job.dense[i].sizes(), "params[", i, "] has shape ", p.sizes(), " but scores[", i,
                "] has shape ", job.dense[i].sizes());
    const auto d = p.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble, "params[", i,
                "] must be float32, float16, bfloat16 or float64, got ", d);
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] must be contiguous");
    TORCH_CHECK(p.device() == job.dense[i].device(), "params[", i, "] is on ", p.device(), " but scores[", i,
                "] is on ", job.dense[i].device());
  }
}

// The selection results every launcher returns: value (0-d, the inputs' dtype), counts int64 [2] =
// (elements < value, elements == value), nan int64 [len(xs)] = NaN count per tensor.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> selection_outputs(const SelectJob& job) {
  const auto opts = job.dense[0].options();
  return {at::empty({}, opts), at::zeros({2}, opts.dtype(at::kLong)),
          at::zeros({static_cast<int64_t>(job.dense.size())}, opts.dtype(at::kLong))};
}

}  // namespace pyprune_fast
