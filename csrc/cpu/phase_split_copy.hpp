// A padded copy of x split into its stride phases, in which every im2col row of one output row is a
// contiguous run (conv_rows.cpp explains the layout): the forward's GEMM reads it in place, and
// backward-weight transposes its runs straight into packed strips (im2col_impl.inc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/shapes.hpp"
#include "cpu/conv_ranges.hpp"
#include "cpu/gemm.hpp"
#include "cpu/short_copies.hpp"

namespace pykernels::cpu {

// The copy of one image's group: channel c, padded row h, phase f at ((c * rows + h) * sw + f) * width,
// padded rows [0, rows) being the ones the output reads, and kGemmMaxStripWidth readable values after
// the last (gemm_packed_rows reads whole strips).
struct PhaseSplitCopy {
  int64_t rows, width, size;

  explicit PhaseSplitCopy(const Conv2dShape& s) {
    const Window2d& win = s.win;
    rows = (s.P - 1) * win.stride_h + (s.R - 1) * win.dilation_h + 1;
    const int64_t columns = (s.Q - 1) * win.stride_w + (s.S - 1) * win.dilation_w + 1;  // padded ones read
    width = (columns + win.stride_w - 1) / win.stride_w;
    size = s.C_per_group() * rows * win.stride_w * width + kGemmMaxStripWidth;
  }
  int64_t output_row_offset(const Conv2dShape& s, int64_t p) const {
    return p * s.win.stride_h * s.win.stride_w * width;
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
        offsets[i++] = ((c * copy.rows + r * win.dilation_h) * sw + shift % sw) * copy.width + shift / sw;
      }
  return offsets;
}

// Padded rows [row0, row1) of every channel of x_g (channels of H*W values) into the copy; cells in the
// padding are zero, and so is the slack after the last row when it is filled. Row index c * copy.rows + h.
// Each phase's columns inside x are the same on every row: worked out once (per row, their divisions and
// the library calls of the fills were a third of CIFAR's stride-2 3x3 forward, 16-column rows).
template <typename T>
inline void fill_rows(const Conv2dShape& s, const PhaseSplitCopy& copy, const T* x_g, int64_t row0, int64_t row1, T* out) {
  const Window2d& win = s.win;
  const int64_t sw = win.stride_w, width = copy.width;
  if (row1 == s.C_per_group() * copy.rows) std::fill(out + copy.size - kGemmMaxStripWidth, out + copy.size, T(0));
  std::vector<Range> inside(static_cast<size_t>(sw));  // phase f: o[i] = x column i*sw + f - pad_left
  for (int64_t f = 0; f < sw; ++f) inside[static_cast<size_t>(f)] = valid_outputs(f - win.pad_left, sw, s.W, width);
  int64_t c = row0 / copy.rows, h = row0 % copy.rows - win.pad_top;
  for (int64_t row = row0; row < row1; ++row) {
    T* o = out + row * sw * width;
    if (h < 0 || h >= s.H) {
      fill_short(o, sw * width, T(0));
    } else {
      const T* in = x_g + (c * s.H + h) * s.W;
      for (int64_t f = 0; f < sw; ++f, o += width) {
        const Range r = inside[static_cast<size_t>(f)];
        const T* from = in + f - win.pad_left;
        fill_short(o, r.begin, T(0));
        if (sw == 2)  // the stride as a constant, so that the loop becomes vector loads and shuffles
          for (int64_t i = r.begin; i < r.end; ++i) o[i] = from[2 * i];
        else
          for (int64_t i = r.begin; i < r.end; ++i) o[i] = from[i * sw];
        fill_short(o + r.end, width - r.end, T(0));
      }
    }
    if (++h == copy.rows - win.pad_top) h = -win.pad_top, ++c;
  }
}

}  // namespace pykernels::cpu
