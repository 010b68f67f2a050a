// Every operator schema of pyprune_fast, and nothing else. Kernels are registered per dispatch key
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; each family's fake (meta) kernels and autograd live in the
// Python module named by the set_python_module call above its schemas (pyprune_fast/ops/<family>.py).
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
  m.def("build_info() -> str", &build_info);

  m.set_python_module("pyprune_fast.ops.saliency");

  // |g * w| for every pair, as float32 tensors shaped like the weights, and the statistics of all
  // written values together: float64 [count, sum, sumsq, min, max, nonfinite, nan].
  m.def("saliency(Tensor[] grads, Tensor[] weights) -> (Tensor[], Tensor)");
  // acc[i] += scale * |grads[i] * weights[i]|^power (power 1 or 2); returns the statistics of acc.
  m.def(
      "saliency_accumulate_(Tensor(a!)[] acc, Tensor[] grads, Tensor[] weights, float scale=1.0, "
      "int power=1) -> Tensor");

  // --- exact selection (radix select over many tensors) and the masks built on it ---------------
  m.set_python_module("pyprune_fast.ops.select");
  // The k-th smallest value (1-based) over all elements of all tensors (one dtype); counts int64 [2] =
  // (elements < value, elements == value); nan int64 [len(xs)] = NaN count per tensor (value and counts
  // are meaningless when any is non-zero).
  m.def("kth_smallest_counts(Tensor[] xs, int k) -> (Tensor value, Tensor counts, Tensor nan)");
  // One radix-select pass with a fixed 16-bit digit on every backend (fp16/bf16: pass 0; fp32: 0-1;
  // fp64: 0-3), for selections whose passes are combined elsewhere (summed over processes by
  // pyprune_fast.distributed): hist int64 [65536] counts the non-NaN elements whose order key has the
  // digits above `digit` equal to those of `prefix` (the key's bit pattern as int64), by digit `digit`;
  // nan int64 [len(xs)] = NaN count per tensor (digit 0; zeros for later digits).
  m.def("radix_histogram(Tensor[] xs, int digit, int prefix) -> (Tensor hist, Tensor nan)");
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

  // --- N:M masks --------------------------------------------------------------------------------
  m.set_python_module("pyprune_fast.ops.nm_mask");
  // Keep-flags of every tensor (bool, same shape): groups of m consecutive entries of the contiguous
  // tensor, the n highest of each kept, ties to the lower index; and the number of NaN scores of each
  // tensor (int64 [len(scores)]), which the caller refuses.
  m.def("nm_mask(Tensor[] scores, int n, int m) -> (Tensor[], Tensor)");

  // --- N:M channel swaps ------------------------------------------------------------------------
  m.set_python_module("pyprune_fast.ops.nm_swap");
  // Kept-score gains of channel swaps for a channel permutation search: channel_scores [C, R] holds
  // channel c's scores over the R rows (the transposed score matrix), perm [C] the channel at each
  // position (groups: m consecutive positions). out [P, C] (float32; float64 for float64 scores):
  // out[i, c] = the change of the N:M-kept score (the n highest of each group, per row, summed over the
  // rows) when channel c replaces the one at positions[i] in its group (rule:
  // csrc/include/pyprune_fast/nm_swap.h). Swapping positions a and b gains
  // out[a, perm[b]] + out[b, perm[a]] when they lie in different groups.
  m.def("nm_swap_gains(Tensor channel_scores, Tensor perm, Tensor positions, int n, int m) -> Tensor");

  // --- 2:4 semi-structured sparsity --------------------------------------------------------------
  m.set_python_module("pyprune_fast.ops.sparse24");
  // w [out, in] -> values [out, in/2] (w's dtype), meta int32 [out/16, in/32, 16] (the mma.sp
  // metadata layout of csrc/include/pyprune_fast/sparse24.h), and the number of 4-wide chunks that
  // are not 2:4 (int64 0-d; more than two non-zeros, or with a mask not exactly two kept).
  m.def("compress_24(Tensor w, Tensor? mask=None) -> (Tensor, Tensor, Tensor)");
  // (values, meta) -> dense w [out, in], and the number of chunks whose metadata is not an ordered pair.
  m.def("decompress_24(Tensor values, Tensor meta) -> (Tensor, Tensor)");
  // act(x @ W^T + bias) with W given compressed; activation 'none', 'relu' or 'gelu' (exact, erf).
  m.def(
      "sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, str activation=\"none\") "
      "-> Tensor");
  // The same on Hopper's wgmma.mma_async.sp (CUDA only, compute capability 9.0, an sm_90a build; out % 128 == 0).
  m.def(
      "sparse24_linear_sm90(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, str activation=\"none\") "
      "-> Tensor");

  // --- mean singular value ---------------------------------------------------------------------
  m.set_python_module("pyprune_fast.ops.svd_mean");
  // Mean singular value of every matrix through the Gram matrix of its smaller side (features[i]:
  // [N, D] or [B, N, D], float32/float64, one dtype and device). Returns the values of all matrices in
  // order (1-d) and, per input, the backward factor Z = U diag(1 / (k sigma)) U^T ([n, n] or [B, n, n],
  // n = k = min(N, D); see csrc/include/pyprune_fast/svd_mean.h). Differentiable in `features` (the
  // autograd formula is registered in pyprune_fast/ops/svd_mean.py); the factors are not differentiable.
  m.def("svd_mean(Tensor[] features) -> (Tensor, Tensor[])");
  // d values / d features for the upstream gradient `grad` of the values: grad_b Z_b F_b (N <= D) or
  // grad_b F_b Z_b (N > D) for every matrix b.
  m.def("svd_mean_backward(Tensor grad, Tensor[] features, Tensor[] factors) -> Tensor[]");
}
