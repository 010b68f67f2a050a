// Host-side parts of svd_mean shared by the CPU and CUDA implementations: the plan (which matrices
// share a Gram size and so one batched eigendecomposition), the value and backward factor from the
// eigendecomposition, and the N > D path (ATen GEMMs). Everything here is ATen ops that stay on the
// tensors' device: no host synchronization.
//
// For an N x D matrix F with k = min(N, D) singular values s_i, the Gram matrix of the smaller side,
// G = F F^T (N <= D) or F^T F (N > D), is k x k with eigenvalues s_i^2. Then
//   value = sum_i s_i / k = sum_i sqrt(lambda_i) / k
//   d value / dF = U V^T / k = Z F (N <= D) or F Z (N > D),  Z = U_G diag(1 / (k sqrt(lambda))) U_G^T,
// where Z ("the factor") is computed once in the forward pass. Eigenvalues at or below the cutoff
// n * eps * lambda_max (rounding level of the Gram matrix) count as zero in both value and gradient,
// which makes the gradient of a rank-deficient F the minimum-norm subgradient and that of F = 0 zero.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace pyprune_fast {

// One entry of the features list: `batch` matrices of rows x cols ([N, D] inputs have batch 1).
struct SvdMeanInput {
  at::Tensor f;              // the input viewed as a contiguous [batch, rows, cols] tensor
  bool matrix;               // the input was one [N, D] matrix (its factor is [n, n], not [1, n, n])
  int64_t batch, rows, cols;
  int64_t n;                 // Gram size min(rows, cols)
  bool row_gram;             // G = F F^T (rows <= cols), else G = F^T F
  int64_t group, slot;       // its Gram matrices are grams[group][slot, slot + batch)
  int64_t offset;            // its values are values[offset, offset + batch)
};

struct SvdMeanPlan {
  std::vector<SvdMeanInput> inputs;
  std::vector<int64_t> group_n;      // Gram size of each group
  std::vector<int64_t> group_count;  // matrices in each group
  int64_t total = 0;                 // matrices in all
  at::ScalarType dtype = at::kFloat;
};

inline SvdMeanPlan plan_svd_mean(at::TensorList features, c10::DeviceType device_type) {
  TORCH_CHECK(!features.empty(), "svd_mean: features must hold at least one matrix");
  SvdMeanPlan plan;
  plan.dtype = features[0].scalar_type();
  const at::Device device = features[0].device();
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& t = features[i];
    TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "svd_mean: features[", i, "] must be [N, D] or [B, N, D], got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "svd_mean: features[", i,
                "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == plan.dtype, "svd_mean: features[", i, "] is ", t.scalar_type(),
                " but features[0] is ", plan.dtype);
    TORCH_CHECK(t.device().type() == device_type, "svd_mean: features[", i, "] must be on ",
                c10::DeviceTypeName(device_type), ", got ", t.device());
    TORCH_CHECK(t.device() == device, "svd_mean: features[", i, "] is on ", t.device(), " but features[0] is on ",
                device);
    TORCH_CHECK(t.size(-1) > 0 && t.size(-2) > 0, "svd_mean: features[", i, "] has an empty matrix dimension, ",
                t.sizes());
    SvdMeanInput in;
    in.matrix = t.dim() == 2;
    in.f = (in.matrix ? t.unsqueeze(0) : t).contiguous();
    in.batch = in.f.size(0);
    in.rows = in.f.size(1);
    in.cols = in.f.size(2);
    in.n = std::min(in.rows, in.cols);
    in.row_gram = in.rows <= in.cols;
    in.group = -1;
    for (size_t g = 0; g < plan.group_n.size(); ++g) {
      if (plan.group_n[g] == in.n) in.group = static_cast<int64_t>(g);
    }
    if (in.group < 0) {
      in.group = static_cast<int64_t>(plan.group_n.size());
      plan.group_n.push_back(in.n);
      plan.group_count.push_back(0);
    }
    in.slot = plan.group_count[in.group];
    plan.group_count[in.group] += in.batch;
    in.offset = plan.total;
    plan.total += in.batch;
    plan.inputs.push_back(std::move(in));
  }
  return plan;
}

// The value of each matrix and its factor Z = U diag(w) U^T from the eigendecomposition of its Gram
// matrix (lambda [G, n] ascending, U [G, n, n] with eigenvectors as columns). `ok` [G] marks the
// matrices whose Gram matrix was finite and whose eigensolver converged; the others get NaN.
inline std::pair<at::Tensor, at::Tensor> svd_mean_from_eigh(const at::Tensor& lambda, const at::Tensor& U,
                                                            const at::Tensor& ok) {
  const int64_t n = lambda.size(-1);
  const bool is_double = lambda.scalar_type() == at::kDouble;
  const double eps = is_double ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
  const double tiny = is_double ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const at::Tensor cutoff = (lambda.narrow(-1, n - 1, 1) * (static_cast<double>(n) * eps)).clamp_min(tiny);
  const at::Tensor keep = lambda > cutoff;
  const at::Tensor sigma = at::where(keep, lambda, 0).sqrt();
  const at::Tensor nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), lambda.options());
  at::Tensor values = at::where(ok, sigma.sum(-1) / static_cast<double>(n), nan);
  const at::Tensor w = at::where(keep, (sigma * static_cast<double>(n)).reciprocal(), 0);
  at::Tensor z = at::matmul(U * w.unsqueeze(-2), U.mT());
  z = at::where(ok.view({-1, 1, 1}), (z + z.mT()) * 0.5, nan);  // exactly symmetric
  return {values, z};
}

