// CPU kernels of svd_mean / svd_mean_backward (the formulas are in pyprune_fast/svd_mean.h).
// - Gram matrices F F^T: a syrk-like kernel that computes the upper triangle only, in tiles of
//   kGram x kGram dot products over column chunks that stay in L2. The columns of each matrix are split
//   into fixed segments, one task each (at::parallel_for); the partial Gram matrices of a matrix are
//   summed in segment order, so results do not depend on the number of threads.
//   The next chunk of each row block is prefetched into L2 while the current one is worked on.
// - Eigendecompositions: LAPACK through at::linalg_eigh, one matrix per call, the matrices spread over
//   the threads.
// - Backward Z F: register tiles of kRows rows x kVecs vectors of columns, one task per column block
//   (details below).
// The vector code uses GCC/Clang vector extensions at three widths, chosen at run time on x86-64 like
// ATen's own kernels (ATEN_CPU_CAPABILITY): 64 bytes (x86-64-v4, AVX-512), 32 bytes (x86-64-v3, AVX2 +
// FMA) and 16 bytes (baseline, or any other CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "pyprune_fast/svd_mean.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PPF_X86_DISPATCH 1
#define PPF_TARGET(arch) __attribute__((target(arch), flatten))
#else
#define PPF_X86_DISPATCH 0
#endif

// The vector helpers below are internal and always inlined; their ABI does not matter.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyprune_fast {
namespace {

constexpr int64_t kSegment = 16384;    // columns of one Gram task (a multiple of every vector width)
constexpr int64_t kChunkBytes = 2048;  // bytes of each row in one Gram chunk: kGram rows in L1, all in L2

// Register tiles per vector width in bytes (AVX-512 has 32 vector registers, AVX2 and SSE 16).
template <int kBytes>
struct Tiles {
  static constexpr int kGram = 2, kRows = 4, kVecs = 2;
};
template <>
struct Tiles<64> {
  static constexpr int kGram = 4, kRows = 8, kVecs = 3;
};

template <typename T, int kBytes>
struct Simd {
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(kBytes)));
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

// Horizontal sums of several vectors at once. combine() adds the two halves of every block of s lanes
// of x and of y and interleaves the results block by block; reduce() applies it recursively so that
// lane block j of the result (kLanes / L lanes) sums the lanes of source j, sources v[0], v[S], ...
template <int kLanes, int s, bool kHigh>
constexpr int combine_lane(int l) {
  const int half = s / 2, block = l / half;
  return (block & 1 ? kLanes : 0) + (block / 2) * s + l % half + (kHigh ? half : 0);
}

template <typename V, int kLanes, int s, std::size_t... I>
inline V combine(V x, V y, std::index_sequence<I...>) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(x, y, combine_lane<kLanes, s, false>(I)...) +
         __builtin_shufflevector(x, y, combine_lane<kLanes, s, true>(I)...);
#else  // GCC before 12 has only __builtin_shuffle, with the lane indices as a vector
  using Index = std::conditional_t<sizeof(x[0]) == 8, int64_t, int32_t>;
  typedef Index M __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(x, y, M{combine_lane<kLanes, s, false>(I)...}) +
         __builtin_shuffle(x, y, M{combine_lane<kLanes, s, true>(I)...});
#endif
}

template <typename V, int kLanes, int L, int S>
inline V reduce(const V* v) {
  if constexpr (L == 1) {
    return v[0];
  } else {
    return combine<V, kLanes, 2 * kLanes / L>(reduce<V, kLanes, L / 2, 2 * S>(v),
                                              reduce<V, kLanes, L / 2, 2 * S>(v + S),
                                              std::make_index_sequence<kLanes>{});
  }
}

