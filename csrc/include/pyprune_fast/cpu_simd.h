// CPU-only SIMD helpers: 64-byte vectors through GCC/Clang vector extensions, and the function
// multi-versioning used by the CPU kernels (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + F16C + FMA,
// baseline x86-64; the loader picks one at run time).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PPF_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PPF_TARGET_CLONES
#endif

// The 64-byte vector helpers are internal and always inlined; their ABI does not matter.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyprune_fast {

constexpr int kVectorBytes = 64;

template <typename T>
struct Simd {
  static constexpr int kLanes = kVectorBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kVectorBytes)));
  // One byte per lane, for masks.
  typedef uint8_t bytes __attribute__((vector_size(kLanes)));
  typedef std::make_signed_t<T> signed_lane;
  typedef signed_lane signed_type __attribute__((vector_size(kVectorBytes)));

  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static type splat(T x) { return type{} + x; }
  static bool any(type v) {
    T acc = 0;
    for (int j = 0; j < kLanes; ++j) acc |= v[j];
    return acc != 0;
  }
};

}  // namespace pyprune_fast
