// Forward convolution with the output channels across the vector lanes: for layers whose outputs are few
// per row, where the im2col-based plans (conv_rows.cpp's wide rows, packed columns) leave lanes empty or
// pay for packing, as CIFAR ResNets' 3x3 stride-2 layers onto 8x8 outputs.
//
// Each image is copied channels-last (position (h, w)'s C channels in a row, then a row of zeros); tap
// (r, s) of output position (p, q) then reads C contiguous values, at (h, w) = (p * stride_h - pad_top +
// r * dilation_h, q * stride_w - pad_left + s * dilation_w), or the zeros where that lies in the padding.
// So for a block of output positions, the sums (positions x K) are R * S GEMMs, one per tap, each reading
// its A rows in place through a table of offsets (gemm_rows_of_a: nothing packed) against that tap's
// weights, packed once as B (C x K):
//   M[j][k] += sum over c of image[offset_t(j) + c] * w[k][c][t],   t = 0 .. R*S-1 in order
// then M is transposed into y's (k, p, q) order with the bias. Every output is summed over the taps and
// then the channels in the same order whatever the blocks and the thread count: bit-for-bit reproducible.
// Its products are exactly im2col's, zeros of the padding included, so NaN and inf come out as the GEMM's.
//
// Backward-input of strided layers on small images is the same with the roles swapped: per tap, D (positions
// x C) = grad_y channels-last (positions x K, rows read in place) times the tap's weights (K x C), the
// input channels across the lanes; each row of D is then added into the channels-last row of grad_x at the
// position that tap of that output reads (col2im's adds, taps in order, a whole row of channels at a time
// instead of a value or two), and grad_x transposed back.
#include <algorithm>
#include <vector>

#include "cpu/conv_ranges.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/transpose.hpp"

