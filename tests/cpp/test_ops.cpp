// C++ test of the operator library built by CMakeLists.txt: loads it like Python does and checks
// the ops through the dispatcher against ATen computations. Exit code 0 = all checks passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}

using SaliencyFn = std::tuple<std::vector<at::Tensor>, at::Tensor>(at::TensorList, at::TensorList);
using SvdMeanFn = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList);
using SvdMeanBackwardFn = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList);
using AccumulateFn = at::Tensor(at::TensorList, at::TensorList, at::TensorList, double, int64_t);

std::tuple<std::vector<at::Tensor>, at::Tensor> saliency(at::TensorList g, at::TensorList w) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyprune_fast::saliency", "").typed<SaliencyFn>();
  return op.call(g, w);
}

at::Tensor accumulate(at::TensorList acc, at::TensorList g, at::TensorList w, double scale, int64_t power) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyprune_fast::saliency_accumulate_", "")
                       .typed<AccumulateFn>();
  return op.call(acc, g, w, scale, power);
}

// Mean singular value and its gradient U V^T / k against ATen's SVD, for N < D and N > D in one call.
void test_svd_mean() {
  static auto forward =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyprune_fast::svd_mean", "").typed<SvdMeanFn>();
  static auto backward = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune_fast::svd_mean_backward", "")
                             .typed<SvdMeanBackwardFn>();
  std::vector<at::Tensor> f = {at::randn({3, 6, 50}, at::kDouble), at::randn({6, 4}, at::kDouble)};
  auto [values, factors] = forward.call(f);
  std::vector<at::Tensor> grads = backward.call(at::ones({4}, at::kDouble), f, factors);
  bool ok = values.sizes() == at::IntArrayRef({4}) && grads.size() == 2;
  for (size_t i = 0; ok && i < f.size(); ++i) {
    auto [u, s, vh] = at::linalg_svd(f[i], /*full_matrices=*/false);
    const double k = static_cast<double>(s.size(-1));
    const at::Tensor value = values.narrow(0, i == 0 ? 0 : 3, i == 0 ? 3 : 1);
    ok = at::allclose(value, s.mean(-1).reshape(value.sizes()), 1e-10, 0) &&
         at::allclose(grads[i], at::matmul(u, vh) / k, 0, 1e-10);
  }
  check(ok, "svd_mean value and gradient equal mean(svdvals) and U V^T / k (N < D and N > D)");
}

void test_matches_aten() {
  at::manual_seed(0);
  std::vector<at::Tensor> g = {at::randn({300, 70}), at::randn({65537}).to(at::kHalf), at::randn({0}),
                               at::randn({64, 48}).t()};
  std::vector<at::Tensor> w = {at::randn({300, 70}), at::randn({65537}).to(at::kHalf), at::randn({0}),
                               at::randn({64, 48}).t()};
  auto [scores, stats] = saliency(g, w);
  bool equal = true;
  double sum = 0, count = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    at::Tensor expected = (g[i].to(at::kFloat) * w[i].to(at::kFloat)).abs();
    equal = equal && scores[i].sizes() == w[i].sizes() && at::equal(scores[i], expected);
    sum += expected.sum(at::kDouble).item<double>();
    count += static_cast<double>(expected.numel());
  }
  check(equal, "saliency scores equal |g*w| for float/half/empty/transposed tensors");
  check(stats.scalar_type() == at::kDouble && stats.numel() == 7, "stats is float64 [7]");
  check(stats[0].item<double>() == count, "stats count");
  check(std::abs(stats[1].item<double>() - sum) <= 1e-6 * sum, "stats sum");
}

void test_non_finite() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  at::Tensor g = at::tensor({inf, 0.f, nan, 2.f, -3.f});
  at::Tensor w = at::tensor({1.f, inf, 1.f, 0.5f, 2.f});
  auto [scores, stats] = saliency({g}, {w});
  check(stats[5].item<double>() == 3 && stats[6].item<double>() == 2, "inf, 0*inf and NaN counted");
  check(stats[3].item<double>() == 1.0 && stats[4].item<double>() == 6.0, "min/max over finite values");
  check(stats[1].item<double>() == 7.0, "sum over finite values");
}

void test_accumulate() {
  at::Tensor g = at::randn({1000}), w = at::randn({1000});
  at::Tensor acc = at::ones({1000});
  accumulate({acc}, {g}, {w}, 0.5, 2);
  at::Tensor expected = 1 + 0.5 * (g * w).pow(2);
  check(at::allclose(acc, expected, 1e-6, 1e-6), "acc += 0.5 * |g*w|^2 in place");
}

void test_errors() {
  bool threw = false;
  try {
    saliency({at::randn({3})}, {at::randn({4})});
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("has shape") != std::string::npos;
  }
  check(threw, "mismatched shapes raise an error naming the shapes");
}

}  // namespace

int main() {
  if (dlopen(PYPRUNE_FAST_LIBRARY, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load " << PYPRUNE_FAST_LIBRARY << ": " << dlerror() << "\n";
    return 2;
  }
  test_matches_aten();
  test_non_finite();
  test_accumulate();
  test_errors();
  test_svd_mean();
  std::cout << (failures == 0 ? "all passed" : "FAILED") << "\n";
  return failures == 0 ? 0 : 1;
}
