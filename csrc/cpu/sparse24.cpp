// CPU kernels of compress_24 / decompress_24 (rows in memory order; the per-chunk rules and the
// metadata layout are pyprune_fast/sparse24.h, shared with the CUDA kernels) and the CPU path of
// sparse24_linear: the weight decompressed to float32, one matmul, bias and activation in float32, one
// rounding to x's dtype — the numerics of the CUDA kernel (fp32 accumulation, fused epilogue).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>

#include "pyprune_fast/sparse24_args.h"

namespace pyprune_fast {
namespace {

using namespace sparse24;

// One task per range of 16-row tiles (a tile owns its metadata words); rows are walked in memory order.
template <typename T>
int64_t compress_typed(const at::Tensor& w, const std::optional<at::Tensor>& mask, at::Tensor& values,
                       at::Tensor& meta) {
  const int64_t out = w.size(0), in = w.size(1);
  const T* wp = w.data_ptr<T>();
  const bool* mp = mask ? mask->data_ptr<bool>() : nullptr;
  T* vp = values.data_ptr<T>();
  uint32_t* ep = reinterpret_cast<uint32_t*>(meta.data_ptr<int32_t>());
  return at::parallel_reduce(
      0, out / kTileRows, 1, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t invalid) {
        std::fill(ep + begin * (in / kTileCols) * kTileWords, ep + end * (in / kTileCols) * kTileWords, 0u);
        for (int64_t r = begin * kTileRows; r < end * kTileRows; ++r) {
          for (int64_t c = 0; c < in / 4; ++c) {
            const int64_t at = r * in + 4 * c;
            const unsigned nibble =
                compress_chunk(wp + at, mp ? mp + at : nullptr, vp + r * (in / 2) + 2 * c, &invalid);
            ep[word_of(r, c, in)] |= nibble << shift_of(r, c);
          }
        }
        return invalid;
      },
      std::plus<int64_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_24_cpu(const at::Tensor& w_in,
                                                               const std::optional<at::Tensor>& mask_in) {
  const Shape s = check_dense(w_in, mask_in);
  const at::Tensor w = w_in.contiguous();
  const std::optional<at::Tensor> mask = mask_in ? std::optional<at::Tensor>(mask_in->contiguous()) : std::nullopt;
  at::Tensor values = at::empty({s.out, s.in / 2}, w.options());
  at::Tensor meta = at::empty({s.out / kTileRows, s.in / kTileCols, kTileWords}, w.options().dtype(at::kInt));
  int64_t invalid = 0;
  switch (w.scalar_type()) {
    case at::kHalf:
      invalid = compress_typed<c10::Half>(w, mask, values, meta);
      break;
    case at::kBFloat16:
      invalid = compress_typed<c10::BFloat16>(w, mask, values, meta);
      break;
    default:
      invalid = compress_typed<float>(w, mask, values, meta);
  }
  return {values, meta, at::scalar_tensor(invalid, w.options().dtype(at::kLong))};
}

// Decompresses into dense (type Out, [out, in], contiguous), rows in memory order; returns the number of
// invalid nibbles.
template <typename T, typename Out>
int64_t decompress_typed(const at::Tensor& values, const at::Tensor& meta, at::Tensor& dense) {
  const int64_t out = dense.size(0), in = dense.size(1);
  const T* vp = values.data_ptr<T>();
  const uint32_t* ep = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  Out* dp = dense.data_ptr<Out>();
  return at::parallel_reduce(
      0, out, 1, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t invalid) {
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t c = 0; c < in / 4; ++c) {
            const unsigned nibble = ep[word_of(r, c, in)] >> shift_of(r, c) & 0xfu;
            invalid += decompress_chunk(vp + r * (in / 2) + 2 * c, nibble, dp + r * in + 4 * c);
          }
        }
        return invalid;
      },
      std::plus<int64_t>());
}

template <typename Out>
int64_t decompress_into(const at::Tensor& values, const at::Tensor& meta, at::Tensor& dense) {
  switch (values.scalar_type()) {
    case at::kHalf:
      return decompress_typed<c10::Half, Out>(values, meta, dense);
    case at::kBFloat16:
      return decompress_typed<c10::BFloat16, Out>(values, meta, dense);
    default:
      return decompress_typed<float, Out>(values, meta, dense);
  }
}

std::tuple<at::Tensor, at::Tensor> decompress_24_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const Shape s = check_compressed(values_in, meta_in);
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  at::Tensor dense = at::empty({s.out, s.in}, values.options());
  int64_t invalid = 0;
  switch (values.scalar_type()) {
    case at::kHalf:
      invalid = decompress_into<c10::Half>(values, meta, dense);
      break;
    case at::kBFloat16:
      invalid = decompress_into<c10::BFloat16>(values, meta, dense);
      break;
    default:
      invalid = decompress_into<float>(values, meta, dense);
  }
  return {dense, at::scalar_tensor(invalid, values.options().dtype(at::kLong))};
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const int act = parse_activation(activation);
  const Shape s = check_linear(x, values, meta, bias);
  at::Tensor w = at::empty({s.out, s.in}, values.options().dtype(at::kFloat));
  const int64_t invalid = decompress_into<float>(values.contiguous(), meta.contiguous(), w);
  TORCH_CHECK(invalid == 0, "meta holds ", invalid,
              " chunks whose index pair is not one of the six ordered 2:4 pairs; make meta with compress_24");
  const at::Tensor x2 = as_rows(x, s.in).to(at::kFloat);
  const at::Tensor y = bias ? at::addmm(bias->to(at::kFloat), x2, w.t()) : at::mm(x2, w.t());
  return activate(y, act).to(x.scalar_type()).view(linear_output_shape(x, s.out));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CPU, m) {
  m.impl("compress_24", &compress_24_cpu);
  m.impl("decompress_24", &decompress_24_cpu);
  m.impl("sparse24_linear", &sparse24_linear_cpu);
}

}  // namespace pyprune_fast