namespace pykernels::cpu {

namespace {

constexpr int64_t kBlockSumBytes = 32 << 10;     // a block's sums M within L1
constexpr int64_t kTapWeightBytes = 256 << 10;   // a block of output channels' weights, all taps, within L2
constexpr int64_t kImageBytes = 256 << 10;       // an image's channels-last copy within L2 (see the rule)
constexpr int64_t kRowsPerBlockMultiple = 24;    // whole register tiles of 6 and 8 rows

// Each tap's weights as the B (depth x columns) of its GEMMs, in blocks of columns whose taps' B stay in
// L2 together (a 256 -> 256 layer's 9 taps take 2.4 MB): B[d][j] at w + d * d_stride + j * j_stride + t,
// over the input channels and output channels for the forward (d = c, j = k) and the other way round for
// backward-input. Block b's tap t at packed + starts[b] + t * layouts[b].size(); columns [b * width, ...).
struct TapWeights {
  int64_t width = 0;  // columns per block: whole strips
  std::vector<PackedBLayout> layouts;
  std::vector<int64_t> starts;
  int64_t size = 0;
};

template <typename T>
TapWeights tap_weights(int64_t taps, int64_t depth, int64_t columns, int64_t max_width) {
  TapWeights tw;
  const int64_t nr = packed_b_layout<T>(depth, columns).nr;
  const int64_t fits = std::max<int64_t>(1, kTapWeightBytes / (taps * depth * int64_t(sizeof(T))) / nr) * nr;
  tw.width = std::min({columns, fits, std::max(nr, max_width / nr * nr)});
  for (int64_t j0 = 0; j0 < columns; j0 += tw.width) {
    tw.layouts.push_back(packed_b_layout<T>(depth, std::min(tw.width, columns - j0)));
    tw.starts.push_back(tw.size);
    tw.size += taps * tw.layouts.back().size();
  }
  return tw;
}

// Every block's B in its layout's strips (depth blocks of kc rows, each as strips of nr columns, nr values
// per row; columns past the block's zero). Threads take whole taps.
template <typename T>
void pack_tap_weights(const T* w, int64_t taps, int64_t d_stride, int64_t j_stride, const TapWeights& tw,
                      bool parallel, T* packed) {
  for_each_index(taps, parallel, [&](int64_t t) {
    for (size_t b = 0; b < tw.layouts.size(); ++b) {
      const PackedBLayout& layout = tw.layouts[b];
      const int64_t padded = layout.padded_columns(), first = int64_t(b) * tw.width;
      for (int64_t pd = 0; pd < layout.depth; pd += layout.kc) {
        const int64_t kc = std::min(layout.kc, layout.depth - pd);
        T* block = packed + tw.starts[b] + t * layout.size() + pd * padded;
        for (int64_t j0 = 0; j0 < padded; j0 += layout.nr)
          for (int64_t d = pd; d < pd + kc; ++d) {
            T* row = block + j0 * kc + (d - pd) * layout.nr;
            const int64_t filled = std::min(layout.nr, layout.columns - j0);
            const T* from = w + d * d_stride + (first + j0) * j_stride + t;
            for (int64_t j = 0; j < filled; ++j) row[j] = from[j * j_stride];
            std::fill(row + filled, row + layout.nr, T(0));
          }
      }
    }
  });
}

// Output positions [pq0, pq0 + rows) of one image, from its channels-last copy `image` (rows of C values,
// position (h, w) at (h * W + w) * C) and a row of C zeros at `zeros`, into y_n (the image's K x PQ).
template <typename T>
void forward_block(const Conv2dShape& s, const T* image, const T* zeros, const TapWeights& tw, const T* packed,
                   const T* bias, int64_t pq0, int64_t rows, int64_t block_rows, T* y_n) {
  const int64_t C = s.C, K = s.K, PQ = s.P * s.Q, RS = s.R * s.S;
  T* M = reusable_buffer<T, 3>(block_rows * K);
  int64_t* offsets = reusable_buffer<int64_t, 4>(3 * block_rows + kGemmMaxTileRows);
  int64_t* corner_h = offsets + block_rows + kGemmMaxTileRows;  // row j's window corner, in the padding's frame
  int64_t* corner_w = corner_h + block_rows;
  const int64_t zero_offset = zeros - image;
  std::fill(offsets + rows, offsets + rows + kGemmMaxTileRows, zero_offset);  // the last tile's extra rows
  for (int64_t j = 0, p = pq0 / s.Q, q = pq0 % s.Q; j < rows; ++j) {
    corner_h[j] = p * s.win.stride_h - s.win.pad_top, corner_w[j] = q * s.win.stride_w - s.win.pad_left;
    if (++q == s.Q) q = 0, ++p;
  }
  for (size_t b = 0; b < tw.layouts.size(); ++b)
    for (int64_t t = 0; t < RS; ++t) {
      const int64_t dh = t / s.S * s.win.dilation_h, dw = t % s.S * s.win.dilation_w;
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t h = corner_h[j] + dh, v = corner_w[j] + dw;  // unsigned: one compare for both ends
        offsets[j] = uint64_t(h) < uint64_t(s.H) && uint64_t(v) < uint64_t(s.W) ? (h * s.W + v) * C : zero_offset;
      }
      const PackedBLayout& layout = tw.layouts[b];
      gemm_rows_of_a<T>(layout, rows, image, offsets, packed + tw.starts[b] + t * layout.size(),
                        M + int64_t(b) * tw.width, K, t > 0);
    }
  T* out = y_n + pq0;
  if (rows == PQ) {  // the whole image: one transpose, whose rows are y's
    transpose_into_strip(M, K, K, PQ, PQ, out);
    if (bias)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t pq = 0; pq < PQ; ++pq) out[k * PQ + pq] += bias[k];
    return;
  }
  constexpr int64_t kTile = 8;  // M's columns are y's rows: in 8 x 8 tiles
  for (int64_t k0 = 0; k0 < K; k0 += kTile)
    for (int64_t j0 = 0; j0 < rows; j0 += kTile) {
      const int64_t k1 = std::min(K, k0 + kTile), j1 = std::min(rows, j0 + kTile);
      for (int64_t k = k0; k < k1; ++k) {
        const T b = bias ? bias[k] : T(0);
        for (int64_t j = j0; j < j1; ++j) out[k * PQ + j] = M[j * K + k] + b;
      }
    }
}

