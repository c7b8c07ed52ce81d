// A transpose into the GEMM's packed-strip layout, for operands stored along the other axis. Internal
// linkage (static), as in short_copies.hpp: the body differs between the per-instruction-set builds that
// include it, so they must not share one out-of-line copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "cpu/short_copies.hpp"

namespace pykernels::cpu {

#if defined(__AVX__)
// The steps of an 8 x 8 transpose of floats by register width: __m256 holds one 8 x 8 block's row, __m512
// (AVX-512) the rows of two blocks side by side, which go through the same steps at once.
static inline __m256 unpack_low(__m256 a, __m256 b) { return _mm256_unpacklo_ps(a, b); }
static inline __m256 unpack_high(__m256 a, __m256 b) { return _mm256_unpackhi_ps(a, b); }
template <int Imm>
static inline __m256 shuffle_pairs(__m256 a, __m256 b) { return _mm256_shuffle_ps(a, b, Imm); }
// The low (or high) 128 bits of a's block, then those of b's: permute2f128's 0x20 (0x31).
template <bool High>
static inline __m256 join_halves(__m256 a, __m256 b) { return _mm256_permute2f128_ps(a, b, High ? 0x31 : 0x20); }
#if defined(__AVX512F__)
static inline __m512 unpack_low(__m512 a, __m512 b) { return _mm512_unpacklo_ps(a, b); }
static inline __m512 unpack_high(__m512 a, __m512 b) { return _mm512_unpackhi_ps(a, b); }
template <int Imm>
static inline __m512 shuffle_pairs(__m512 a, __m512 b) { return _mm512_shuffle_ps(a, b, Imm); }
template <bool High>
static inline __m512 join_halves(__m512 a, __m512 b) {  // per 256-bit block: one two-source permute
  const __m512i index = High ? _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31)
                             : _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  return _mm512_permutex2var_ps(a, index, b);
}
#endif

