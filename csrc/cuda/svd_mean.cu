// CUDA implementation of svd_mean / svd_mean_backward (the formulas are in pyprune_fast/svd_mean.h).
// The Gram matrices and the backward products are cuBLAS GEMMs through ATen (one batched GEMM per
// input). The eigendecompositions of all Gram matrices of one size are one cuSOLVER call, chosen by
// size: the batched Jacobi solver (syevjBatched) for n <= 32, where it is fastest and which is its
// limit, and the batched 64-bit solver XsyevBatched above (torch.linalg.eigh loops over the matrices
// there), or one 64-bit Xsyevd call per matrix where XsyevBatched cannot serve: cuSOLVER older than
// 11.7.1 (CUDA 12.6 Update 2, which added it) and matrices with n * n > INT32_MAX (its size limit).
// Nothing synchronizes the host: the solvers' info arrays stay on the device and turn the values and
// factors of matrices whose eigensolver did not converge into NaN. The GEMMs run in full precision
// whatever torch.backends.cuda.matmul allows (TF32 would cost the Gram matrices ~1e-3 relative).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusolverDn.h>
#include <torch/library.h>

#include <climits>
#include <memory>
#include <type_traits>
#include <tuple>
#include <vector>

#include "pyprune_fast/svd_mean.h"

// PYPRUNE_FAST_NO_XSYEV_BATCHED builds the per-matrix path alone (how tests/test_cuda_build.py
// compiles it with a toolkit that has both).
#if CUSOLVER_VERSION >= 11701 && !defined(PYPRUNE_FAST_NO_XSYEV_BATCHED)
#define PPF_HAVE_XSYEV_BATCHED 1
#else
#define PPF_HAVE_XSYEV_BATCHED 0
#endif

namespace pyprune_fast {
namespace {

constexpr int64_t kJacobiMaxSize = 32;  // syevjBatched handles n <= 32

#define PPF_CUSOLVER_CHECK(expr)                                                                     \
  do {                                                                                               \
    const cusolverStatus_t status_ = (expr);                                                         \
    TORCH_CHECK(status_ == CUSOLVER_STATUS_SUCCESS, "svd_mean: ", #expr, " failed with cuSOLVER status ", \
                static_cast<int>(status_));                                                          \
  } while (0)

// ATen's cuSOLVER handle of the current device, bound to the current stream.
cusolverDnHandle_t solver_handle() {
  cusolverDnHandle_t handle = at::cuda::getCurrentCUDASolverDnHandle();
  PPF_CUSOLVER_CHECK(cusolverDnSetStream(handle, at::cuda::getCurrentCUDAStream()));
  return handle;
}

cusolverStatus_t syevj_batched_buffer(cusolverDnHandle_t h, int n, const float* a, const float* w, int* lwork,
                                      syevjInfo_t params, int batch) {
  return cusolverDnSsyevjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork,
                                            params, batch);
}
cusolverStatus_t syevj_batched_buffer(cusolverDnHandle_t h, int n, const double* a, const double* w, int* lwork,
                                      syevjInfo_t params, int batch) {
  return cusolverDnDsyevjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork,
                                            params, batch);
}
cusolverStatus_t syevj_batched(cusolverDnHandle_t h, int n, float* a, float* w, float* work, int lwork, int* info,
                               syevjInfo_t params, int batch) {
  return cusolverDnSsyevjBatched(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info,
                                 params, batch);
}
cusolverStatus_t syevj_batched(cusolverDnHandle_t h, int n, double* a, double* w, double* work, int lwork, int* info,
                               syevjInfo_t params, int batch) {
  return cusolverDnDsyevjBatched(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info,
                                 params, batch);
}