// x's image n channels-last into `image`, then a row of zeros.
template <typename T>
void copy_channels_last(const Conv2dShape& s, const T* x, int64_t n, T* image) {
  const int64_t HW = s.H * s.W;
  transpose_into_strip(x + n * s.C * HW, HW, HW, s.C, s.C, image);
  std::fill(image + HW * s.C, image + (HW + 1) * s.C, T(0));
}

}  // namespace

// Float32 layers of one group, 2 images or more, not 1x1 (read in place or subsampled), with 16 input
// channels or more (each tap's GEMM reloads its sums once per C values) and images whose copy stays in L2;
// where the output channels fill whole strips of the GEMM that reads A in place and the im2col-based plans
// keep at most 80 % of the multiply-adds by their own estimate (conv2d_forward_packed_share). Against the
// plan taken before (loop, 2 threads, AVX-512; AVX2 alike): 32 -> 64 channels 3x3 stride 2 onto 8x8 at
// batch 64 0.52 -> 0.39 ms (torch 0.37-0.45), at batch 2 0.028 -> 0.023, 64 -> 128 onto 4x4 0.52 -> 0.40,
// 64 -> 64 5x5 stride 2 onto 8x8 at batch 32 1.23 -> 0.97, 128 channels 1x7 on 17x17 at batch 8 1.41 ->
// 1.29 (share 0.78). Level or slower where the share was 0.81-0.96 (a 2-dilated 3x3 on 56x56 at 0.81, 32
// -> 64 stride 2 onto 16x16 at 0.89, 7x1 on 17x17 at 0.86), at batch 1 (1x7: 0.23 -> 0.28 ms, the image
// split in 2), and in float64, whose strips of 24 the im2col plans fill better (at best level, 5x5 stride
// 2 9 % slower).
bool conv2d_forward_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes) {
  if (element_bytes != 4 || s.N < 2 || s.groups != 1 || s.R * s.S < 2 || sums_directly(s) || s.C < 16) return false;
  const int64_t nr = packed_b_layout<float>(s.C, s.K).nr;
  return s.K % nr == 0 && double(s.C) * double(s.H * s.W) * double(element_bytes) <= double(kImageBytes) &&
         conv2d_forward_packed_share(s, element_bytes) <= 0.8;
}

