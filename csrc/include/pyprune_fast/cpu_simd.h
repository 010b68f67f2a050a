// CPU-only SIMD helpers: 64-byte vectors through GCC/Clang vector extensions, and the function
// multi-versioning used by the CPU kernels (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + F16C + FMA,
// baseline x86-64; the loader picks one at run time).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// 16 floats at a time, loaded from fp32/fp16/bf16 (the kernels that compute in fp32).
namespace vec {

constexpr int kWidth = 16;
typedef float vfloat __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kWidth * sizeof(int32_t))));
typedef uint16_t vbits16 __attribute__((vector_size(kWidth * sizeof(uint16_t))));
typedef _Float16 vhalf __attribute__((vector_size(kWidth * sizeof(_Float16))));

// 16 consecutive values as floats.
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vfloat load(const c10::Half* p) {
  vhalf h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vfloat);
}
inline vfloat load(const c10::BFloat16* p) {
  vbits16 b;
  std::memcpy(&b, p, sizeof(b));
  return reinterpret_cast<vfloat>(__builtin_convertvector(b, vint) << 16);
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace vec

}  // namespace pyprune_fast