// out[q] += sum of the lanes of acc[q], q < Q.
template <typename T, int kBytes, int Q>
inline void add_lane_sums(const typename Simd<T, kBytes>::V* acc, T* out) {
  using S = Simd<T, kBytes>;
  constexpr int W = S::kLanes, L = Q < W ? Q : W, kBlock = W / L;
  for (int g = 0; g < Q / L; ++g) {
    const typename S::V r = reduce<typename S::V, W, L, 1>(acc + g * L);
    if constexpr (kBlock == 1) {
      S::store(out + g * L, S::load(out + g * L) + r);
    } else {
      for (int j = 0; j < L; ++j) {
        T sum = 0;
        for (int l = 0; l < kBlock; ++l) sum += r[j * kBlock + l];
        out[g * L + j] += sum;
      }
    }
  }
}

// ---- Gram matrices F F^T -------------------------------------------------------------------------

template <typename T>
struct GramTask {
  const T* f;      // n rows of ld values each
  int64_t n, ld;
  int64_t c0, c1;  // the columns of this task
  int64_t partial; // where its partial sums start: upper-triangle tiles of kGram x kGram values in
                   // row-major tile order (zero-initialised)
};

int64_t gram_tiles(int64_t n, int tile) {
  const int64_t blocks = (n + tile - 1) / tile;
  return blocks * (blocks + 1) / 2;
}

// One tile: out[r * kGram + c] += sum_k a[r][k] b[c][k] over [k0, k1).
template <typename T, int kBytes>
inline void gram_tile(const T* const* a, const T* const* b, int64_t k0, int64_t k1, T* out) {
  using S = Simd<T, kBytes>;
  constexpr int W = S::kLanes, TG = Tiles<kBytes>::kGram;
  typename S::V acc[TG * TG] = {};
  int64_t k = k0;
  for (; k + W <= k1; k += W) {
    typename S::V av[TG], bv[TG];
    for (int r = 0; r < TG; ++r) av[r] = S::load(a[r] + k);
    for (int c = 0; c < TG; ++c) bv[c] = S::load(b[c] + k);
    for (int r = 0; r < TG; ++r) {
      for (int c = 0; c < TG; ++c) acc[r * TG + c] += av[r] * bv[c];
    }
  }
  add_lane_sums<T, kBytes, TG * TG>(acc, out);
  for (; k < k1; ++k) {
    for (int r = 0; r < TG; ++r) {
      for (int c = 0; c < TG; ++c) out[r * TG + c] += a[r][k] * b[c][k];
    }
  }
}

template <typename T, int kBytes>
inline void gram_task(const GramTask<T>& t, T* partials) {
  constexpr int TG = Tiles<kBytes>::kGram;
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t chunk = kChunkBytes / static_cast<int64_t>(sizeof(T));
  const int64_t blocks = (t.n + TG - 1) / TG;
  // Rows past the end repeat the last row: their results land in tile entries that are never read.
  auto row = [&](int64_t i) { return t.f + std::min(i, t.n - 1) * t.ld; };
  for (int64_t k0 = t.c0; k0 < t.c1; k0 += chunk) {
    const int64_t k1 = std::min(t.c1, k0 + chunk);
    T* out = partials + t.partial;
    for (int64_t ib = 0; ib < blocks; ++ib) {
      const T* a[TG];
      for (int r = 0; r < TG; ++r) a[r] = row(ib * TG + r);
      if (k1 < t.c1) {  // these rows of the next chunk, into L2
        for (int r = 0; r < TG; ++r) {
          for (int64_t k = k1; k < std::min(t.c1, k1 + chunk); k += kLine) __builtin_prefetch(a[r] + k, 0, 2);
        }
      }
      for (int64_t jb = ib; jb < blocks; ++jb, out += TG * TG) {
        const T* b[TG];
        for (int c = 0; c < TG; ++c) b[c] = row(jb * TG + c);
        gram_tile<T, kBytes>(a, b, k0, k1, out);
      }
    }
  }
}

// ---- backward: out = S F (S symmetric n x n, F n x ld) --------------------------------------------
// A task copies its block of columns of F into a buffer of panels (n x kVecs vectors each, contiguous:
// no cache-set conflicts between the rows of a panel, whatever ld is), while prefetching the next
// block into L2, and writes S F straight from the register tiles (the stores overlap the arithmetic).