template <typename T>
void conv2d_forward_channels_last(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const int64_t C = s.C, K = s.K, HW = s.H * s.W, PQ = s.P * s.Q;
  const int threads = available_threads();
  const int64_t RS = s.R * s.S;
  const bool parallel = threads > 1 && double(s.N) * double(K * C * RS) * double(PQ) >= kMinParallelWork;
  const TapWeights tw = tap_weights<T>(RS, C, K, K);
  T* packed = reusable_buffer<T, 2>(tw.size);
  pack_tap_weights(w, RS, RS, C * RS, tw, parallel, packed);
  const int64_t sum_rows = std::max<int64_t>(kRowsPerBlockMultiple, kBlockSumBytes / (K * int64_t(sizeof(T))) /
                                                                       kRowsPerBlockMultiple * kRowsPerBlockMultiple);
  ParallelErrors errors;
  if (!parallel || s.N >= 4 * int64_t(threads)) {
    // A task per image (shares within a quarter of an image of each other), copied into the thread's own
    // buffer, where it stays in L2: 8 MB of CIFAR images copied whole first and read back took a third of
    // the time.
    const int64_t block_rows = std::min(sum_rows, PQ);
    for_each_index(s.N, parallel, [&](int64_t n) {
      errors.run([&] {
        T* image = reusable_buffer<T, 1>((HW + 1) * C);
        copy_channels_last(s, x, n, image);
        for (int64_t pq0 = 0; pq0 < PQ; pq0 += block_rows)
          forward_block(s, image, image + HW * C, tw, packed, bias, pq0, std::min(block_rows, PQ - pq0), block_rows,
                        y + n * K * PQ);
      });
    });
  } else {
    // Few images: all copied first, then the threads split them into blocks of positions, about 4 per thread
    // (3 images on 2 threads, a task each, took 2 images' time).
    T* copies = reusable_buffer<T, 0>(s.N * (HW + 1) * C);
    for_each_index(s.N, s.N > 1, [&](int64_t n) { copy_channels_last(s, x, n, copies + n * (HW + 1) * C); });
    const int64_t per_image = (4 * int64_t(threads) + s.N - 1) / s.N;  // blocks, of whole register tiles
    const int64_t block_rows = std::min(sum_rows, std::max<int64_t>(6, (PQ + per_image * 6 - 1) / (per_image * 6) * 6));
    const int64_t blocks = (PQ + block_rows - 1) / block_rows;
    for_each_index(s.N * blocks, true, [&](int64_t task) {
      errors.run([&] {
        const int64_t n = task / blocks, pq0 = task % blocks * block_rows;
        const T* image = copies + n * (HW + 1) * C;
        forward_block(s, image, image + HW * C, tw, packed, bias, pq0, std::min(block_rows, PQ - pq0), block_rows,
                      y + n * K * PQ);
      });
    });
  }
  errors.rethrow();
}

namespace {

// Input channels [c0, c0 + block.columns) of image n's grad_x: for each tap t in order, D = gy_n (PQ x K,
// channels-last in `gyt`) * B_t (K x those channels), a block of output positions at a time, each row j of
// D then added into grad_x's channels-last row of the input position tap t of output j reads (none where
// that lies in the padding); then transposed into grad_x's (c, h, w) order. A position sums its terms by
// tap, then output position: the order of col2im's adds, whatever the blocks.
template <typename T>
void backward_input_columns(const Conv2dShape& s, const T* gyt, const PackedBLayout& layout, const T* packed,
                            int64_t c0, int64_t block_rows, T* gx_n) {
  const int64_t K = s.K, HW = s.H * s.W, PQ = s.P * s.Q, RS = s.R * s.S, cols = layout.columns;
  T* D = reusable_buffer<T, 3>(block_rows * cols);
  T* gxt = reusable_buffer<T, 5>(HW * cols);  // grad_x's block of channels, channels-last
  int64_t* offsets = reusable_buffer<int64_t, 4>(PQ + kGemmMaxTileRows);
  for (int64_t j = 0; j < PQ + kGemmMaxTileRows; ++j) offsets[j] = std::min(j, PQ - 1) * K;
  std::fill(gxt, gxt + HW * cols, T(0));
  for (int64_t t = 0; t < RS; ++t) {
    const int64_t dh = t / s.S * s.win.dilation_h - s.win.pad_top, dw = t % s.S * s.win.dilation_w - s.win.pad_left;
    for (int64_t pq0 = 0; pq0 < PQ; pq0 += block_rows) {
      const int64_t rows = std::min(block_rows, PQ - pq0);
      gemm_rows_of_a<T>(layout, rows, gyt, offsets + pq0, packed + t * layout.size(), D, cols, false);
      for (int64_t j = 0, p = pq0 / s.Q, q = pq0 % s.Q; j < rows; ++j) {
        const int64_t h = p * s.win.stride_h + dh, v = q * s.win.stride_w + dw;
        if (uint64_t(h) < uint64_t(s.H) && uint64_t(v) < uint64_t(s.W)) {
          T* to = gxt + (h * s.W + v) * cols;
          const T* from = D + j * cols;
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) to[c] += from[c];
        }
        if (++q == s.Q) q = 0, ++p;
      }
    }
  }
  transpose_into_strip(gxt, cols, cols, HW, HW, gx_n + c0 * HW);
}

}  // namespace

