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

// At most this many weights per group (K/g * C/g * R * S) and the convolution sums them directly
// (LeNet's 6 x 25, depthwise 3x3's 9): a GEMM that small spends its time packing.
constexpr int64_t kDirectWeightLimit = 256;
inline bool has_few_weights(const Conv2dShape& s) {
  return s.K_per_group() * s.C_per_group() * s.R * s.S <= kDirectWeightLimit;
}

}  // namespace pykernels::cpu
