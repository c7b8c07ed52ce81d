// Kernels of 4 to 6 taps a side (conv_5x5_64), stride 1, undilated, one group, run as a 3x3 convolution on
// the Winograd path. The kernel, zero-padded to 6x6, is four 3x3 pieces at offsets (a, b) in {0, 3}^2, and
// piece (a, b) is a 3x3 convolution of x shifted by (a, b). So the layer is one 3x3 convolution over 4C
// input channels: channel (piece, c) is x's channel c, padded as the layer pads it, from row a and column b
// on, (P + 2) x (Q + 2) of it, read without padding ('valid'); its filters are the pieces. F(4x4, 3x3)
// then spends 4 x 36 products per 4x4 block of output and channel pair, 9 per output against 25 directly
// for 5x5 (16 for 4x4, 36 for 6x6). The price: the shifted copies of x (4x its size, written and read
// once) and 4 C instead of C channels to transform.
// All three passes: forward; backward-input where it runs as the transposed convolution through
// conv2d_forward (conv2d.cpp, 'same'-like padding); backward-weight as the 3x3 layer's, its pieces'
// gradients put back in place (those of the padding taps dropped).
// Taken where winograd.cpp's costs of the 3x3 layer, times 4, plus the copy, undercut direct convolution.
#include <algorithm>
#include <cstring>
#include <optional>

#include "cpu/conv_ranges.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

constexpr int64_t kPieces = 4;  // 3x3 pieces of the 6x6 kernel: (0, 0), (0, 3), (3, 0), (3, 3)
constexpr int64_t kPieceRow[kPieces] = {0, 0, 3, 3}, kPieceColumn[kPieces] = {0, 3, 0, 3};
// Forward's shifted copies go a chunk of images at a time, within about 8 MiB (conv_5x5_64 at batch 8:
// 7.4 MB in one; 64 MiB chunks, or 1-4 MiB, ran as fast). Backward-weight sums over the whole batch, and is
// not taken past 32 MiB of copies. (Both stay allocated between calls, as every path's scratch.)
constexpr double kMaxChunkBytes = double(int64_t(8) << 20), kMaxCopyBytes = double(int64_t(32) << 20);
// The copy's cost per value of it, in flops of the GEMM (a write and a read, no arithmetic).
constexpr double kCopyCost = 4.0;

bool is_split_shape(const Conv2dShape& s) {
  const Window2d& w = s.win;
  return s.R >= 4 && s.R <= 6 && s.S >= 4 && s.S <= 6 && w.stride_h == 1 && w.stride_w == 1 &&
         w.dilation_h == 1 && w.dilation_w == 1 && s.groups == 1 && s.C >= 16 && s.K >= 16 && !sums_directly(s);
}

// The 3x3 layer of 4C channels on `images` images (the copies' shape), or nothing where the layer is not split.
std::optional<Conv2dShape> pieces_shape(const Conv2dShape& s, int64_t images) {
  if (!is_split_shape(s)) return std::nullopt;
  Conv2dShape t;
  t.N = images, t.C = kPieces * s.C, t.H = s.P + 2, t.W = s.Q + 2, t.K = s.K, t.R = 3, t.S = 3, t.groups = 1;
  t.win.stride_h = t.win.stride_w = 1, t.win.dilation_h = t.win.dilation_w = 1;
  t.win.pad_top = t.win.pad_bottom = t.win.pad_left = t.win.pad_right = 0;
  t.validate();
  return t;
}

double copy_bytes_per_image(const Conv2dShape& s, int64_t element_bytes) {
  return double(kPieces * s.C) * double((s.P + 2) * (s.Q + 2)) * double(element_bytes);
}

// Costs per channel pair of the layer, in flops of the GEMM: directly 2 RS per output; split, 4 channel
// pairs of the 3x3 layer and each copied value's share.
double direct_cost(const Conv2dShape& s) { return 2.0 * double(s.R * s.S) * double(s.N) * double(s.P * s.Q); }
double copy_cost(const Conv2dShape& s) {
  return kCopyCost * double(kPieces) * double(s.N) * double((s.P + 2) * (s.Q + 2)) / double(s.K);
}

// Images per chunk of forward's copies.
int64_t chunk_images(const Conv2dShape& s, int64_t element_bytes) {
  return std::clamp<int64_t>(int64_t(kMaxChunkBytes / copy_bytes_per_image(s, element_bytes)), 1,
                             std::max<int64_t>(s.N, 1));
}