// Eigenvalues (ascending) into w [G, n] and eigenvectors over a [G, n, n], by batched Jacobi sweeps
// (default tolerance: machine precision; at most 100 sweeps). syevjBatched takes its workspace size
// (lwork, in elements) and the batch as ints, and its workspace grows with the batch: a call takes at
// most jacobi_batch_limit matrices, so that lwork and the n * n * batch elements of the call stay below
// 2^31 (the workspace of one matrix bounds the share of each: lwork(b) <= b * lwork(1) for a workspace
// that is affine in b), as syev_batched splits for XsyevBatched.
int64_t jacobi_batch_limit(int64_t n, int64_t lwork_one) {
  return std::max<int64_t>(1, std::min(INT32_MAX / (n * n), INT32_MAX / std::max<int64_t>(lwork_one, 1)));
}

template <typename T>
void jacobi_batched(at::Tensor& a, at::Tensor& w, at::Tensor& info) {
  const int n = static_cast<int>(a.size(1));
  const int64_t count = a.size(0);
  cusolverDnHandle_t handle = solver_handle();
  syevjInfo_t params;
  PPF_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&params));
  const std::unique_ptr<std::remove_pointer_t<syevjInfo_t>, decltype(&cusolverDnDestroySyevjInfo)> owned(
      params, &cusolverDnDestroySyevjInfo);
  PPF_CUSOLVER_CHECK(cusolverDnXsyevjSetSortEig(params, 1));
  int lwork_one = 0;
  PPF_CUSOLVER_CHECK(syevj_batched_buffer(handle, n, a.data_ptr<T>(), w.data_ptr<T>(), &lwork_one, params, 1));
  const int64_t per_call = std::min(count, jacobi_batch_limit(n, lwork_one));
  int lwork = 0;
  PPF_CUSOLVER_CHECK(syevj_batched_buffer(handle, n, a.data_ptr<T>(), w.data_ptr<T>(), &lwork, params,
                                          static_cast<int>(per_call)));
  TORCH_CHECK(lwork >= 0, "svd_mean: syevjBatched workspace size overflowed for ", per_call, " matrices of size ", n);
  at::Tensor work = at::empty({std::max(lwork, 1)}, a.options());
  for (int64_t start = 0; start < count; start += per_call) {
    const int batch = static_cast<int>(std::min(per_call, count - start));
    PPF_CUSOLVER_CHECK(syevj_batched(handle, n, a.data_ptr<T>() + start * n * n, w.data_ptr<T>() + start * n,
                                     work.data_ptr<T>(), lwork, info.data_ptr<int>() + start, params, batch));
  }
}

// The same one matrix at a time with the 64-bit API (any n, no size limit). The host workspace of
// the 64-bit solvers (none on the versions we know of) is used during the call, as in torch's own use.
void syev_looped(at::Tensor& a, at::Tensor& w, at::Tensor& info) {
  const int64_t n = a.size(1);
  const cudaDataType type = a.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  cusolverDnHandle_t handle = solver_handle();
  cusolverDnParams_t params;
  PPF_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
  size_t device_bytes = 0, host_bytes = 0;
  PPF_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                                 type, a.data_ptr(), n, type, w.data_ptr(), type, &device_bytes,
                                                 &host_bytes));
  at::Tensor device_work =
      at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))}, a.options().dtype(at::kByte));
  std::vector<char> host_work(host_bytes);
  for (int64_t b = 0; b < a.size(0); ++b) {
    PPF_CUSOLVER_CHECK(cusolverDnXsyevd(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, type,
                                        a[b].data_ptr(), n, type, w[b].data_ptr(), type, device_work.data_ptr(),
                                        device_bytes, host_bytes ? host_work.data() : nullptr, host_bytes,
                                        info.data_ptr<int>() + b));
  }
  PPF_CUSOLVER_CHECK(cusolverDnDestroyParams(params));
}

