// Kernels of 4 to 6 taps a side (conv_5x5_64), stride 1, undilated, one group, run as a 3x3 convolution on
// Winograd F(4x4, 3x3). The kernel, zero-padded to 6x6, is four 3x3 pieces at offsets (a, b) in {0, 3}^2,
// and piece (a, b) is a 3x3 convolution of x shifted by (a, b). So the layer is one 3x3 convolution over 4C
// input channels: channel (piece, c) is x's channel c, padded as the layer pads it, from row a and column b
// on, (P + 2) x (Q + 2) of it, read without padding; its filters are the pieces. F(4x4) then spends 4 x 36
// products per 4x4 block of output and channel pair: 9 per output against 25 directly for 5x5 (16 for 4x4,
// 36 for 6x6), for 4C channels to transform instead of C. Nothing is copied: the input transform reads each
// piece's channels from x with the piece's shift (WinogradInput, kernels.hpp), which needs C a multiple of
// its block of channels.
// All three passes: forward; backward-input where it runs as the transposed convolution through
// conv2d_forward (conv2d.cpp, 'same'-like padding); backward-weight as the 3x3 layer's, its pieces'
// gradients put back in place (those of the padding taps dropped).
// Taken where winograd.cpp's costs of the 3x3 layer on F(4x4), times 4, undercut direct convolution.
#include <algorithm>
#include <limits>
#include <optional>

#include "cpu/conv_ranges.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

constexpr int64_t kPieces = 4;  // 3x3 pieces of the 6x6 kernel: (0, 0), (0, 3), (3, 0), (3, 3)
constexpr int64_t kPieceRow[kPieces] = {0, 0, 3, 3}, kPieceColumn[kPieces] = {0, 3, 0, 3};

bool is_split_shape(const Conv2dShape& s) {
  const Window2d& w = s.win;
  return s.R >= 4 && s.R <= 6 && s.S >= 4 && s.S <= 6 && w.stride_h == 1 && w.stride_w == 1 &&
         w.dilation_h == 1 && w.dilation_w == 1 && s.groups == 1 && s.C >= 16 &&
         s.C % kWinogradInputChannels == 0 && s.K >= 16 && !sums_directly(s);
}

// The 3x3 layer of 4C channels, or nothing where the layer is not split.
std::optional<Conv2dShape> pieces_shape(const Conv2dShape& s) {
  if (!is_split_shape(s)) return std::nullopt;
  Conv2dShape t;
  t.N = s.N, t.C = kPieces * s.C, t.H = s.P + 2, t.W = s.Q + 2, t.K = s.K, t.R = 3, t.S = 3, t.groups = 1;
  t.win.stride_h = t.win.stride_w = 1, t.win.dilation_h = t.win.dilation_w = 1;
  t.win.pad_top = t.win.pad_bottom = t.win.pad_left = t.win.pad_right = 0;
  t.validate();
  return t;
}

// The 3x3 layer's input: channel (piece, c) is x's c, shifted by the piece's offset less the padding.
template <typename T>
WinogradInput<T> pieces_input(const Conv2dShape& s, const T* x) {
  WinogradInput<T> in{x, s.C, s.H, s.W, {}, {}};
  for (int64_t p = 0; p < kPieces; ++p)
    in.pad_top[p] = s.win.pad_top - kPieceRow[p], in.pad_left[p] = s.win.pad_left - kPieceColumn[p];
  return in;
}

// The pieces' filters (t's weights, K x 4C x 3 x 3): tap (r, q) of piece (a, b) is w's (a + r, b + q), zero
// past R or S.
template <typename T>
void piece_filters(const Conv2dShape& s, const T* w, T* pieces) {
  const int64_t RS = s.R * s.S;
#pragma omp parallel for schedule(static) if (s.K > 1 && double(s.K) * double(s.C) * 36.0 >= double(kMinParallelWork))
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t piece = 0; piece < kPieces; ++piece)
      for (int64_t c = 0; c < s.C; ++c) {
        const T* from = w + (k * s.C + c) * RS;
        T* to = pieces + ((k * kPieces + piece) * s.C + c) * 9;
        for (int64_t r = 0; r < 3; ++r)
          for (int64_t q = 0; q < 3; ++q) {
            const int64_t rr = kPieceRow[piece] + r, qq = kPieceColumn[piece] + q;
            to[r * 3 + q] = rr < s.R && qq < s.S ? from[rr * s.S + qq] : T(0);
          }
      }
}

}  // namespace

