// Copies and fills of a few dozen values (a row segment of an image, a strip of a packed block), as
// vector loops: std::copy / std::fill become calls to memmove / memset, and for such short runs the
// call costs more than the copy. Internal linkage (static): the per-instruction-set builds include this
// with different -m flags, and one shared out-of-line copy could carry another build's instructions.
#pragma once

#include <cstdint>

namespace pykernels::cpu {

template <typename T>
static inline void copy_short(const T* __restrict__ from, int64_t n, T* __restrict__ to) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) to[i] = from[i];
}

template <typename T>
static inline void fill_short(T* to, int64_t n, T value) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) to[i] = value;
}

}  // namespace pykernels::cpu