// The 8 x 8 block(s) of a[0..7] (8 rows of 8 values per block, in registers) transposed in place: a[k][i]
// becomes the old a[i][k], block by block (with __m512, a[k] = {column k of the first block, column k of
// the second}: 16 rows' value k, in order).
template <typename V>
static inline void transpose_8x8_in_registers(V a[8]) {
  V t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = unpack_low(a[i], a[i + 1]);
    t[i + 1] = unpack_high(a[i], a[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    a[i] = shuffle_pairs<_MM_SHUFFLE(1, 0, 1, 0)>(t[i], t[i + 2]);
    a[i + 1] = shuffle_pairs<_MM_SHUFFLE(3, 2, 3, 2)>(t[i], t[i + 2]);
    a[i + 2] = shuffle_pairs<_MM_SHUFFLE(1, 0, 1, 0)>(t[i + 1], t[i + 3]);
    a[i + 3] = shuffle_pairs<_MM_SHUFFLE(3, 2, 3, 2)>(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = join_halves<false>(a[i], a[i + 4]);
    t[i + 4] = join_halves<true>(a[i], a[i + 4]);
  }
  for (int i = 0; i < 8; ++i) a[i] = t[i];
}

// The last column of the 8 x 8 block(s) a[0..7] ({a[0][7], ..., a[7][7]} per block): the transpose's last
// row from its 7 shuffles of it.
template <typename V>
static inline V last_column_8x8(const V a[8]) {
  const V t1 = unpack_high(a[0], a[1]), t3 = unpack_high(a[2], a[3]);
  const V t5 = unpack_high(a[4], a[5]), t7 = unpack_high(a[6], a[7]);
  constexpr int kHigh = _MM_SHUFFLE(3, 2, 3, 2);
  return join_halves<true>(shuffle_pairs<kHigh>(t1, t3), shuffle_pairs<kHigh>(t5, t7));
}

// The 8 x 8 block a[0..7] (8 rows of 8 values, in registers) into out[k * nr + i].
static inline void transpose_8x8(__m256 a[8], float* out, int64_t nr) {
  transpose_8x8_in_registers(a);
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out + k * nr, a[k]);
}

// The 4 x 4 block of doubles a[0..3] transposed in place.
static inline void transpose_4x4_in_registers(__m256d a[4]) {
  const __m256d t0 = _mm256_unpacklo_pd(a[0], a[1]), t1 = _mm256_unpackhi_pd(a[0], a[1]);
  const __m256d t2 = _mm256_unpacklo_pd(a[2], a[3]), t3 = _mm256_unpackhi_pd(a[2], a[3]);
  a[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
  a[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
  a[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
  a[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

// The last column of the 4 x 4 block of doubles a[0..3]: {a[0][3], ..., a[3][3]}.
static inline __m256d last_column_4x4(const __m256d a[4]) {
  return _mm256_permute2f128_pd(_mm256_unpackhi_pd(a[0], a[1]), _mm256_unpackhi_pd(a[2], a[3]), 0x31);
}

// The 4 x 4 block of doubles a[0..3] (4 rows of 4 values, in registers) into out[k * nr + i].
static inline void transpose_4x4(const __m256d a[4], double* out, int64_t nr) {
  __m256d b[4] = {a[0], a[1], a[2], a[3]};
  transpose_4x4_in_registers(b);
  for (int k = 0; k < 4; ++k) _mm256_storeu_pd(out + k * nr, b[k]);
}

// The 8 x 8 block at rows[0..7][0..7] (row i at rows + i * row_stride) into out[k * nr + i].
static inline void transpose_8x8(const float* rows, int64_t row_stride, float* out, int64_t nr) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(rows + i * row_stride);
  transpose_8x8(a, out, nr);
}
#endif

#if defined(__AVX512F__)
// The 8 values at first and the 8 at second, side by side in one register.
static inline __m512 load_two_halves(const float* first, const float* second) {
  const __m512d low = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(first)));
  return _mm512_castpd_ps(_mm512_insertf64x4(low, _mm256_castps_pd(_mm256_loadu_ps(second)), 1));
}
#endif

// out[k * nr + j] = rows[j * row_stride + k] for j < cols, k < kc, and 0 for cols <= j < nr: one packed
// strip from `cols` rows. float goes 8 x 8 blocks at a time through AVX registers in the builds that have
// them (im2col_impl.inc's AVX2 and AVX-512 builds), then 4 x 4 through SSE (any x86-64 CPU); double 4 x 4
// through AVX (it was element by element: float64 backward-weight ran at a third of float32's speed).
template <typename T>
static inline void transpose_into_strip(const T* rows, int64_t row_stride, int64_t kc, int64_t cols, int64_t nr,
                                        T* out) {
  int64_t j = 0;
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 8 <= cols; j += 8) {
      const float* r = rows + j * row_stride;
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) transpose_8x8(r + k, row_stride, out + k * nr + j, nr);
      for (; k < kc; ++k)
        for (int64_t i = 0; i < 8; ++i) out[k * nr + j + i] = r[i * row_stride + k];
    }
  }
  if constexpr (std::is_same_v<T, double>) {
    for (; j + 4 <= cols; j += 4) {
      const double* r = rows + j * row_stride;
      int64_t k = 0;
      for (; k + 4 <= kc; k += 4) {
        __m256d a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_pd(r + i * row_stride + k);
        transpose_4x4(a, out + k * nr + j, nr);
      }
      for (; k < kc; ++k)
        for (int64_t i = 0; i < 4; ++i) out[k * nr + j + i] = r[i * row_stride + k];
    }
  }
#endif
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

// out[k * nr + j] = runs[j][k] for j < cols, k < length, and 0 for cols <= j < nr: transpose_into_strip for
// rows that lie anywhere (the im2col rows of a phase-split copy).
template <typename T>
static inline void transpose_runs_into_strip(const T* const* runs, int64_t length, int64_t cols, int64_t nr, T* out) {
  int64_t j = 0;
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 8 <= cols; j += 8) {
      const float* const* r = runs + j;
      int64_t k = 0;
      for (; k + 8 <= length; k += 8) {
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(r[i] + k);
        transpose_8x8(a, out + k * nr + j, nr);
      }
      for (; k < length; ++k)
        for (int64_t i = 0; i < 8; ++i) out[k * nr + j + i] = r[i][k];
    }
  }
  if constexpr (std::is_same_v<T, double>) {
    for (; j + 4 <= cols; j += 4) {
      const double* const* r = runs + j;
      int64_t k = 0;
      for (; k + 4 <= length; k += 4) {
        __m256d a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_pd(r[i] + k);
        transpose_4x4(a, out + k * nr + j, nr);
      }
      for (; k < length; ++k)
        for (int64_t i = 0; i < 4; ++i) out[k * nr + j + i] = r[i][k];
    }
  }