double split_winograd_share(const Conv2dShape& s, int64_t element_bytes) {
  const std::optional<Conv2dShape> t = pieces_shape(s);
  // F(4x4) only: F(2x2) reads x as it lies, without the pieces' shifts
  if (!t || !conv2d_winograd_chosen(*t, element_bytes) || winograd_f2_applies(*t, element_bytes))
    return std::numeric_limits<double>::infinity();
  // Not with over twice as many input channels as output channels on 64 tiles or more: F(4x4)'s GEMMs then
  // have few rows against 4C channels to transform per tile. Against the GEMM path, float32, ms: 192 -> 32
  // channels on 28x28 at batch 8 6.13 -> 4.84, on 14x14 1.90 -> 1.46 (float64 4.33 -> 2.83); backward-input
  // (the transposed forward) of 48 -> 128 on 14x14 1.71 -> 1.31, of 32 -> 128 on 28x28 3.90 -> 3.34, on 56x56
  // at batch 1 1.84 -> 1.54. With fewer tiles the split path stays faster (192 -> 32 on 28x28 at batch 1:
  // 0.72 against 0.86; backward-input of 32 -> 128 on 7x7 at batch 8: 0.32 against 0.35).
  if (s.C > 2 * s.K && winograd_f4_tiles(*t) >= 64) return std::numeric_limits<double>::infinity();
  return kPieces * winograd_cost(*t, element_bytes) / conv2d_direct_cost(s);  // a pair: 4 of t's
}

// The pieces' backward-weight keeps its sums in memory (conv2d_backward_weight_winograd keeps them in
// registers only for x as it lies: for the pieces, 5x5 on 8x8 at batch 1, 1.4x the time with 128 channels,
// 1.9x with 256, though 0.75x with 64), and is costed so.
double backward_weight_split_winograd_share(const Conv2dShape& s) {
  const std::optional<Conv2dShape> t = pieces_shape(s);
  if (!t || !conv2d_backward_weight_winograd_chosen(*t, false)) return std::numeric_limits<double>::infinity();
  return kPieces * winograd_backward_weight_cost(*t, false) / conv2d_direct_cost(s);
}

bool conv2d_split_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return split_winograd_share(s, element_bytes) < 1.0;
}

bool conv2d_backward_weight_split_winograd_chosen(const Conv2dShape& s, int64_t /*element_bytes*/) {
  return backward_weight_split_winograd_share(s) < 1.0;
}

template <typename T>
bool conv2d_forward_split_winograd(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  if (!conv2d_split_winograd_chosen(s, sizeof(T))) return false;
  const Conv2dShape t = *pieces_shape(s);
  T* filters = reusable_buffer<T, 0>(t.w_numel());
  piece_filters(s, w, filters);
  return conv2d_winograd_f4_of<T>(t, pieces_input(s, x), WinogradFilters<T>{filters, t.C * 9, 9, false}, bias, y);
}

template <typename T>
bool conv2d_backward_weight_split_winograd(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  if (!conv2d_backward_weight_split_winograd_chosen(s, sizeof(T))) return false;
  const Conv2dShape t = *pieces_shape(s);
  T* pieces = reusable_buffer<T, 1>(t.w_numel());
  conv2d_backward_weight_winograd_of<T>(t, grad_y, pieces_input(s, x), pieces);
  // Each tap of w lies in exactly one piece: its gradient is that piece's, in place (piece_filters' inverse).
  // Both threads, piece by piece: one thread alone, with its index arithmetic per tap, took 40 % of 48 -> 128
  // channels on 7x7 at batch 8 while the other waited.
  const int64_t RS = s.R * s.S;
#pragma omp parallel for schedule(static) if (s.K > 1 && double(s.K) * double(s.C) * 36.0 >= double(kMinParallelWork))
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t piece = 0; piece < kPieces; ++piece) {
      const int64_t rows = std::min<int64_t>(3, s.R - kPieceRow[piece]);
      const int64_t cols = std::min<int64_t>(3, s.S - kPieceColumn[piece]);
      for (int64_t c = 0; c < s.C; ++c) {
        const T* from = pieces + ((k * kPieces + piece) * s.C + c) * 9;
        T* to = grad_w + (k * s.C + c) * RS + kPieceRow[piece] * s.S + kPieceColumn[piece];
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t q = 0; q < cols; ++q) to[r * s.S + q] = from[r * 3 + q];
      }
    }
  return true;
}

template bool conv2d_forward_split_winograd<float>(const Conv2dShape&, const float*, const float*, const float*,
                                                   float*);
template bool conv2d_forward_split_winograd<double>(const Conv2dShape&, const double*, const double*, const double*,
                                                    double*);
template bool conv2d_backward_weight_split_winograd<float>(const Conv2dShape&, const float*, const float*, float*);
template bool conv2d_backward_weight_split_winograd<double>(const Conv2dShape&, const double*, const double*,
                                                            double*);

}  // namespace pykernels::cpu