template <typename T>
struct ApplyTask {
  const T* s;  // n x n, symmetric
  const T* f;  // n rows of ld values each
  T* out;      // like f
  int64_t n, ld;
  int64_t c0, c1;  // the columns of this task
};

// Columns per task: its panels (n x width values) stay in L2 next to the prefetched next block.
int64_t apply_block(int64_t n, int64_t element_size, int64_t panel) {
  constexpr int64_t kBufferBytes = 256 * 1024;
  return std::max<int64_t>(1, kBufferBytes / (n * element_size * panel)) * panel;
}

// out rows [i0, i0 + R) (past the end: the last row again, written twice with the same values), NV
// vectors of columns; f has rows of ldf values, out rows of ldo values.
template <typename T, int kBytes, int R, int NV>
inline void apply_tile(const T* s, const T* f, int64_t ldf, T* out, int64_t ldo, int64_t n, int64_t i0) {
  using S = Simd<T, kBytes>;
  constexpr int W = S::kLanes;
  int64_t row[R];
  for (int r = 0; r < R; ++r) row[r] = std::min(i0 + r, n - 1);
  typename S::V acc[R][NV] = {};
  for (int64_t k = 0; k < n; ++k) {
    typename S::V fv[NV];
    for (int v = 0; v < NV; ++v) fv[v] = S::load(f + k * ldf + v * W);
    const T* sk = s + k * n;  // row k of S = column k, by symmetry
    for (int r = 0; r < R; ++r) {
      const T sv = sk[row[r]];
      for (int v = 0; v < NV; ++v) acc[r][v] += sv * fv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) S::store(out + row[r] * ldo + v * W, acc[r][v]);
  }
}

// `buffer` holds n * (c1 - c0) values: the full panels of P columns (panel p at p * n, rows of P
// values), then the remaining columns (rows of `rest` values).
template <typename T, int kBytes>
inline void apply_task(const ApplyTask<T>& t, T* buffer) {
  constexpr int W = Simd<T, kBytes>::kLanes, R = Tiles<kBytes>::kRows, NV = Tiles<kBytes>::kVecs, P = NV * W;
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t n = t.n, w = t.c1 - t.c0, full = w / P * P, rest = w - full;
  T* f = buffer;
  for (int64_t k = 0; k < n; ++k) {
    const T* src = t.f + k * t.ld + t.c0;
    for (int64_t p = 0; p < full; p += P) std::memcpy(f + p * n + k * P, src + p, P * sizeof(T));
    std::memcpy(f + full * n + k * rest, src + full, rest * sizeof(T));
  }
  T* out = t.out + t.c0;
  for (int64_t p = 0; p < full; p += P) {
    if (t.c1 + p < t.ld) {  // the same panel of the next block, into L2
      for (int64_t k = 0; k < n; ++k) {
        for (int64_t c = 0; c < P; c += kLine) __builtin_prefetch(t.f + k * t.ld + t.c1 + p + c, 0, 2);
      }
    }
    for (int64_t i0 = 0; i0 < n; i0 += R) {
      apply_tile<T, kBytes, R, NV>(t.s, f + p * n, P, out + p, t.ld, n, i0);
    }
  }
  const T* fr = f + full * n;
  int64_t col = 0;
  for (; col + W <= rest; col += W) {
    for (int64_t i0 = 0; i0 < n; i0 += R) {
      apply_tile<T, kBytes, R, 1>(t.s, fr + col, rest, out + full + col, t.ld, n, i0);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = col; c < rest; ++c) {
      T sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += t.s[k * n + i] * fr[k * rest + c];
      out[i * t.ld + full + c] = sum;
    }
  }
}

// ---- run-time choice of the vector width ---------------------------------------------------------

#if PPF_X86_DISPATCH
template <typename T>
PPF_TARGET("arch=x86-64-v4") void gram_task_64(const GramTask<T>& t, T* partials) {
  gram_task<T, 64>(t, partials);
}
template <typename T>
PPF_TARGET("arch=x86-64-v3") void gram_task_32(const GramTask<T>& t, T* partials) {
  gram_task<T, 32>(t, partials);
}
template <typename T>
PPF_TARGET("arch=x86-64-v4") void apply_task_64(const ApplyTask<T>& t, T* buffer) {
  apply_task<T, 64>(t, buffer);
}
template <typename T>
PPF_TARGET("arch=x86-64-v3") void apply_task_32(const ApplyTask<T>& t, T* buffer) {
  apply_task<T, 32>(t, buffer);
}
#endif