// Which Gram matrices are finite (a NaN or inf in F makes its Gram matrix non-finite), and the Gram
// matrices with the non-finite ones replaced by zeros so that the eigensolver sees finite input.
inline std::pair<at::Tensor, at::Tensor> finite_grams(const at::Tensor& gram) {
  const at::Tensor ok = at::isfinite(gram).flatten(1).all(1);
  return {ok, at::where(ok.view({-1, 1, 1}), gram, 0)};
}

// The forward pass. `gram_rows(plan, grams)` writes F F^T of every row_gram input into its slots;
// `eigh(gram)` returns (lambda ascending, U, converged [G] bool). Returns the values of all matrices
// in input order and the factor of each input ([n, n] or [B, n, n] like the input).
template <typename GramRows, typename Eigh>
std::tuple<at::Tensor, std::vector<at::Tensor>> svd_mean_forward(const SvdMeanPlan& plan, GramRows&& gram_rows,
                                                                 Eigh&& eigh) {
  const auto opts = plan.inputs[0].f.options();
  std::vector<at::Tensor> grams;
  for (size_t g = 0; g < plan.group_n.size(); ++g) {
    grams.push_back(at::empty({plan.group_count[g], plan.group_n[g], plan.group_n[g]}, opts));
  }
  for (const SvdMeanInput& in : plan.inputs) {
    if (!in.row_gram) {
      at::Tensor out = grams[in.group].narrow(0, in.slot, in.batch);
      at::matmul_out(out, in.f.mT(), in.f);
    }
  }
  gram_rows(plan, grams);
  std::vector<at::Tensor> group_values, group_factors;
  for (const at::Tensor& gram : grams) {
    auto [finite, clean] = finite_grams(gram);
    auto [lambda, U, converged] = eigh(clean);
    auto [values, factors] = svd_mean_from_eigh(lambda, U, finite.logical_and(converged));
    group_values.push_back(values);
    group_factors.push_back(factors);
  }
  at::Tensor values = grams.size() == 1 ? group_values[0] : at::empty({plan.total}, opts);
  std::vector<at::Tensor> factors;
  for (const SvdMeanInput& in : plan.inputs) {
    if (grams.size() > 1) {
      values.narrow(0, in.offset, in.batch).copy_(group_values[in.group].narrow(0, in.slot, in.batch));
    }
    // Each input owns its factor (outputs of an op must not alias each other).
    at::Tensor z = group_factors[in.group].narrow(0, in.slot, in.batch);
    z = plan.inputs.size() == 1 ? z : z.clone();
    factors.push_back(in.matrix ? z.squeeze(0) : z);
  }
  return {values, factors};
}

// The backward pass: grads[i] = g_b Z_b F_b (row_gram) or g_b F_b Z_b for every matrix b of input i,
// g = grad [total] the gradient of the values. `apply_rows(plan, scaled, grads)` writes
// grads[i] = scaled[i] @ f for every row_gram input i (scaled[i] = g_b Z_b, [B, n, n] contiguous).
template <typename ApplyRows>
std::vector<at::Tensor> svd_mean_backward(const SvdMeanPlan& plan, const at::Tensor& grad, at::TensorList factors,
                                          ApplyRows&& apply_rows) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == plan.total, "svd_mean_backward: grad must have shape [",
              plan.total, "], got ", grad.sizes());
  TORCH_CHECK(factors.size() == plan.inputs.size(), "svd_mean_backward: expected ", plan.inputs.size(),
              " factors, got ", factors.size());
  const at::Tensor g = grad.to(plan.inputs[0].f.options());
  std::vector<at::Tensor> scaled, grads;
  for (size_t i = 0; i < plan.inputs.size(); ++i) {
    const SvdMeanInput& in = plan.inputs[i];
    const at::Tensor z = in.matrix ? factors[i].unsqueeze(0) : factors[i];
    TORCH_CHECK(z.sizes() == at::IntArrayRef({in.batch, in.n, in.n}) && z.scalar_type() == plan.dtype &&
                    z.device() == in.f.device(),
                "svd_mean_backward: factors[", i, "] must be a ", plan.dtype, " [", in.batch, ", ", in.n, ", ", in.n,
                "] tensor on ", in.f.device(), ", got ", z.scalar_type(), " ", z.sizes(), " on ", z.device());
    scaled.push_back((z * g.narrow(0, in.offset, in.batch).reshape({-1, 1, 1})).contiguous());
    grads.push_back(at::empty_like(in.f));
    if (!in.row_gram) at::matmul_out(grads.back(), in.f, scaled.back());
  }
  apply_rows(plan, scaled, grads);
  for (size_t i = 0; i < plan.inputs.size(); ++i) {
    if (plan.inputs[i].matrix) grads[i] = grads[i].squeeze(0);
  }
  return grads;
}

}  // namespace pyprune_fast
