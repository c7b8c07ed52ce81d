// A transpose into the GEMM's packed-strip layout, for operands stored along the other axis.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "cpu/short_copies.hpp"

namespace pykernels::cpu {

// out[k * nr + j] = rows[j * row_stride + k] for j < cols, k < kc, and 0 for cols <= j < nr: one packed
// strip from `cols` rows. float goes 4 x 4 blocks at a time through SSE registers (any x86-64 CPU).
template <typename T>
inline void transpose_into_strip(const T* rows, int64_t row_stride, int64_t kc, int64_t cols, int64_t nr, T* out) {
  int64_t j = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 4 <= cols; j += 4) {
      const float *r0 = rows + j * row_stride, *r1 = r0 + row_stride, *r2 = r1 + row_stride, *r3 = r2 + row_stride;
      int64_t k = 0;
      for (; k + 4 <= kc; k += 4) {
        __m128 a = _mm_loadu_ps(r0 + k), b = _mm_loadu_ps(r1 + k), c = _mm_loadu_ps(r2 + k), d = _mm_loadu_ps(r3 + k);
        _MM_TRANSPOSE4_PS(a, b, c, d);
        float* o = out + k * nr + j;
        _mm_storeu_ps(o, a);
        _mm_storeu_ps(o + nr, b);
        _mm_storeu_ps(o + 2 * nr, c);
        _mm_storeu_ps(o + 3 * nr, d);
      }
      for (; k < kc; ++k) {
        float* o = out + k * nr + j;
        o[0] = r0[k], o[1] = r1[k], o[2] = r2[k], o[3] = r3[k];
      }
    }
  }
#endif
  for (; j < cols; ++j)
    for (int64_t k = 0; k < kc; ++k) out[k * nr + j] = rows[j * row_stride + k];
  if (cols < nr)
    for (int64_t k = 0; k < kc; ++k) fill_short(out + k * nr + cols, nr - cols, T(0));
}

}  // namespace pykernels::cpu
