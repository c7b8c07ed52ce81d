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
// instead of a value or two), and grad_x transposed back. Backward-weight of such layers: per tap, the
// sums (K x C) += grad_y (K x positions, packed as the GEMM's A once per image) times the rows that tap
// reads from the channels-last copy, in place as the GEMM's B (gemm_packed_rows), image after image.
//
// Here: which layers take these passes, and the weights packed per tap; the passes themselves are in
// channels_last_impl.inc, built once per instruction set.
#include <algorithm>
#include <vector>

#include "cpu/channels_last_conv.hpp"
#include "cpu/conv_ranges.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/transpose.hpp"

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_CHANNELS_LAST(ns)                                                                   \
  namespace ns {                                                                                              \
  template <typename T>                                                                                       \
  void channels_last_forward(const Conv2dShape&, const T*, const TapWeights&, const T*, const T*, bool, T*);  \
  template <typename T>                                                                                       \
  void channels_last_backward_input(const Conv2dShape&, const T*, const TapWeights&, const T*, bool, T*);     \
  template <typename T>                                                                                       \
  void channels_last_backward_weight(const Conv2dShape&, const T*, const PackedLayout&, const T*, bool, T*);  \
  }
PYKERNELS_DECLARE_CHANNELS_LAST(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_CHANNELS_LAST(avx2)
PYKERNELS_DECLARE_CHANNELS_LAST(avx512)
#endif
#undef PYKERNELS_DECLARE_CHANNELS_LAST

namespace {

constexpr int64_t kTapWeightBytes = 256 << 10;       // a block of columns' weights, all taps, within L2
constexpr int64_t kImageBytes = 256 << 10;           // an image's channels-last copy within L2

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

// Every group's blocks' B in their layouts' strips (depth blocks of kc rows, each as strips of nr columns, nr
// values per row; columns past the block's zero): group g's weights from w + g * Kg * Cg * taps, packed at
// packed + g * tw.size. B of tap t is the tap's Kg x Cg weights, or their transpose where the columns are
// the output channels (forward); tap R * S - 1 - t's where `rotated` (the transposed convolution's). The
// weights are first transposed tap by tap (their taps lie 1 apart, so gathering a tap's matrix value by
// value had been a tenth of ResNeXt's last stage's backward-input), then threads take whole taps of a
// group, each strip a transpose or row copies of its tap's matrix.
template <typename T>
void pack_tap_weights(const Conv2dShape& s, const T* w, bool columns_are_outputs, bool rotated, const TapWeights& tw,
                      bool parallel, T* packed) {
  const int64_t taps = s.R * s.S, Cg = s.C_per_group(), KC = s.K_per_group() * Cg;
  T* by_tap = reusable_buffer<T, 2>(s.groups * taps * KC);  // [(g * taps + t) * KC + k * Cg + c]
  constexpr int64_t kChunk = 1024;  // (k, c) pairs a task transposes
  const int64_t chunks = (KC + kChunk - 1) / kChunk;
  std::vector<int64_t> tap_cells(static_cast<size_t>(taps));
  for (int64_t t = 0; t < taps; ++t) tap_cells[t] = t * KC;
  for_each_index(s.groups * chunks, parallel, [&](int64_t task) {
    const int64_t g = task / chunks, i0 = task % chunks * kChunk, n = std::min(kChunk, KC - i0);
    // pairs i0.. as "planes" of `taps` values, their taps into rows KC apart
    planes_into_cells(w + (g * KC + i0) * taps, taps, taps, n, n, tap_cells.data(), by_tap + g * taps * KC + i0);
  });
  for_each_index(s.groups * taps, parallel, [&](int64_t task) {
    const int64_t g = task / taps, t = task % taps;
    const T* tap = by_tap + (g * taps + (rotated ? taps - 1 - t : t)) * KC;  // its weights, (k, c) at k * Cg + c
    T* packed_g = packed + g * tw.size;
    for (size_t b = 0; b < tw.layouts.size(); ++b) {
      const PackedBLayout& layout = tw.layouts[b];
      const int64_t padded = layout.padded_columns(), first = int64_t(b) * tw.width;
      for (int64_t pd = 0; pd < layout.depth; pd += layout.kc) {
        const int64_t kc = std::min(layout.kc, layout.depth - pd);
        T* block = packed_g + tw.starts[b] + t * layout.size() + pd * padded;
        for (int64_t j0 = 0; j0 < padded; j0 += layout.nr) {
          const int64_t filled = std::max<int64_t>(0, std::min(layout.nr, layout.columns - j0));
          T* strip = block + j0 * kc;
          if (columns_are_outputs) {  // B[c][k]: row d of the strip is input channel pd + d of outputs first + j0..
            transpose_into_strip(tap + (first + j0) * Cg + pd, Cg, kc, filled, layout.nr, strip);
          } else {  // B[k][c]: output channel pd + d's run of input channels first + j0..
            for (int64_t d = 0; d < kc; ++d) {
              T* row = strip + d * layout.nr;
              std::copy(tap + (pd + d) * Cg + first + j0, tap + (pd + d) * Cg + first + j0 + filled, row);
              std::fill(row + filled, row + layout.nr, T(0));
            }
          }
        }
      }
    }
  });
}

}  // namespace

// Grouped layers that the direct sums would take (up to 32 output channels a group), float32, 2 images or
// more, not 1x1, on images of a group within kImageBytes and few output positions (the direct sums' rows
// are short there), for forward and backward-input (each adds its own condition on the channels). Against
// the direct sums (loop, 2 threads, AVX-512, batch 8): ResNeXt's last stage, 1024 channels in 32 groups on
// 7x7, forward 1.06 -> 0.90 ms, backward-input 1.06 -> 0.79; 256 in 8 groups on 14x14 0.68 -> 0.63 and
// level; 64 in 2 groups on 28x28 (784 positions, left to the direct sums) 0.59 -> 0.62 and 0.58 -> 0.66.
// Groups whose lanes would be one vector (16 channels: ResNeXt's third stage, 512 channels in 32 groups on
// 14x14) stay with the direct sums, but a strided forward: there, direct sums against channels-last,
// forward 0.72 against 0.87 ms (cores sharing an L3) and backward-input 0.81 against 1.00 (cores sharing
// none); 512 in 32 groups from 28x28 at stride 2, forward 1.49 against 1.13, backward-input 1.26 against
// 1.44 (sharing none).
namespace {
bool grouped_layer_taken(const Conv2dShape& s, int64_t element_bytes) {
  return element_bytes == 4 && s.N >= 2 && s.R * s.S >= 2 && sums_directly(s) && s.P * s.Q <= 196 &&
         double(s.C_per_group()) * double(s.H * s.W) * double(element_bytes) <= double(kImageBytes);
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
  if (s.groups > 1)
    return grouped_layer_taken(s, element_bytes) && s.C_per_group() >= 16 && s.K_per_group() % 16 == 0 &&
           (s.K_per_group() >= 32 || s.win.stride_h > 1 || s.win.stride_w > 1);
  if (element_bytes != 4 || s.N < 2 || s.R * s.S < 2 || sums_directly(s) || s.C < 16) return false;
  const int64_t nr = packed_b_layout<float>(s.C, s.K).nr;
  return s.K % nr == 0 && double(s.C) * double(s.H * s.W) * double(element_bytes) <= double(kImageBytes) &&
         conv2d_forward_packed_share(s, element_bytes) <= 0.8;
}

namespace {
// The forward of layer s over x, its weights packed by pack(tw, parallel, packed) into each group's layout.
template <typename T, typename Pack>
void forward_channels_last_packing(const Conv2dShape& s, const T* x, const T* bias, T* y, Pack&& pack) {
  const int64_t Cg = s.C_per_group(), Kg = s.K_per_group(), RS = s.R * s.S;
  const bool parallel =
      available_threads() > 1 && double(s.N) * double(s.K * Cg * RS) * double(s.P * s.Q) >= kMinParallelWork;
  const TapWeights tw = tap_weights<T>(RS, Cg, Kg, Kg);  // each group's, group g's at packed + g * tw.size
  T* packed = reusable_buffer<T, 0>(s.groups * tw.size);
  pack(tw, parallel, packed);
  PYKERNELS_RETURN_ON_BUILD(tw.layouts.front().isa, channels_last_forward<T>(s, x, tw, packed, bias, parallel, y))
}
}  // namespace

template <typename T>
void conv2d_forward_channels_last(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  forward_channels_last_packing(s, x, bias, y, [&](const TapWeights& tw, bool parallel, T* packed) {
    pack_tap_weights(s, w, true, false, tw, parallel, packed);
  });
}

// The transposed forward t of a stride-1 layer s over grad_y: its weights packed straight from w's rotated
// taps as backward-input packs them (B[k][c] is the transposed forward's B), with no flipped copy of w.
template <typename T>
void conv2d_backward_input_as_forward_channels_last(const Conv2dShape& s, const Conv2dShape& t, const T* grad_y,
                                                    const T* w, T* grad_x) {
  forward_channels_last_packing(t, grad_y, static_cast<const T*>(nullptr), grad_x,
                                [&](const TapWeights& tw, bool parallel, T* packed) {
                                  pack_tap_weights(s, w, false, true, tw, parallel, packed);
                                });
}

// Float32 strided layers (stride-1 ones run as the transposed forward or on Winograd) of one group, 2
// images or more, not 1x1, with 16 output channels or more, input channels in whole vectors (a multiple of
// 16: 32 take the GEMM's 2-vector tiles on AVX-512) and images whose channels-last grad_x stays in L2.
// Against col2im's path (loop, 2 threads, AVX-512): 32 -> 64 3x3 stride 2 onto 8x8 at batch 64 0.65 ->
// 0.41 ms, onto 16x16 3.15 -> 2.26, 16 -> 32 onto 16x16 0.81 -> 0.72, 64 -> 128 onto 4x4 0.64 -> 0.43,
// from 28x28 at batch 8 0.70 -> 0.55, 64 -> 64 5x5 stride 2 onto 8x8 at batch 32 2.1 -> 1.1, 256 -> 256
// from 14x14 1.36 -> 1.29; 64 -> 128 from 32x32 0.86 -> 0.92 (cold caches 0.98 -> 0.95).
bool conv2d_backward_input_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes) {
  if (s.groups > 1)
    return grouped_layer_taken(s, element_bytes) && s.C_per_group() % 16 == 0 && s.C_per_group() >= 32 &&
           s.K_per_group() >= 16;
  if (element_bytes != 4 || s.N < 2 || s.R * s.S < 2 || sums_directly(s) || s.K < 16 ||
      (s.win.stride_h == 1 && s.win.stride_w == 1))
    return false;
  return s.C % 16 == 0 && double(s.C) * double(s.H * s.W) * double(element_bytes) <= double(kImageBytes);
}

template <typename T>
void conv2d_backward_input_channels_last(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const int64_t Cg = s.C_per_group(), Kg = s.K_per_group(), RS = s.R * s.S, items = s.N * s.groups;
  const int threads = available_threads();
  const bool parallel = threads > 1 && double(s.N) * double(s.K * Cg * RS) * double(s.P * s.Q) >= kMinParallelWork;
  // Blocks of input channels: about 4 tasks per thread with few images and groups (blocks of channels do
  // not change any sum, so their number may follow the thread count).
  const int64_t per_item = parallel ? (4 * int64_t(threads) + items - 1) / items : 1;
  const TapWeights tw = tap_weights<T>(RS, Kg, Cg, (Cg + per_item - 1) / per_item);  // group g's at g * tw.size
  T* packed = reusable_buffer<T, 0>(s.groups * tw.size);
  pack_tap_weights(s, w, false, false, tw, parallel, packed);
  PYKERNELS_RETURN_ON_BUILD(tw.layouts.front().isa,
                            channels_last_backward_input<T>(s, grad_y, tw, packed, parallel, grad_x))
}

// Backward-weight of float32 layers, 2 images or more, not 1x1, with 16 output channels per group or
// more, input channels per group a multiple of 32 (16 take the GEMM's 1-vector tiles: 16 -> 32 3x3 stride
// 2 onto 16x16 0.50 -> 0.65 ms), images (one group's channels) whose copy stays in L2, and each tap's
// sums (Kg x Cg) within 64 KB (256 -> 256 from 14x14, 256 KB a tap and 49 positions per image to add:
// 1.16 -> 1.40): strided layers of one group that the direct sums do not take, in place of conv_rows.cpp's
// wide rows; and grouped layers of up to 32 output channels per group, at any stride, in place of the
// direct sums (so conv2d_backward_weight asks first). Loop, 2 threads, AVX-512, cores sharing an L3: 32 ->
// 64 3x3 stride 2 onto 8x8 at batch 64 0.46 -> 0.43 ms, 64 -> 128 onto 4x4 0.49 -> 0.43, 128 -> 128 at
// batch 16 0.275 -> 0.262, 64 -> 64 5x5 onto 8x8 at batch 32 1.43 -> 1.14, 32 -> 64 onto 16x16 2.5 -> 1.9;
// 64 -> 128 from 28x28 level; where the host put the two cores on different L3s, 0.70 -> 0.45 on the
// first (each task reads one tap's rows of the copies, not every tap's). Grouped, against the direct
// sums: 64 channels in 2 groups on 28x28 at batch 8 0.74 -> 0.59, stride 2 onto 8x8 at batch 32 0.49 ->
// 0.39, 1024 in 32 groups on 7x7 (ResNeXt's last stage) 1.17 -> 0.92, 256 in 8 groups on 14x14 1.04 ->
// 0.62; 64 in 2 groups on 56x56 (400 KB a group's image) 2.66 -> 2.79; 64 output channels a group (not
// summed directly) level.
bool conv2d_backward_weight_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t Cg = s.C_per_group(), Kg = s.K_per_group();
  if (element_bytes != 4 || s.N < 2 || s.R * s.S < 2 || Kg < 16 || Cg % 32 != 0 ||
      double(Cg) * double(s.H * s.W) * double(element_bytes) > double(kImageBytes) ||
      double(Kg) * double(Cg) * double(element_bytes) > double(64 << 10))
    return false;
  if (s.groups > 1) return Kg <= 32;
  return !sums_weight_gradient_directly(s) && (s.win.stride_h > 1 || s.win.stride_w > 1);
}

