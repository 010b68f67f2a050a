// Host-side preparation of an nm_mask call, shared by the CPU and CUDA launchers: checks, the
// per-tensor table (scores in, keep-flags out) and the chunk plan over groups.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "pyprune_fast/multi_tensor.h"

namespace pyprune_fast {

struct NmEntry {
  const void* scores;
  bool* keep;
  int64_t groups;
  int64_t dtype;
};

struct NmJob {
  std::vector<NmEntry> entries;
  ChunkPlan plan;                       // chunks of groups (plan offsets count groups, not elements)
  int64_t chunk_groups;                 // groups per chunk
  std::vector<at::Tensor> outputs;      // bool keep-flags shaped like the scores
  std::vector<at::Tensor> keep_alive;   // contiguous copies of the scores
};

inline NmJob make_nm_job(at::TensorList scores, int64_t n, int64_t m, c10::DeviceType device) {
  TORCH_CHECK(m >= 1 && n >= 0 && n <= m, "n:m must satisfy 0 <= n <= m and m >= 1, got ", n, ":", m);
  NmJob job;
  job.chunk_groups = std::max<int64_t>(1, kChunk / m);
  std::vector<int64_t> groups;
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor s = scores[i].contiguous();
    TORCH_CHECK(s.device().type() == device, "scores[", i, "] must be on ", c10::DeviceTypeName(device), ", got ",
                s.device());
    TORCH_CHECK(s.device() == scores[0].device(), "scores[", i, "] is on ", s.device(), " but scores[0] is on ",
                scores[0].device());
    TORCH_CHECK(s.numel() % m == 0, "scores[", i, "] has ", s.numel(), " entries, not a multiple of m=", m);
    at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
    job.entries.push_back({s.data_ptr(), keep.data_ptr<bool>(), s.numel() / m, dtype_code(s, "scores")});
    groups.push_back(s.numel() / m);
    job.keep_alive.push_back(s);
    job.outputs.push_back(keep);
  }
  job.plan = plan_chunks(groups, job.chunk_groups);
  return job;
}

}  // namespace pyprune_fast
