// Index ranges shared by the convolution kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/shapes.hpp"

namespace pykernels::cpu {

// Output positions o in [0, count) whose input coordinate o*stride + offset lies in [0, limit).
struct Range {
  int64_t begin, end;
};
inline Range valid_outputs(int64_t offset, int64_t stride, int64_t limit, int64_t count) {
  // o*stride + offset >= 0  <=>  o >= ceil(-offset / stride)
  int64_t begin = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  // o*stride + offset <= limit - 1  <=>  o <= floor((limit - 1 - offset) / stride)
  int64_t end = limit - 1 - offset < 0 ? 0 : (limit - 1 - offset) / stride + 1;
  begin = std::min(begin, count);
  end = std::clamp(end, begin, count);
  return {begin, end};
}

// Visits rows [row0, row1) of col (one per channel c and kernel tap r, kw) of one image and group:
// `visit` gets (row, c, the range of output rows p and of output columns q whose input cell is inside
// x, and the input offsets h = p*stride_h + h_off, w = q*stride_w + w_off).
template <typename Visit>
void for_each_col_segment(const Conv2dShape& s, int64_t row0, int64_t row1, Visit&& visit) {
  const Window2d& win = s.win;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t c = row / (s.R * s.S), r = (row / s.S) % s.R, kw = row % s.S;
    const int64_t h_offset = r * win.dilation_h - win.pad_top;
    const int64_t w_offset = kw * win.dilation_w - win.pad_left;
    const Range ps = valid_outputs(h_offset, win.stride_h, s.H, s.P);
    const Range qs = valid_outputs(w_offset, win.stride_w, s.W, s.Q);
    visit(row, c, ps, qs, h_offset, w_offset);
  }
}

// At most this many weights per group (K/g * C/g * R * S) and the convolution sums them directly
// (LeNet's 6 x 25, depthwise 3x3's 9): a GEMM that small spends its time packing.
constexpr int64_t kDirectWeightLimit = 256;
inline bool has_few_weights(const Conv2dShape& s) {
  return s.K_per_group() * s.C_per_group() * s.R * s.S <= kDirectWeightLimit;
}

}  // namespace pykernels::cpu
