// Large CPU outputs backed by transparent huge pages where the kernel allows it (THP in "madvise"
// mode, the common default): a 1 GB output then takes 512 page faults instead of 262144 on first
// write. Host-only; a no-op on other systems and for small tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyprune_fast {

// Marks the 2 MB-aligned interior of t's storage MADV_HUGEPAGE; call before the first write.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel()) * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#else
  (void)t;
#endif
}

// at::empty for an output the caller fills completely, with advise_huge_pages applied.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace pyprune_fast
