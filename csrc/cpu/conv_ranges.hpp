// Index ranges shared by the convolution kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/shapes.hpp"
#include "cpu/gemm.hpp"

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

// 1x1, stride 1, unpadded: im2col's col is x itself.
inline bool is_pointwise(const Conv2dShape& s) {
  const Window2d& w = s.win;
  return s.R == 1 && s.S == 1 && w.stride_h == 1 && w.stride_w == 1 && w.pad_top == 0 && w.pad_bottom == 0 &&
         w.pad_left == 0 && w.pad_right == 0;
}

// At most this many weights per group (K/g * C/g * R * S) and the convolution sums them directly
// (LeNet's 6 x 25, depthwise 3x3's 9): a GEMM that small spends its time packing.
constexpr int64_t kDirectWeightLimit = 256;

inline bool has_few_weights(const Conv2dShape& s) {
  return s.K_per_group() * s.C_per_group() * s.R * s.S <= kDirectWeightLimit;
}

// Whether a copy of one image's channel split into its stride phases, `values` of it (counted in double:
// such products overflow int64 at strides near 2^31), stays within a few times x's and y's planes, plus 64 Ki
// values. Strides far past the window leave most phases without a tap: (2, 1, 5, 5) with a 3x3 filter at
// stride 1000 made 16 M values for 25 in the direct sums' planes, its backward-input taking 0.45 s and 1 GB
// (bad_alloc from 10^4), and the wide rows' copy (PhaseSplitCopy) 10^8 at stride 10^4. The GEMM on im2col's
// columns takes those layers: its columns grow with the outputs only.
inline bool phase_copy_fits(const Conv2dShape& s, double values) {
  return values <= 4.0 * (double(s.H) * double(s.W) + double(s.P) * double(s.Q)) + 65536.0;
}

// The direct sums' phase-split planes (direct_conv_impl.inc's PhasePlanes: stride_h x stride_w phases of
// the padded image, each rounded up to whole vectors) within phase_copy_fits.
inline bool phase_planes_fit(const Conv2dShape& s) {
  const Window2d& w = s.win;
  const double rows = std::ceil(double(s.H + w.pad_top + w.pad_bottom) / double(w.stride_h));
  const double columns = std::ceil(double(s.W + w.pad_left + w.pad_right) / double(w.stride_w));
  return phase_copy_fits(s, double(w.stride_h) * double(w.stride_w) * (rows * columns + 64.0));
}

// Forward and backward-input sum directly (direct_conv_impl.inc) the layers with few weights, and grouped
// ones with at most 32 output channels per group (ResNeXt's 8 to 32, RegNet's): their GEMM per group packs
// im2col columns that meet only K/g rows of weights, where the direct sums read x where it lies. Float32,
// batch 8, against that GEMM: 256 channels in groups of 8 on 28x28, forward 3.3 -> 0.70 ms, backward-input
// 1.8 -> 0.74; groups of 32 on 7x7 1.34 -> 1.22 and 1.69 -> 1.45; 64 channels in 2 groups 1.11 -> 0.63
// and 0.83 -> 0.62. Not pointwise layers, whose GEMM reads x without im2col.
inline bool sums_directly(const Conv2dShape& s) {
  return phase_planes_fit(s) &&
         (has_few_weights(s) || (s.groups > 1 && s.K_per_group() <= 32 && !is_pointwise(s)));
}