// The vector width in bytes: what both ATen's CPU capability (which ATEN_CPU_CAPABILITY can lower, as
// for torch's own kernels) and this CPU allow.
int vector_bytes() {
#if PPF_X86_DISPATCH
  static const int bytes = [] {
    __builtin_cpu_init();
    const std::string aten = at::get_cpu_capability();
    if (aten == "AVX512" && __builtin_cpu_supports("x86-64-v4")) return 64;
    if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("x86-64-v3")) return 32;
    return 16;
  }();
  return bytes;
#else
  return 16;
#endif
}

template <typename T>
void run_gram_task(const GramTask<T>& t, T* partials, int bytes) {
#if PPF_X86_DISPATCH
  if (bytes == 64) return gram_task_64<T>(t, partials);
  if (bytes == 32) return gram_task_32<T>(t, partials);
#endif
  gram_task<T, 16>(t, partials);
}

template <typename T>
void run_apply_task(const ApplyTask<T>& t, T* buffer, int bytes) {
#if PPF_X86_DISPATCH
  if (bytes == 64) return apply_task_64<T>(t, buffer);
  if (bytes == 32) return apply_task_32<T>(t, buffer);
#endif
  apply_task<T, 16>(t, buffer);
}

// ---- drivers ---------------------------------------------------------------------------------------

// F F^T of every row_gram input into its slots of grams.
template <typename T>
void gram_rows_cpu(const SvdMeanPlan& plan, std::vector<at::Tensor>& grams) {
  const int bytes = vector_bytes();
  const int tile = bytes == 64 ? Tiles<64>::kGram : Tiles<32>::kGram;
  struct Matrix {
    int64_t first_task, tasks, n;
    T* gram;
  };
  std::vector<Matrix> matrices;
  std::vector<GramTask<T>> tasks;
  int64_t partial_size = 0;
  for (const SvdMeanInput& in : plan.inputs) {
    if (!in.row_gram) continue;
    const int64_t tile_values = gram_tiles(in.n, tile) * tile * tile;
    for (int64_t b = 0; b < in.batch; ++b) {
      const T* f = in.f.data_ptr<T>() + b * in.rows * in.cols;
      T* gram = grams[in.group].data_ptr<T>() + (in.slot + b) * in.n * in.n;
      matrices.push_back({static_cast<int64_t>(tasks.size()), 0, in.n, gram});
      for (int64_t c0 = 0; c0 < in.cols; c0 += kSegment, partial_size += tile_values) {
        tasks.push_back({f, in.n, in.cols, c0, std::min(in.cols, c0 + kSegment), partial_size});
        ++matrices.back().tasks;
      }
    }
  }
  if (tasks.empty()) return;
  at::Tensor partial_sums = at::zeros({partial_size}, plan.inputs[0].f.options());
  T* partials = partial_sums.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_gram_task(tasks[i], partials, bytes);
  });
  at::parallel_for(0, static_cast<int64_t>(matrices.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const Matrix& mat = matrices[m];
      const int64_t n = mat.n, blocks = (n + tile - 1) / tile, size = gram_tiles(n, tile) * tile * tile;
      T* sum = partials + tasks[mat.first_task].partial;
      for (int64_t j = 1; j < mat.tasks; ++j) {
        const T* p = partials + tasks[mat.first_task + j].partial;
        for (int64_t q = 0; q < size; ++q) sum[q] += p[q];
      }
      const T* tile_values = sum;
      for (int64_t ib = 0; ib < blocks; ++ib) {
        for (int64_t jb = ib; jb < blocks; ++jb, tile_values += tile * tile) {
          for (int r = 0; r < tile; ++r) {
            for (int c = 0; c < tile; ++c) {
              const int64_t i = ib * tile + r, j = jb * tile + c;
              if (i < n && j < n && i <= j) mat.gram[i * n + j] = mat.gram[j * n + i] = tile_values[r * tile + c];
            }
          }
        }
      }
    }
  });
}