#if PPF_HAVE_XSYEV_BATCHED
// The same with the batched 64-bit API, for n * n <= INT32_MAX: the solver needs n * lda * batch <=
// INT32_MAX, so larger batches take several calls.
void syev_batched(at::Tensor& a, at::Tensor& w, at::Tensor& info) {
  const int64_t n = a.size(1);
  const cudaDataType type = a.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  cusolverDnHandle_t handle = solver_handle();
  cusolverDnParams_t params;
  PPF_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
  const int64_t per_call = INT32_MAX / (n * n);
  for (int64_t start = 0; start < a.size(0); start += per_call) {
    const int64_t batch = std::min(per_call, a.size(0) - start);
    void* a_ptr = static_cast<char*>(a.data_ptr()) + start * n * n * a.element_size();
    void* w_ptr = static_cast<char*>(w.data_ptr()) + start * n * w.element_size();
    size_t device_bytes = 0, host_bytes = 0;
    PPF_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(handle, params, CUSOLVER_EIG_MODE_VECTOR,
                                                         CUBLAS_FILL_MODE_LOWER, n, type, a_ptr, n, type, w_ptr, type,
                                                         &device_bytes, &host_bytes, batch));
    at::Tensor device_work =
        at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))}, a.options().dtype(at::kByte));
    std::vector<char> host_work(host_bytes);
    PPF_CUSOLVER_CHECK(cusolverDnXsyevBatched(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                              type, a_ptr, n, type, w_ptr, type, device_work.data_ptr(), device_bytes,
                                              host_bytes ? host_work.data() : nullptr, host_bytes,
                                              info.data_ptr<int>() + start, batch));
  }
  PPF_CUSOLVER_CHECK(cusolverDnDestroyParams(params));
}
#endif

// (lambda ascending [G, n], U [G, n, n] with eigenvectors as columns, converged [G]). The Gram matrices
// are symmetric, so their row-major storage is also their column-major storage; cuSOLVER overwrites
// it with the eigenvectors as columns in column-major order, which read row-major is U^T.
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_cuda(const at::Tensor& gram) {
  const int64_t count = gram.size(0), n = gram.size(1);
  at::Tensor a = gram.clone(at::MemoryFormat::Contiguous);
  at::Tensor w = at::empty({count, n}, gram.options());
  at::Tensor info = at::zeros({count}, gram.options().dtype(at::kInt));
  if (count > 0) {
    if (n <= kJacobiMaxSize) {
      if (gram.scalar_type() == at::kDouble) {
        jacobi_batched<double>(a, w, info);
      } else {
        jacobi_batched<float>(a, w, info);
      }
    } else {
#if PPF_HAVE_XSYEV_BATCHED
      if (n * n <= INT32_MAX) {
        syev_batched(a, w, info);
      } else {
        syev_looped(a, w, info);
      }
#else
      syev_looped(a, w, info);
#endif
    }
  }
  return {w, a.mT(), info.eq(0)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> svd_mean_cuda(at::TensorList features) {
  const SvdMeanPlan plan = plan_svd_mean(features, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(plan.inputs[0].f.device());
  const at::NoTF32Guard full_precision;  // this thread's cuBLAS calls in full fp32 until we return
  auto gram_rows = [](const SvdMeanPlan& p, std::vector<at::Tensor>& grams) {
    for (const SvdMeanInput& in : p.inputs) {
      if (!in.row_gram) continue;
      at::Tensor out = grams[in.group].narrow(0, in.slot, in.batch);
      at::matmul_out(out, in.f, in.f.mT());
    }
  };
  return svd_mean_forward(plan, gram_rows, eigh_cuda);
}

std::vector<at::Tensor> svd_mean_backward_cuda(const at::Tensor& grad, at::TensorList features,
                                               at::TensorList factors) {
  const SvdMeanPlan plan = plan_svd_mean(features, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(plan.inputs[0].f.device());
  const at::NoTF32Guard full_precision;
  auto apply_rows = [](const SvdMeanPlan& p, const std::vector<at::Tensor>& scaled, std::vector<at::Tensor>& grads) {
    for (size_t i = 0; i < p.inputs.size(); ++i) {
      if (p.inputs[i].row_gram) at::matmul_out(grads[i], scaled[i], p.inputs[i].f);
    }
  };
  return svd_mean_backward(plan, grad, factors, apply_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CUDA, m) {
  m.impl("svd_mean", &svd_mean_cuda);
  m.impl("svd_mean_backward", &svd_mean_backward_cuda);
}

}  // namespace pyprune_fast
