// Every operator schema of pyprune_fast, and nothing else. Kernels are registered per dispatch key
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and autograd live in pyprune_fast/ops.py.
#include <torch/library.h>

#include <string>

#define PPF_STRINGIFY_(x) #x
#define PPF_STRINGIFY(x) PPF_STRINGIFY_(x)

namespace {

// What this library was built with, as "key=value;..." (read by pyprune_fast.backend_info()).
std::string build_info() {
#ifdef PYPRUNE_FAST_CUDA_ARCHS
  return "cuda_archs=" PPF_STRINGIFY(PYPRUNE_FAST_CUDA_ARCHS) ";";
#else
  return "cuda_archs=;";
#endif
}

}  // namespace

TORCH_LIBRARY(pyprune_fast, m) {
  m.set_python_module("pyprune_fast.ops");

  m.def("build_info() -> str", &build_info);

  // |g * w| for every pair, as float32 tensors shaped like the weights, and the statistics of all
  // written values together: float64 [count, sum, sumsq, min, max, nonfinite, nan].
  m.def("saliency(Tensor[] grads, Tensor[] weights) -> (Tensor[], Tensor)");
  // acc[i] += scale * |grads[i] * weights[i]|^power (power 1 or 2); returns the statistics of acc.
  m.def(
      "saliency_accumulate_(Tensor(a!)[] acc, Tensor[] grads, Tensor[] weights, float scale=1.0, "
      "int power=1) -> Tensor");

  // --- exact selection (radix select over many tensors) and the masks built on it ---------------
  // The k-th smallest value (1-based) over all elements of all tensors (one dtype); counts int64 [2] =
  // (elements < value, elements == value); nan int64 [len(xs)] = NaN count per tensor (value and counts
  // are meaningless when any is non-zero).
  m.def("kth_smallest_counts(Tensor[] xs, int k) -> (Tensor value, Tensor counts, Tensor nan)");
  // Keep-masks (bool, row-major) with the k lowest entries of all tensors pruned, ties in flat order;
  // value/counts as returned by kth_smallest_counts for the same xs and k.
  m.def("threshold_masks(Tensor[] xs, Tensor value, Tensor counts, int k) -> Tensor[]");
  // The same selection applied in place: params[i] entries whose score is pruned are set to zero.
  m.def("threshold_apply_(Tensor(a!)[] params, Tensor[] xs, Tensor value, Tensor counts, int k) -> ()");
  // Each tensor its own group: ks[i] lowest entries of xs[i] pruned. Returns masks and NaN counts.
  m.def("layerwise_masks(Tensor[] xs, int[] ks) -> (Tensor[], Tensor)");
  // Each row of each tensor (viewed as (size(0), -1)) its own group: counts[i] lowest entries of every
  // row of xs[i] pruned, ties by lower index. Returns masks and NaN counts.
  m.def("per_row_masks(Tensor[] xs, int[] counts) -> (Tensor[], Tensor)");
}