// The gradients are fresh tensors that the backward kernel writes once: backing them with transparent
// huge pages (where the system allows it on request, THP "madvise" mode) saves most of the cost of
// the first touch, which with 4 KiB pages is about as large as the product itself. Advice only.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// grads[i] = scaled[i] @ F_i for every row_gram input.
template <typename T>
void apply_rows_cpu(const SvdMeanPlan& plan, const std::vector<at::Tensor>& scaled, std::vector<at::Tensor>& grads) {
  const int bytes = vector_bytes();
  const int64_t lanes = bytes / static_cast<int64_t>(sizeof(T));
  const int64_t panel = lanes * (bytes == 64 ? Tiles<64>::kVecs : Tiles<32>::kVecs);
  std::vector<ApplyTask<T>> tasks;
  int64_t buffer_size = 0;
  for (size_t i = 0; i < plan.inputs.size(); ++i) {
    const SvdMeanInput& in = plan.inputs[i];
    if (!in.row_gram) continue;
    const int64_t block = apply_block(in.n, sizeof(T), panel);
    buffer_size = std::max(buffer_size, in.n * std::min(block, in.cols));
    advise_huge_pages(grads[i]);
    for (int64_t b = 0; b < in.batch; ++b) {
      const int64_t offset = b * in.rows * in.cols;
      for (int64_t c0 = 0; c0 < in.cols; c0 += block) {
        tasks.push_back({scaled[i].data_ptr<T>() + b * in.n * in.n, in.f.data_ptr<T>() + offset,
                         grads[i].data_ptr<T>() + offset, in.n, in.cols, c0, std::min(in.cols, c0 + block)});
      }
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(buffer_size);
    for (int64_t i = begin; i < end; ++i) run_apply_task(tasks[i], buffer.data(), bytes);
  });
}

// One LAPACK call per matrix, the matrices spread over the threads: LAPACK's own threading on a
// batch of small matrices is slower, and much slower when other processes share the cores.
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_cpu(const at::Tensor& gram) {
  const int64_t count = gram.size(0), n = gram.size(1);
  at::Tensor lambda = at::empty({count, n}, gram.options());
  at::Tensor U = at::empty({count, n, n}, gram.options());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto [l, u] = at::linalg_eigh(gram.select(0, b));
      lambda.select(0, b).copy_(l);
      U.select(0, b).copy_(u);
    }
  });
  return {lambda, U, at::ones({count}, gram.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> svd_mean_cpu(at::TensorList features) {
  const SvdMeanPlan plan = plan_svd_mean(features, c10::DeviceType::CPU);
  auto gram_rows = [](const SvdMeanPlan& p, std::vector<at::Tensor>& grams) {
    if (p.dtype == at::kDouble) {
      gram_rows_cpu<double>(p, grams);
    } else {
      gram_rows_cpu<float>(p, grams);
    }
  };
  return svd_mean_forward(plan, gram_rows, eigh_cpu);
}

std::vector<at::Tensor> svd_mean_backward_cpu(const at::Tensor& grad, at::TensorList features,
                                              at::TensorList factors) {
  const SvdMeanPlan plan = plan_svd_mean(features, c10::DeviceType::CPU);
  auto apply_rows = [](const SvdMeanPlan& p, const std::vector<at::Tensor>& scaled, std::vector<at::Tensor>& grads) {
    if (p.dtype == at::kDouble) {
      apply_rows_cpu<double>(p, scaled, grads);
    } else {
      apply_rows_cpu<float>(p, scaled, grads);
    }
  };
  return svd_mean_backward(plan, grad, factors, apply_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune_fast, CPU, m) {
  m.impl("svd_mean", &svd_mean_cpu);
  m.impl("svd_mean_backward", &svd_mean_backward_cpu);
}

}  // namespace pyprune_fast