template <typename T>
void conv2d_backward_weight_channels_last(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  const int64_t Kg = s.K_per_group(), PQ = s.P * s.Q, items = s.N * s.groups;
  const bool parallel = available_threads() > 1 &&
                        double(s.N) * double(s.K * s.C_per_group() * s.R * s.S) * double(PQ) >= kMinParallelWork;
  // Each image's grad_y, a group's Kg x PQ block at a time, packed once as the A of its taps' GEMMs.
  const PackedLayout layout = packed_layout<T>(Kg, PQ);
  T* packed = reusable_buffer<T, 1>(items * layout.size());
  for_each_index(items, parallel && items > 1, [&](int64_t item) {
    pack_a<T>(layout, grad_y + item * Kg * PQ, {PQ, 1}, packed + item * layout.size());
  });
  PYKERNELS_RETURN_ON_BUILD(layout.isa, channels_last_backward_weight<T>(s, x, layout, packed, parallel, grad_w))
}

template void conv2d_forward_channels_last<float>(const Conv2dShape&, const float*, const float*, const float*,
                                                  float*);
template void conv2d_forward_channels_last<double>(const Conv2dShape&, const double*, const double*, const double*,
                                                   double*);
template void conv2d_backward_input_as_forward_channels_last<float>(const Conv2dShape&, const Conv2dShape&,
                                                                    const float*, const float*, float*);
template void conv2d_backward_input_as_forward_channels_last<double>(const Conv2dShape&, const Conv2dShape&,
                                                                     const double*, const double*, double*);
template void conv2d_backward_input_channels_last<float>(const Conv2dShape&, const float*, const float*, float*);
template void conv2d_backward_input_channels_last<double>(const Conv2dShape&, const double*, const double*, double*);
template void conv2d_backward_weight_channels_last<float>(const Conv2dShape&, const float*, const float*, float*);
template void conv2d_backward_weight_channels_last<double>(const Conv2dShape&, const double*, const double*, double*);

}  // namespace pykernels::cpu