// Channel (piece, c) of images [n0, n0 + t.N) into copies (t's x): x padded as s pads it, from row a and
// column b on, zero outside x.
template <typename T>
void copy_pieces(const Conv2dShape& s, const Conv2dShape& t, const T* x, int64_t n0, T* copies) {
  const int64_t planes = t.N * t.C, plane = t.H * t.W;
#pragma omp parallel for schedule(static) if (planes > 1 && double(planes) * double(plane) >= double(kMinParallelWork))
  for (int64_t i = 0; i < planes; ++i) {
    const int64_t n = i / t.C, piece = i % t.C / s.C, c = i % s.C;
    const int64_t h0 = kPieceRow[piece] - s.win.pad_top, w0 = kPieceColumn[piece] - s.win.pad_left;
    const T* from = x + ((n0 + n) * s.C + c) * s.H * s.W;
    T* to = copies + i * plane;
    // columns j of a row read x's column w0 + j: those in [0, W) are [first, last)
    const int64_t first = std::clamp<int64_t>(-w0, 0, t.W), last = std::clamp<int64_t>(s.W - w0, first, t.W);
    for (int64_t row = 0; row < t.H; ++row) {
      T* out = to + row * t.W;
      const int64_t h = h0 + row;
      if (h < 0 || h >= s.H) {
        std::fill(out, out + t.W, T(0));
        continue;
      }
      std::fill(out, out + first, T(0));
      std::memcpy(out + first, from + h * s.W + w0 + first, static_cast<size_t>(last - first) * sizeof(T));
      std::fill(out + last, out + t.W, T(0));
    }
  }
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

bool conv2d_split_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const std::optional<Conv2dShape> t = pieces_shape(s, chunk_images(s, element_bytes));
  if (!t || !conv2d_winograd_chosen(*t, element_bytes)) return false;
  const double chunks = double((s.N + t->N - 1) / t->N);  // each pays its filters' transform
  return chunks * kPieces * winograd_cost(*t, element_bytes) + copy_cost(s) < direct_cost(s);
}

bool conv2d_backward_weight_split_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const std::optional<Conv2dShape> t = pieces_shape(s, s.N);
  if (!t || !conv2d_backward_weight_winograd_chosen(*t)) return false;
  if (double(s.N) * copy_bytes_per_image(s, element_bytes) > kMaxCopyBytes) return false;
  return kPieces * winograd_backward_weight_cost(*t) + copy_cost(s) < direct_cost(s);
}

template <typename T>
bool conv2d_forward_split_winograd(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  if (!conv2d_split_winograd_chosen(s, sizeof(T))) return false;
  const int64_t images = chunk_images(s, sizeof(T));
  const Conv2dShape t = *pieces_shape(s, images);
  T* filters = reusable_buffer<T, 0>(t.w_numel());
  piece_filters(s, w, filters);
  T* copies = reusable_buffer<T, 1>(t.x_numel());
  for (int64_t n0 = 0; n0 < s.N; n0 += images) {
    const std::optional<Conv2dShape> chunk = pieces_shape(s, std::min(images, s.N - n0));
    copy_pieces(s, *chunk, x, n0, copies);
    conv2d_winograd<T>(*chunk, copies, WinogradFilters<T>{filters, t.C * 9, 9, false}, bias, y + n0 * s.K * s.P * s.Q);
  }
  return true;
}

template <typename T>
bool conv2d_backward_weight_split_winograd(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  if (!conv2d_backward_weight_split_winograd_chosen(s, sizeof(T))) return false;
  const Conv2dShape t = *pieces_shape(s, s.N);
  T* copies = reusable_buffer<T, 1>(t.x_numel());
  copy_pieces(s, t, x, 0, copies);
  T* pieces = reusable_buffer<T, 2>(t.w_numel());
  conv2d_backward_weight_winograd<T>(t, grad_y, copies, pieces);
  // Each tap of w lies in exactly one piece: its gradient is that piece's, in place.
  const int64_t RS = s.R * s.S;
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t q = 0; q < s.S; ++q) {
          const int64_t piece = (r >= 3 ? 2 : 0) + (q >= 3 ? 1 : 0);
          grad_w[(k * s.C + c) * RS + r * s.S + q] =
              pieces[((k * kPieces + piece) * s.C + c) * 9 + (r % 3) * 3 + q % 3];
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
