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

  // Mean singular value of every matrix through the Gram matrix of its smaller side (features[i]:
  // [N, D] or [B, N, D], float32/float64, one dtype and device). Returns the values of all matrices in
  // order (1-d) and, per input, the backward factor Z = U diag(1 / (k sigma)) U^T ([n, n] or [B, n, n],
  // n = k = min(N, D); see csrc/include/pyprune_fast/svd_mean.h). Differentiable in `features` (the
  // autograd formula is registered in pyprune_fast/ops.py); the factors are not differentiable.
  m.def("svd_mean(Tensor[] features) -> (Tensor, Tensor[])");
  // d values / d features for the upstream gradient `grad` of the values: grad_b Z_b F_b (N <= D) or
  // grad_b F_b Z_b (N > D) for every matrix b.
  m.def("svd_mean_backward(Tensor grad, Tensor[] features, Tensor[] factors) -> Tensor[]");
}