#endif
  for (; j < cols; ++j)
    for (int64_t k = 0; k < length; ++k) out[k * nr + j] = runs[j][k];
  if (cols < nr)
    for (int64_t k = 0; k < length; ++k) fill_short(out + k * nr + cols, nr - cols, T(0));
}

// The side of the square blocks transposed in registers: 8 floats or 4 doubles with AVX, 4 floats or 2
// doubles with SSE2, else 1 (value by value).
#if defined(__AVX__)
template <typename T>
constexpr int kTransposeBlock = std::is_same_v<T, float> ? 8 : 4;
#elif defined(__SSE2__)
template <typename T>
constexpr int kTransposeBlock = std::is_same_v<T, float> ? 4 : 2;
#else
template <typename T>
constexpr int kTransposeBlock = 1;
#endif

// to[k][i] = from[i][k] for i, k < kTransposeBlock<T>: a block whose rows lie anywhere.
template <typename T>
static inline void transpose_block(const T* const* from, T* const* to) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(from[i]);
    transpose_8x8_in_registers(a);
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(to[k], a[k]);
  } else {
    __m256d a[4];
    for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_pd(from[i]);
    transpose_4x4_in_registers(a);
    for (int k = 0; k < 4; ++k) _mm256_storeu_pd(to[k], a[k]);
  }
#elif defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    __m128 a = _mm_loadu_ps(from[0]), b = _mm_loadu_ps(from[1]), c = _mm_loadu_ps(from[2]), d = _mm_loadu_ps(from[3]);
    _MM_TRANSPOSE4_PS(a, b, c, d);
    _mm_storeu_ps(to[0], a), _mm_storeu_ps(to[1], b), _mm_storeu_ps(to[2], c), _mm_storeu_ps(to[3], d);
  } else {
    const __m128d a = _mm_loadu_pd(from[0]), b = _mm_loadu_pd(from[1]);
    _mm_storeu_pd(to[0], _mm_unpacklo_pd(a, b)), _mm_storeu_pd(to[1], _mm_unpackhi_pd(a, b));
  }
#else
  to[0][0] = from[0][0];
#endif
}