// Backward-weight's direct sums take the same layers but those with more than 16 output channels per
// group on fewer than 100 output positions. Against the GEMM (float32, batch 8): 256 channels in groups
// of 8 on 28x28 1.55 -> 0.92 ms, 224 in groups of 16 2.8 -> 1.5, 64 in 2 groups of 32 1.12 -> 0.84,
// 1024 in groups of 32 on 14x14 4.8 -> 4.2, 512 in groups of 16 on 7x7 0.76 -> 0.48; but 1024 in groups of
// 32 on 7x7 1.22 -> 1.73 (their planes of 9x9, 63 wide-row positions for 49).
// Also the stride-1 layers with at most 27 taps per output channel (C/groups x R x S: the first 3x3
// layers of CIFAR, MNIST and VGG, MNIST's 5x5 ones), whose GEMM fills at most 27 of a strip's 48 columns
// (not pointwise layers, whose GEMM reads x where it lies); dense ones by parts of the batch
// (direct_conv_impl.inc). With AVX-512's 4 x 6 register blocks, up to 128 output channels per group; batch
// 64 unless said, loop / caches flushed first: 1 -> 32 channels on 28x28 0.25 / 0.53 -> 0.16 / 0.34 ms,
// 3 -> 16 on 32x32 0.37 / 0.48 -> 0.20 / 0.36, 3 -> 64 0.94 / 1.23 -> 0.76 / 1.14, 1 -> 20 5x5 0.39 /
// 0.69 -> 0.16 / 0.34, 3 -> 96 1.66 -> 1.54, 3 -> 128 level, VGG's first layer (batch 8) 7.6 -> 6.0. The
// 16-register builds' 2 x 4 blocks load 6 values per 8 multiply-adds: there up to 600 taps x output
// channels (AVX2: 1 -> 64 0.85 -> 0.68, 3 -> 16 0.56 -> 0.50; 3 -> 32 5 % and 3 -> 64 19 % slower, so
// left to the GEMM).
// With AVX-512, from batch 2, also up to 144 taps where taps x output channels stay within 3200, against
// Winograd's backward-weight (batch 64, loop / cold): CIFAR ResNet-20's 16 -> 16 on 32x32 0.96 / 1.42 ->
// 0.86 / 1.11 ms (batch 8 0.164 -> 0.129, batch 2 0.087 -> 0.047), 8 -> 32 1.76 -> 0.88, 12 -> 24 1.64 ->
// 0.98, 16 -> 16 on 28x28 0.87 -> 0.69, on 64x64 (batch 16) 0.95 -> 0.81, 4 -> 32 5x5 on 28x28 1.43 -> 0.95,
// 8 -> 32 on 16x16 0.50 -> 0.34; 16 -> 16 on 16x16 0.31 -> 0.32. Not past 3200 (16 -> 32 on 16x16 0.48 ->
// 0.62, 16 -> 128 on 56x56 2.31 -> 2.50, 16 -> 64 level), nor at batch 1 (16 -> 16 0.031 -> 0.040: one part
// of the batch, one thread's sums).
// Strided, with AVX-512 only, at most 27 taps and stride 2, and 32 output channels a group or 32x32 outputs
// (the 3-channel first layers of MobileNets and others at stride 2), against the GEMM timed between
// torch's calls, batch 8: 3 -> 32 channels from 224x224 1.23 -> 0.98 ms, 3 -> 16 0.67 -> 0.48, 3 -> 128
// 3.91 -> 3.66, batch 2 0.224 -> 0.211, CIFAR-sized 3 -> 16 from 32x32 at batch 64 0.131 -> 0.108, 1 -> 32
// from 28x28 0.107 -> 0.081; but 3 -> 64 from 32x32 0.266 -> 0.299, 16 -> 16 (144 taps) 0.054 -> 0.083, and
// with AVX2's blocks 3 -> 16 from 32x32 0.157 -> 0.189.
inline bool sums_weight_gradient_directly(const Conv2dShape& s) {
  const int64_t taps = s.C_per_group() * s.R * s.S, Kg = s.K_per_group();
  const bool avx512 = active_build() == Isa::avx512;
  const bool blocks_fit = avx512 ? Kg <= 128 : taps * Kg <= 600;
  const bool more_taps = avx512 && s.N >= 2 && taps <= 144 && taps * Kg <= 3200;
  const bool unit_stride = s.win.stride_h == 1 && s.win.stride_w == 1;
  const bool strided = avx512 && taps <= 27 && s.win.stride_h <= 2 && s.win.stride_w <= 2 &&
                       (Kg <= 32 || s.P * s.Q >= 32 * 32);
  const bool few_taps = blocks_fit && (taps <= 27 || more_taps) && (unit_stride || strided) && !is_pointwise(s);
  return phase_planes_fit(s) &&
         (has_few_weights(s) || few_taps || (sums_directly(s) && (s.K_per_group() <= 16 || s.P * s.Q >= 100)));
}

}  // namespace pykernels::cpu
