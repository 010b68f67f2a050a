// Host-side argument checks of the 2:4 ops, shared by the CPU and CUDA launchers (the Python face in
// pyprune_fast/ops/sparse24.py checks the same with friendlier messages; these guard direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>

#include <c10/util/accumulate.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "pyprune_fast/sparse24.h"

namespace pyprune_fast {
namespace sparse24 {

enum Activation : int { kActNone = 0, kActRelu = 1, kActGelu = 2 };

inline int parse_activation(c10::string_view activation) {
  const std::string a(activation);
  if (a == "none") return kActNone;
  if (a == "relu") return kActRelu;
  if (a == "gelu") return kActGelu;
  TORCH_CHECK(false, "activation must be 'none', 'relu' or 'gelu', got '", a, "'");
}

struct Shape {
  int64_t out;
  int64_t in;
};

inline void check_float_dtype(const at::Tensor& t, const char* what) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, what,
              " must be float32, float16 or bfloat16, got ", d);
}

// A dense weight to compress: [out, in] with out % 16 == 0 and in % 32 == 0; mask bool, same shape.
inline Shape check_dense(const at::Tensor& w, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(w.dim() == 2, "w must be a 2-d [out, in] weight, got shape ", w.sizes());
  check_float_dtype(w, "w");
  TORCH_CHECK(w.size(0) % kTileRows == 0 && w.size(1) % kTileCols == 0,
              "w must have out % 16 == 0 and in % 32 == 0 (the m16n8k32 metadata tile), got shape ", w.sizes());
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == w.sizes(), "mask has shape ", mask->sizes(), " but w has shape ", w.sizes());
    TORCH_CHECK(mask->device() == w.device(), "mask is on ", mask->device(), " but w is on ", w.device());
  }
  return {w.size(0), w.size(1)};
}

// values [out, in/2] and meta int32 [out/16, in/32, 16] on the same device.
inline Shape check_compressed(const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK(values.dim() == 2, "values must be a 2-d [out, in/2] tensor, got shape ", values.sizes());
  check_float_dtype(values, "values");
  const int64_t out = values.size(0), in = 2 * values.size(1);
  TORCH_CHECK(out % kTileRows == 0 && in % kTileCols == 0,
              "values must be [out, in/2] with out % 16 == 0 and in % 32 == 0, got shape ", values.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kInt, "meta must be int32, got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 3 && meta.size(0) == out / kTileRows && meta.size(1) == in / kTileCols &&
                  meta.size(2) == kTileWords,
              "meta must have shape [", out / kTileRows, ", ", in / kTileCols, ", ", kTileWords,
              "] for values of shape ", values.sizes(), ", got ", meta.sizes());
  TORCH_CHECK(meta.device() == values.device(), "meta is on ", meta.device(), " but values is on ", values.device());
  return {out, in};
}

// x [..., in], values/meta of a weight [out, in] with in % 64 == 0 and out % 64 == 0, bias [out];
// x, values and bias of one dtype on one device.
inline Shape check_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& bias) {
  const Shape s = check_compressed(values, meta);
  TORCH_CHECK(s.in % 64 == 0 && s.out % 64 == 0,
              "sparse24_linear needs in and out features that are multiples of 64, got in=", s.in, ", out=", s.out);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == s.in, "x must be [..., ", s.in, "], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "x is ", x.scalar_type(), " but values is ",
              values.scalar_type());
  TORCH_CHECK(x.device() == values.device(), "x is on ", x.device(), " but values is on ", values.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out, "bias must be [", s.out, "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias is ", bias->scalar_type(), " but x is ",
                x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "bias is on ", bias->device(), " but x is on ", x.device());
  }
  return s;
}

// The checks both CUDA kernels of sparse24_linear start with, before any guard or launch: the activation,
// check_linear's shapes, and fp16/bf16 (the sparse tensor cores take no fp32). Returns the activation
// code and the weight's shape.
inline std::pair<int, Shape> check_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                               const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const int act = parse_activation(activation);
  const Shape s = check_linear(x, values, meta, bias);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparse24_linear on CUDA needs float16 or bfloat16 (the sparse tensor cores), got ", x.scalar_type());
  return {act, s};
}

// A contiguous copy when t is not contiguous or its data is not 16-byte aligned (cp.async and TMA need both).
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// x [..., in] as the matrix [rows, in] (rows = the product of x's leading sizes). reshape({-1, in})
// cannot infer rows when in == 0, a shape the checks above accept.
inline at::Tensor as_rows(const at::Tensor& x, int64_t in) {
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return x.reshape({rows, in});
}

// The operands the CUDA kernels read: x as [rows, in], values and meta, each contiguous and 16-byte
// aligned; bias contiguous.
struct LinearOperands {
  at::Tensor x2, values, meta;
  std::optional<at::Tensor> bias;
};

inline LinearOperands linear_operands(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                      const std::optional<at::Tensor>& bias, int64_t in) {
  return {aligned_contiguous(as_rows(x, in)), aligned_contiguous(values), aligned_contiguous(meta),
          bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt};
}

// The float32 epilogue of both backends: act(y) in place or as a new tensor (exact GELU, as nn.GELU()).
inline at::Tensor activate(at::Tensor y, int act) {
  if (act == kActRelu) return y.relu_();
  if (act == kActGelu) return at::gelu(y);
  return y;
}

// sparse24_linear with no input features (in == 0): every row of y is act(bias), or act(0) without a
// bias, computed in float32 and rounded once to x's dtype, as the product path would.
inline at::Tensor linear_without_inputs(const at::Tensor& x, int64_t out, const std::optional<at::Tensor>& bias,
                                        int act) {
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor y = at::zeros({rows, out}, x.options().dtype(at::kFloat));
  if (bias) y.add_(bias->to(at::kFloat));
  return activate(y, act).to(x.scalar_type());
}

// Output shape of sparse24_linear: x's leading dimensions and out.
inline std::vector<int64_t> linear_output_shape(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return shape;
}

}  // namespace sparse24
}  // namespace pyprune_fast
