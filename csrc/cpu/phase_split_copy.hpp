// A padded copy of x split into its stride phases, in which every im2col row of one output row is a
// contiguous run (conv_rows.cpp explains the layout): the forward's GEMM reads it in place, and
// backward-weight transposes its runs straight into packed strips (im2col_impl.inc).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/shapes.hpp"
#include "cpu/conv_ranges.hpp"
#include "cpu/gemm.hpp"
#include "cpu/short_copies.hpp"

namespace pykernels::cpu {

// The copy of one image's group, split into its stride phases along both axes: phase (a, f) of channel c
// holds padded rows a, a + sh, a + 2*sh, ... and padded columns f, f + sw, ..., as plane_rows rows of
// `width` values at ((c * sh + a) * sw + f) * plane_rows * width. Padded rows [0, rows) (a multiple of sh,
// at least the ones the output reads; those past the image are zeros), and kGemmMaxStripWidth readable
// values after the last plane (gemm_packed_rows reads whole strips). Output row p's tap (r, kw) is the run
// from row p + r*dh / sh, column kw*dw / sw of phase (r*dh % sh, kw*dw % sw): output row p + 1's runs start
// `width` values after row p's, at any stride (conv_rows.cpp's wide rows rely on it).
struct PhaseSplitCopy {
  int64_t rows, plane_rows, width, size;