// GCC 12 warns that the undefined pass-through operand inside AVX-512 intrinsics (_mm512_undefined_ps) may
// be used uninitialized where the functions below inline them; it is not used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Planes (channel c's value i at planes[c * stride + i]) into cells of `lanes` channels that lie anywhere:
// cells[cell[i] + c] = planes[c * stride + i] for i < count and c < cn, and zero for cn <= c < lanes.
template <typename T>
static inline void planes_into_cells(const T* planes, int64_t stride, int64_t count, int64_t cn, int64_t lanes,
                                     const int64_t* cell, T* cells) {
  constexpr int B = kTransposeBlock<T>;
  int64_t c0 = 0;
#if defined(__AVX512F__)
  // 16 channels of 8 cells at once: two 8 x 8 blocks side by side in __m512 registers, whose columns are
  // then the cells' 16 channels, one store each (192 channels of 28x28, depthwise 3x3 forward: 0.25 -> 0.19 ms)
  if constexpr (std::is_same_v<T, float>) {
    for (; c0 + 16 <= cn; c0 += 16) {
      int64_t i = 0;
      for (; i + 8 <= count; i += 8) {
        __m512 a[8];
        for (int k = 0; k < 8; ++k)
          a[k] = load_two_halves(planes + (c0 + k) * stride + i, planes + (c0 + 8 + k) * stride + i);
        transpose_8x8_in_registers(a);
        for (int k = 0; k < 8; ++k) _mm512_storeu_ps(cells + cell[i + k] + c0, a[k]);
      }
      for (; i < count; ++i)
        for (int k = 0; k < 16; ++k) cells[cell[i] + c0 + k] = planes[(c0 + k) * stride + i];
    }
  }
#endif
  for (; B > 1 && c0 + B <= cn; c0 += B) {
    int64_t i = 0;
    for (; i + B <= count; i += B) {
      const T* from[B];
      T* to[B];
      for (int k = 0; k < B; ++k) from[k] = planes + (c0 + k) * stride + i, to[k] = cells + cell[i + k] + c0;
      transpose_block(from, to);
    }
    for (; i < count; ++i)
      for (int k = 0; k < B; ++k) cells[cell[i] + c0 + k] = planes[(c0 + k) * stride + i];
  }
  for (; c0 < cn; ++c0)
    for (int64_t i = 0; i < count; ++i) cells[cell[i] + c0] = planes[c0 * stride + i];
  if (cn < lanes)
    for (int64_t i = 0; i < count; ++i) fill_short(cells + cell[i] + cn, lanes - cn, T(0));
}

// The inverse for channels [0, cn): planes[c * stride + i] = cells[cell[i] + c].
template <typename T>
static inline void cells_into_planes(const T* cells, const int64_t* cell, int64_t count, int64_t cn, T* planes,
                                     int64_t stride) {
  constexpr int B = kTransposeBlock<T>;
  int64_t c0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {  // as planes_into_cells, the other way
    for (; c0 + 16 <= cn; c0 += 16) {
      int64_t i = 0;
      for (; i + 8 <= count; i += 8) {
        __m512 a[8];
        for (int k = 0; k < 8; ++k) a[k] = _mm512_loadu_ps(cells + cell[i + k] + c0);
        transpose_8x8_in_registers(a);  // a[k]: channel c0 + k's 8 values, then channel c0 + 8 + k's
        for (int k = 0; k < 8; ++k) {
          _mm256_storeu_ps(planes + (c0 + k) * stride + i, _mm512_castps512_ps256(a[k]));
          _mm256_storeu_ps(planes + (c0 + 8 + k) * stride + i,
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[k]), 1)));
        }
      }
      for (; i < count; ++i)
        for (int k = 0; k < 16; ++k) planes[(c0 + k) * stride + i] = cells[cell[i] + c0 + k];
    }
  }
#endif
  for (; B > 1 && c0 + B <= cn; c0 += B) {
    int64_t i = 0;
    for (; i + B <= count; i += B) {
      const T* from[B];
      T* to[B];
      for (int k = 0; k < B; ++k) from[k] = cells + cell[i + k] + c0, to[k] = planes + (c0 + k) * stride + i;
      transpose_block(from, to);
    }
    for (; i < count; ++i)
      for (int k = 0; k < B; ++k) planes[(c0 + k) * stride + i] = cells[cell[i] + c0 + k];
  }
  for (; c0 < cn; ++c0)
    for (int64_t i = 0; i < count; ++i) planes[c0 * stride + i] = cells[cell[i] + c0];
}
#pragma GCC diagnostic pop

}  // namespace pykernels::cpu