// Float32 strided layers (stride-1 ones run as the transposed forward or on Winograd) under the forward's
// conditions with the roles of C and K swapped (the input channels fill whole strips; 16 output channels or
// more), on images of at most 64 KB. Against col2im's path (loop, 2 threads, AVX-512): 64 -> 128 3x3
// stride 2 onto 4x4 at batch 64 0.64 -> 0.45 ms, 64 -> 64 5x5 stride 2 onto 8x8 at batch 32 2.1 -> 1.3,
// 3x3 onto 8x8 at batch 64 1.38 -> 1.13, 128 -> 128 onto 4x4 at batch 16 0.31 -> 0.26. On larger images
// the batch GEMM's col2im held its own: 64 -> 128 channels from 32x32 at batch 8 1.02 -> 1.21, 128 -> 256
// from 16x16 0.84 -> 0.93, 256 -> 256 from 14x14 1.40 -> 1.48 (but 64 -> 128 from 28x28 0.73 -> 0.64).
constexpr int64_t kBackwardImageBytes = 64 << 10;

bool conv2d_backward_input_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes) {
  if (element_bytes != 4 || s.N < 2 || s.groups != 1 || s.R * s.S < 2 || sums_directly(s) || s.K < 16 ||
      (s.win.stride_h == 1 && s.win.stride_w == 1))
    return false;
  const int64_t nr = packed_b_layout<float>(s.K, s.C).nr;
  return s.C % nr == 0 && double(s.C) * double(s.H * s.W) * double(element_bytes) <= double(kBackwardImageBytes);
}

template <typename T>
void conv2d_backward_input_channels_last(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const int64_t C = s.C, K = s.K, HW = s.H * s.W, PQ = s.P * s.Q, RS = s.R * s.S;
  const int threads = available_threads();
  const bool parallel = threads > 1 && double(s.N) * double(K * C * RS) * double(PQ) >= kMinParallelWork;
  // Blocks of input channels: about 4 tasks per thread with few images (blocks of channels do not change
  // any sum, so their number may follow the thread count).
  const int64_t per_image = parallel ? (4 * int64_t(threads) + s.N - 1) / s.N : 1;
  const TapWeights tw = tap_weights<T>(RS, K, C, (C + per_image - 1) / per_image);
  T* packed = reusable_buffer<T, 2>(tw.size);
  pack_tap_weights(w, RS, C * RS, RS, tw, parallel, packed);
  const int64_t blocks = int64_t(tw.layouts.size());
  ParallelErrors errors;
  for_each_index(s.N * blocks, parallel, [&](int64_t task) {
    errors.run([&] {
      const int64_t n = task / blocks, b = task % blocks;
      T* gyt = reusable_buffer<T, 1>(PQ * K);  // grad_y's image channels-last
      transpose_into_strip(grad_y + n * K * PQ, PQ, PQ, K, K, gyt);
      const PackedBLayout& layout = tw.layouts[static_cast<size_t>(b)];
      // Sums within L1, by the layer alone (the order of the adds into grad_x does not depend on it).
      const int64_t block_rows = std::max<int64_t>(
          kRowsPerBlockMultiple,
          kBlockSumBytes / (layout.columns * int64_t(sizeof(T))) / kRowsPerBlockMultiple * kRowsPerBlockMultiple);
      backward_input_columns(s, gyt, layout, packed + tw.starts[static_cast<size_t>(b)], b * tw.width, block_rows,
                             grad_x + n * C * HW);
    });
  });
  errors.rethrow();
}

template void conv2d_backward_input_channels_last<float>(const Conv2dShape&, const float*, const float*, float*);
template void conv2d_backward_input_channels_last<double>(const Conv2dShape&, const double*, const double*, double*);

template void conv2d_forward_channels_last<float>(const Conv2dShape&, const float*, const float*, const float*,
                                                  float*);
template void conv2d_forward_channels_last<double>(const Conv2dShape&, const double*, const double*, const double*,
                                                   double*);

}  // namespace pykernels::cpu