  explicit PhaseSplitCopy(const Conv2dShape& s) {
    const Window2d& win = s.win;
    const int64_t read = (s.P - 1) * win.stride_h + (s.R - 1) * win.dilation_h + 1;  // padded rows read
    plane_rows = (read + win.stride_h - 1) / win.stride_h;
    rows = plane_rows * win.stride_h;
    const int64_t columns = (s.Q - 1) * win.stride_w + (s.S - 1) * win.dilation_w + 1;  // padded ones read
    width = (columns + win.stride_w - 1) / win.stride_w;
    size = s.C_per_group() * rows * win.stride_w * width + kGemmMaxStripWidth;
  }
  // Whether this copy stays within phase_copy_fits (counted as above, in double): every path that makes one
  // asks first (conv_rows.cpp, conv2d.cpp).
  static bool fits(const Conv2dShape& s) {
    const Window2d& win = s.win;
    const double read = double(s.P - 1) * double(win.stride_h) + double(s.R - 1) * double(win.dilation_h) + 1.0;
    const double columns = double(s.Q - 1) * double(win.stride_w) + double(s.S - 1) * double(win.dilation_w) + 1.0;
    const double rows = std::ceil(read / double(win.stride_h)) * double(win.stride_h);
    return phase_copy_fits(s, rows * double(win.stride_w) * std::ceil(columns / double(win.stride_w)));
  }
  int64_t output_row_offset(int64_t p) const { return p * width; }
  // Where padded row h of channel c, phase f begins.
  int64_t row_offset(const Conv2dShape& s, int64_t c, int64_t h, int64_t f) const {
    const int64_t sh = s.win.stride_h;
    return (((c * sh + h % sh) * s.win.stride_w + f) * plane_rows + h / sh) * width;
  }
};

// offsets[crs] of col row (c, r, kw) from the start of output row 0 in the copy.
inline std::vector<int64_t> tap_offsets(const Conv2dShape& s, const PhaseSplitCopy& copy) {
  const Window2d& win = s.win;
  const int64_t sw = win.stride_w;
  std::vector<int64_t> offsets(static_cast<size_t>(s.C_per_group() * s.R * s.S));
  size_t i = 0;
  for (int64_t c = 0; c < s.C_per_group(); ++c)
    for (int64_t r = 0; r < s.R; ++r)
      for (int64_t kw = 0; kw < s.S; ++kw) {
        const int64_t shift = kw * win.dilation_w;
        offsets[i++] = copy.row_offset(s, c, r * win.dilation_h, shift % sw) + shift / sw;
      }
  return offsets;
}

// e[m] = in[2m], o[m] = in[2m + 1] for m < pairs; restrict, so that the loop needs no overlap checks per row.
template <typename T>
inline void split_pairs(const T* __restrict in, int64_t pairs, T* __restrict e, T* __restrict o) {
  for (int64_t m = 0; m < pairs; ++m) {
    e[m] = in[2 * m];
    o[m] = in[2 * m + 1];
  }
}

// Padded rows [row0, row1) of every channel of x_g (channels of H*W values) into the copy, all their
// phases; cells in the padding are zero, and so is the slack after the last plane when the last row is
// filled. Row index c * copy.rows + h.
// Each phase's columns inside x are the same on every row: worked out once (per row, their divisions and
// the library calls of the fills were a third of CIFAR's stride-2 3x3 forward, 16-column rows). At stride 1
// a row is one run, copied by vectors: 1x7 and 7x1 layers' forward (8 x 64 x 32 x 32) 1.285 -> 1.235 and
// 1.299 -> 1.256 ms, switched call by call in one process (resnet_3x3_512's backward-weight at batch 1 level).
template <typename T>
inline void fill_rows(const Conv2dShape& s, const PhaseSplitCopy& copy, const T* x_g, int64_t row0, int64_t row1,
                      T* out) {
  const Window2d& win = s.win;
  const int64_t sw = win.stride_w, width = copy.width;
  if (row1 == s.C_per_group() * copy.rows) std::fill(out + copy.size - kGemmMaxStripWidth, out + copy.size, T(0));
  // Phase f: o[i] = x column i*sw + f - pad_left, for i in inside[f]; on the stack for the usual strides,
  // as this runs for every image (and part of one) of a call.
  Range on_stack[8];
  std::vector<Range> on_heap(static_cast<size_t>(sw > 8 ? sw : 0));
  Range* const inside = sw > 8 ? on_heap.data() : on_stack;
  for (int64_t f = 0; f < sw; ++f) inside[f] = valid_outputs(f - win.pad_left, sw, s.W, width);
  const int64_t phase_step = copy.plane_rows * width;  // from phase (a, f) to (a, f + 1)
  // Stride 2: x's column j is padded column j + pad_left, phase (j + pad_left) % 2, at (j + pad_left) / 2;
  // one pass down the row puts its even columns in one phase from `even_at` on and its odd ones in the
  // other from `odd_at`, `evens` and `odds` of them (those inside the phase's width), in pairs (the two
  // loops of the general case, each a run of bounds and fills, took a quarter of CIFAR's stride-2 layers).
  const int64_t pl = win.pad_left;
  const int64_t even_phase = pl % 2, even_at = pl / 2, odd_at = (pl + 1) / 2;
  const int64_t evens = std::clamp<int64_t>(width - even_at, 0, (s.W + 1) / 2);
  const int64_t odds = std::clamp<int64_t>(width - odd_at, 0, s.W / 2), pairs = std::min(evens, odds);
  int64_t c = row0 / copy.rows, h = row0 % copy.rows - win.pad_top;
  // Where padded row h + pad_top begins (its phase f = 0), moved along row by row without divisions: the
  // next row is in the next row phase, or back in phase 0 one row further down.
  T* first = out + copy.row_offset(s, c, h + win.pad_top, 0);
  int64_t row_phase = (h + win.pad_top) % win.stride_h;
  for (int64_t row = row0; row < row1; ++row) {
    if (h < 0 || h >= s.H) {
      for (int64_t f = 0; f < sw; ++f) fill_short(first + f * phase_step, width, T(0));
    } else {
      const T* in = x_g + (c * s.H + h) * s.W;
      if (sw == 2) {
        T* even = first + even_phase * phase_step;
        T* odd = first + (1 - even_phase) * phase_step;
        fill_short(even, std::min(even_at, width), T(0));
        fill_short(odd, std::min(odd_at, width), T(0));
        split_pairs(in, pairs, even + even_at, odd + odd_at);
        if (evens > pairs) even[even_at + pairs] = in[2 * pairs];  // an odd width's last column
        if (odds > pairs) odd[odd_at + pairs] = in[2 * pairs + 1];
        if (even_at + evens < width) fill_short(even + even_at + evens, width - even_at - evens, T(0));
        if (odd_at + odds < width) fill_short(odd + odd_at + odds, width - odd_at - odds, T(0));
      } else {
        for (int64_t f = 0; f < sw; ++f) {
          T* o = first + f * phase_step;
          const Range r = inside[f];
          const T* from = in + f - win.pad_left;
          fill_short(o, r.begin, T(0));
          if (sw == 1)  // one run of x's row: copied by vectors (the strided loop stays scalar)
            copy_short(from + r.begin, r.end - r.begin, o + r.begin);
          else
            for (int64_t i = r.begin; i < r.end; ++i) o[i] = from[i * sw];
          fill_short(o + r.end, width - r.end, T(0));
        }
      }
    }
    if (++h == copy.rows - win.pad_top) {
      h = -win.pad_top, ++c, row_phase = 0;
      first = out + copy.row_offset(s, c, 0, 0);
    } else if (++row_phase == win.stride_h) {
      row_phase = 0;
      first += width - (win.stride_h - 1) * sw * phase_step;
    } else {
      first += sw * phase_step;
    }
  }
}

}  // namespace pykernels::cpu
