// Forward convolution without im2col packing: GEMMs whose B rows the micro-kernel reads in place from a
// padded copy of the input split into its stride phases.
//
// Output column q reads padded input column q*sw + kw*dw. Split each padded input row into sw phases
// (phase f holds padded columns f, f + sw, f + 2*sw, ...); then tap kw's inputs for q = 0, 1, 2, ... are
// one contiguous run, in phase (kw*dw) % sw from index (kw*dw) / sw on. So row (c, r, kw) of im2col's
// col, restricted to one output row p, is a run at a fixed offset from that row's start in the copy,
// and gemm_packed_rows multiplies it where it lies. The copy is about as large as x; im2col's packing
// moved R*S/(sh*sw) times as much (12x for resnet_stem, whose packing was a fifth of the forward time
// on AVX2).
//
// Two plans. Per row: one GEMM per output row, Q columns (strided layers of 32 columns or more). Wide:
// output row p + 1's runs start one copy row (`width` values) after row p's (the copy splits rows into
// their stride phases too), so a block of output rows is a single GEMM over the copy's rows as they lie,
// `width` columns per output row of which the last width - Q fall past the row's end (their sums are
// computed and dropped); the result goes through a buffer into y. Its
// register strips run across rows, full whatever Q, and one A strip meets the whole block while in L1
// (per row, the weights came through L2 again for every row): 5x5 on 28x28 at batch 8 went from 300
// GFLOP/s on the packed batch GEMM to 417, 7x7 on 56x56 from 395 to 440.
#include <algorithm>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/im2col.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/phase_split_copy.hpp"

namespace pykernels::cpu {

namespace {

// Values of the copy one depth block of the GEMM reads (KC = 256 taps: whole channels of R*S taps, one
// more where a block starts mid-channel) for `rows` output rows.
double depth_block_footprint(const Conv2dShape& s, const PhaseSplitCopy& copy, int64_t rows) {
  const int64_t row_span = (rows - 1) * s.win.stride_h + (s.R - 1) * s.win.dilation_h + 1;  // padded rows
  const int64_t channels = std::min(s.C_per_group(), 256 / (s.R * s.S) + 1);
  return double(channels) * double(row_span) * double(copy.width * s.win.stride_w);
}

}  // namespace

bool conv2d_forward_by_rows_applies(const Conv2dShape& s, int64_t element_bytes) {
  // Worth it where im2col would move at least twice the copy (R*S taps per sh*sw input cells: not a 1x1
  // strided layer, whose copy holds 4x what it reads); where rows are wide enough that their register
  // strips are mostly full (each output row is its own GEMM, its last strip partly empty: at 28 columns
  // a 32-wide strip, and resnet 3x3 stride 2 at batch 1 was 3-8 % slower); and where one output row's
  // inputs (every channel's R input rows) stay in L2 while it is computed (a 256-channel dilated layer of
  // 225 KB per row was 12 % slower; resnet_stem's is 19 KB).
  const Window2d& win = s.win;
  const int64_t row_span = (s.R - 1) * win.dilation_h + 1;
  const int64_t columns = (s.Q - 1) * win.stride_w + (s.S - 1) * win.dilation_w + 1;
  const double footprint = double(s.C_per_group()) * double(row_span) * double(columns) * double(element_bytes);
  return s.R * s.S >= 2 * win.stride_h * win.stride_w && s.Q >= 32 && footprint <= 192.0 * 1024 &&
         PhaseSplitCopy::fits(s);
}

namespace {
// Strided layers take wide rows, forward and backward-weight, only where the per-row plan does not apply
// (rows under 32 columns; for the forward, also strided_rows_go_wide's): resnet_stem's forward took 10 %
// longer wide; 3x3 stride-2 layers on 16x16 to 28x28 outputs forward 8-20 % less than on gathered columns
// (128 -> 256 channels on 28x28 at batch 8 9.4 -> 8.6 ms), backward-weight within 5 % (which the copy's row
// phases had slowed 3-8 %).
bool strided_per_row(const Conv2dShape& s, int64_t element_bytes) {
  return (s.win.stride_h > 1 || s.win.stride_w > 1) && conv2d_forward_by_rows_applies(s, element_bytes);
}
}  // namespace

namespace {

// Strided layers the per-row plan takes go wide only with 256 taps or more per output (the result's trip
// through a buffer into y is then small beside its sums) and rows that leave over a twelfth of the per-row
// plan's lanes empty. Batch 8 unless said, float32, timed between torch's calls: AlexNet's first layer
// (11x11, stride 4, 55 columns) 4.70 -> 4.26 ms, at batch 1 0.582 -> 0.498; 3x3 stride 2 from 112x112 (56
// columns) 64 -> 128 channels 11.4 -> 10.2, 32 -> 64 3.36 -> 2.87. Not with 32 columns (full vectors: 128
// channels 3x3 and 32 -> 64 5x5 from 64x64 5 % slower), nor with 27 taps (MobileNet's first layer, 112
// columns, 0.52 -> 0.66).
bool strided_rows_go_wide(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t lanes = 64 / element_bytes;
  const double fill = double(s.Q) / double((s.Q + lanes - 1) / lanes * lanes);
  return s.C_per_group() * s.R * s.S >= 256 && fill < 12.0 / 13.0;
}

bool wide_rows_allowed(const Conv2dShape& s, int64_t element_bytes) {
  if (s.R * s.S < 2 || !PhaseSplitCopy::fits(s) ||
      (strided_per_row(s, element_bytes) && !strided_rows_go_wide(s, element_bytes)))
    return false;
  // At batch 1 only on rows as wide as the per-row plan takes: there the threads split one image's rows,
  // and on short ones (512 channels on 7x7) each share re-read megabytes of weights for a few columns.
  return !(s.N == 1 && s.Q < 32);
}

// The share of the multiply-adds each plan keeps, chosen by the largest. Wide: Q of every `width`
// columns, in register strips of the widest build (3 vectors of 64 bytes) over a whole image. Packed
// im2col columns (batch GEMM, or batch 1's per-image GEMM): packing costs about 144 / element_bytes
// multiply-adds per value (36 in float32), shared by the K/groups output channels. Per row: the last
// strip of each row wastes lanes up to a whole vector, and the weights come through L2 once per row
// (a twelfth more time). Measured with 32 to 256 output channels: 5x5 on 28x28 with 64 channels (wide
// 0.85 of torch's speed, packed 0.63), 3x3 on 14x14 with 256 (packed 0.88, wide 0.80), a 4-dilated 3x3
// on 32 columns (per row 0.89, wide 0.74).
struct PlanShares {
  double wide, other;  // wide rows; the better of packed columns and per row
};

// Strided layers of at most 9 taps whose output rows are under 32 columns (ResNet's 3x3 stride-2 layers onto
// 28x28 to 7x7) are costed closer: their packed columns are gathered from the phase-split copies a run of Q
// values at a time (gathers_columns in conv2d.cpp), about 228 / element_bytes multiply-adds per value, and
// the wide plan's last strip of an image runs only the vectors its columns fill (micro_kernel_for). Switched
// call by call in one process (torch's forward between calls, ms, packed -> wide): 3x3 stride 2 from 28x28,
// 256 -> 256 channels at batch 8 6.04 -> 5.08, at batch 32 24.7 -> 19.0, at batch 4 2.74 -> 2.58, float64 at
// batch 8 12.0 -> 11.1; 128 -> 256 2.92 -> 2.47 (float64 6.14 -> 5.04); 64 -> 128 from 16x16 at batch 16 in
// float64 1.20 -> 0.90; grouped and 64-channel layers level. Still packed, where wide was slower: 512 -> 512
// from 28x28 (10 %), 256 -> 256 from 14x14 onto 7x7 (17 %). Slower under this rule: 2 x 512 -> 128 from 17x17
// in float64, 1.68 -> 1.81. Not 5x5 and larger kernels, where the same costs were mixed (7x7 stride 2 on 32x32
// 128 -> 256 at batch 2 4.54 -> 5.03 wide, 11x11 stride 4 128 -> 128 at batch 4 2.91 -> 3.35; others 5-30 %
// faster).
bool gathers_short_strided_rows(const Conv2dShape& s) {
  return (s.win.stride_h > 1 || s.win.stride_w > 1) && s.Q < 32 && s.R * s.S <= 9;
}

PlanShares plan_shares(const Conv2dShape& s, int64_t element_bytes) {
  const PhaseSplitCopy copy(s);
  const int64_t strip = 192 / element_bytes, lanes = 64 / element_bytes, columns = (s.P - 1) * copy.width + s.Q;
  const bool short_strided = gathers_short_strided_rows(s);
  const int64_t last_strip = short_strided ? (columns % strip + lanes - 1) / lanes * lanes : strip;
  const int64_t padded = columns % strip == 0 ? columns : columns / strip * strip + last_strip;
  const double wide = double(s.Q) / double(copy.width) * double(columns) / double(padded);
  const double per_value = short_strided ? 228.0 : 144.0;
  double other = 1.0 / (1.0 + per_value / double(element_bytes) / double(s.K_per_group()));
  if (conv2d_forward_by_rows_applies(s, element_bytes))
    other = std::max(other, double(s.Q) / double((s.Q + lanes - 1) / lanes * lanes) * 12.0 / 13.0);
  return {wide, other};
}

}  // namespace

bool conv2d_forward_reads_wide_rows(const Conv2dShape& s, int64_t element_bytes) {
  if (!wide_rows_allowed(s, element_bytes)) return false;
  const PlanShares shares = plan_shares(s, element_bytes);
  return shares.wide >= shares.other;
}

double conv2d_forward_packed_share(const Conv2dShape& s, int64_t element_bytes) {
  const PlanShares shares = plan_shares(s, element_bytes);
  return wide_rows_allowed(s, element_bytes) ? std::max(shares.wide, shares.other) : shares.other;
}

template <typename T>
void conv2d_forward_by_rows(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group(), CRS = Cg * s.R * s.S;
  const int64_t PQ = s.P * s.Q, HW = s.H * s.W, items = s.N * G;
  const PhaseSplitCopy copy(s);
  const std::vector<int64_t> offsets = tap_offsets(s, copy);
  const PackedLayout layout = packed_layout<T>(Kg, CRS);
  std::vector<T> packed(static_cast<size_t>(G * layout.size()));  // every group's weights, packed once
  for (int64_t g = 0; g < G; ++g) pack_a<T>(layout, w + g * Kg * CRS, {CRS, 1}, packed.data() + g * layout.size());
  const int threads = available_threads();
  const bool wide = conv2d_forward_reads_wide_rows(s, sizeof(T));

  // Wide plan: blocks of output rows whose depth block of the copy stays in L2 (about 384 KB) and whose
  // buffered result stays within 1 MB; at least one block per thread where the threads share an image.
  int64_t blocks = 1;
  if (wide) {
    int64_t rows = s.P;
    while (rows > 1 && (depth_block_footprint(s, copy, rows) * sizeof(T) > 384.0 * 1024 ||
                        double(Kg) * double(rows * copy.width) * sizeof(T) > 1024.0 * 1024))
      rows = (rows + 1) / 2;
    blocks = (s.P + rows - 1) / rows;
    if (items < threads) blocks = std::min<int64_t>(s.P, std::max<int64_t>(blocks, threads));
  }

  // Output rows [p0, p1) of one item from its copy.
  auto rows_of = [&](int64_t item, const T* from, int64_t p0, int64_t p1) {
    const int64_t n = item / G, g = item % G;
    T* y_g = y + (n * s.K + g * Kg) * PQ;
    const T* a = packed.data() + g * layout.size();
    if (wide) {
      // One GEMM from row p0's runs on; output row p's column q is the result's column (p - p0) * width + q.
      const int64_t columns = (p1 - p0 - 1) * copy.width + s.Q;
      T* out = reusable_buffer<T, 2>(Kg * columns);
      gemm_packed_rows<T>(layout, a, columns, from + copy.output_row_offset(p0), offsets.data(), out, columns,
                          false);
      for (int64_t k = 0; k < Kg; ++k) {
        const T b = bias ? bias[g * Kg + k] : T(0);
        for (int64_t p = p0; p < p1; ++p) {
          const T* o = out + k * columns + (p - p0) * copy.width;
          T* to = y_g + k * PQ + p * s.Q;
          for (int64_t q = 0; q < s.Q; ++q) to[q] = o[q] + b;
        }
      }
      return;
    }
    for (int64_t p = p0; p < p1; ++p)
      gemm_packed_rows<T>(layout, a, s.Q, from + copy.output_row_offset(p), offsets.data(), y_g + p * s.Q, PQ,
                          false);
    if (bias)
      for (int64_t k = 0; k < Kg; ++k) {
        const T b = bias[g * Kg + k];
        for (T *v = y_g + k * PQ + p0 * s.Q, *e = y_g + k * PQ + p1 * s.Q; v < e; ++v) *v += b;
      }
  };
  auto x_of = [&](int64_t item) { return x + (item / G * s.C + item % G * Cg) * HW; };
  const bool worth_threads = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;
  const int64_t copy_rows = Cg * copy.rows;
  ParallelErrors errors;
  if (items >= threads) {  // one item per thread at a time, each with its own copy
    for_each_index(items, items > 1 && worth_threads, [&](int64_t item) {
      errors.run([&] {
        T* own = reusable_buffer<T, 0>(copy.size);
        fill_rows(s, copy, x_of(item), 0, copy_rows, own);
        for (int64_t b = 0; b < blocks; ++b) rows_of(item, own, s.P * b / blocks, s.P * (b + 1) / blocks);
      });
    });
  } else {  // fewer items than threads (batch 1): the threads share each item's copy and its rows
    T* shared = reusable_buffer<T, 1>(copy.size);
    for (int64_t item = 0; item < items; ++item) {
      const int64_t chunks = std::min<int64_t>(copy_rows, 4 * threads);
      for_each_index(chunks, worth_threads, [&](int64_t i) {
        fill_rows(s, copy, x_of(item), copy_rows * i / chunks, copy_rows * (i + 1) / chunks, shared);
      });
      const int64_t parts = wide ? blocks : std::min<int64_t>(s.P, 4 * threads);
      for_each_index(parts, worth_threads, [&](int64_t i) {
        errors.run([&] { rows_of(item, shared, s.P * i / parts, s.P * (i + 1) / parts); });
      });
      errors.rethrow();
    }
  }
  errors.rethrow();
}

bool conv2d_backward_weight_reads_wide_rows(const Conv2dShape& s, int64_t element_bytes) {
  if (s.R * s.S < 2 || s.N == 0 || !PhaseSplitCopy::fits(s) || strided_per_row(s, element_bytes))
    return false;  // N = 0: zeros
  // Every image's copy and packed grad_y (its channels rounded up to whole strips: at most 64 more) at
  // once, at most 64 MiB.
  const PhaseSplitCopy copy(s);
  const double packed = double((s.P - 1) * copy.width + s.Q) * double(s.K_per_group() + 64);
  if (double(s.N * s.groups) * (double(copy.size) + packed) * double(element_bytes) > double(int64_t(64) << 20))
    return false;
  // The share of the multiply-adds each way keeps, as the forward's rule: Q of every `width` here (the
  // products of the columns past each output row are zeros); the GEMM's other packings cost multiply-adds
  // shared by the K/groups rows of grad_y: 144 / element_bytes per value (36 in float32) for im2col's
  // columns, 16 / element_bytes (4) for the runs transposed from copies (conv2d.cpp's from_copies, where
  // the forward's per-row plan applies). Measured, float32 against torch: 5x5 64 channels 28x28 0.71 ->
  // 0.89, 7x7 32 channels 56x56 0.87 -> 0.98 (from copies), 7x7 64 channels 112x112 0.79 -> 1.04; left to
  // the copies: 64 channels on 56x56 (3x3, dilated 3x3, 5x5: 0.94-1.05 against 0.89-0.96 wide), and to
  // im2col: 256 channels on 27x27 (5x5: 0.90 against 0.85), a 4-dilated 3x3 (8 of 40 columns dropped).
  // The wide path also packs every image's grad_y first, out to memory and back (the GEMM packs its blocks
  // of grad_y in the caches): about 16 multiply-adds' time per value, shared by the C/groups * R * S rows
  // of col. Few rows and it loses: CIFAR's first layer (3 -> 64 channels on 32x32, batch 64, 27 rows) took
  // 1.9-2.6 ms wide, 0.8 of them packing, against 0.94 from copies (torch 1.2); 32 channels 7x7 on 56x56
  // (1568 rows) stays wide, 10 % faster.
  const double wide = double(s.Q) / double(copy.width);
  const double per_value = conv2d_forward_by_rows_applies(s, element_bytes) ? 16.0 : 144.0;
  const double rows = double(s.C_per_group() * s.R * s.S);
  return wide / (1.0 + 16.0 / rows) >= 1.0 / (1.0 + per_value / double(element_bytes) / double(s.K_per_group()));
}

template <typename T>
void conv2d_backward_weight_wide(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group(), CRS = Cg * s.R * s.S;
  const int64_t PQ = s.P * s.Q, HW = s.H * s.W, items = s.N * G;
  const PhaseSplitCopy copy(s);
  std::vector<int64_t> offsets = tap_offsets(s, copy);
  offsets.resize(static_cast<size_t>(CRS + kGemmMaxTileRows), offsets.back());  // the last strip's extra rows
  const int64_t positions = (s.P - 1) * copy.width + s.Q;
  const PackedBLayout layout = packed_b_layout<T>(positions, Kg);
  const bool parallel = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;
  // Every image's copy and packed grad_y, made by all threads first.
  T* copies = reusable_buffer<T, 3>(items * copy.size);
  T* packed = reusable_buffer<T, 4>(items * layout.size());
  for_each_index(items, parallel && items > 1, [&](int64_t item) {
    const int64_t n = item / G, g = item % G;
    fill_rows(s, copy, x + (n * s.C + g * Cg) * HW, 0, Cg * copy.rows, copies + item * copy.size);
    const WideGradOut<T> gy{&s, grad_y + (n * s.K + g * Kg) * PQ, copy.width};
    pack_b<T>(layout, BPacker<T>{conv_packers<T>().wide_grad_out, &gy}, packed + item * layout.size());
  });
  // sums[g][crs][k] = grad_w[g * Kg + k][crs]: each task a block of one group's rows (whole strips on every
  // build: 24 rows), summed over the images in order, so the bits do not depend on the thread count.
  T* sums = reusable_buffer<T, 5>(G * CRS * Kg);
  const int64_t units = (CRS + 23) / 24;
  const int64_t per_group = std::max<int64_t>(1, std::min<int64_t>(units, (4 * available_threads() + G - 1) / G));
  const int64_t tasks = G * per_group;
  ParallelErrors errors;
  for_each_index(tasks, parallel && tasks > 1, [&](int64_t task) {
    errors.run([&] {
      const int64_t g = task / per_group, part = task % per_group;
      const int64_t r0 = units * part / per_group * 24;
      const int64_t rows = std::min(CRS, units * (part + 1) / per_group * 24) - r0;
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t item = n * G + g;
        gemm_rows_of_a<T>(layout, rows, copies + item * copy.size, offsets.data() + r0, packed + item * layout.size(),
                          sums + (g * CRS + r0) * Kg, Kg, n > 0);
      }
    });
  });
  errors.rethrow();
  // grad_w[g][k][crs] = sums[g][crs][k] in 16 x 16 tiles (a 256-channel layer's serial transpose, value by
  // value at a stride of 1 KB, took as long as its sums); threads split the rows k.
  constexpr int64_t kTile = 16;
  const int64_t k_tiles = (Kg + kTile - 1) / kTile;
  for_each_index(G * k_tiles, parallel && G * k_tiles > 1, [&](int64_t t) {
    const int64_t g = t / k_tiles, k0 = t % k_tiles * kTile, k1 = std::min(Kg, k0 + kTile);
    for (int64_t c0 = 0; c0 < CRS; c0 += kTile)
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t crs = c0, c1 = std::min(CRS, c0 + kTile); crs < c1; ++crs)
          grad_w[(g * Kg + k) * CRS + crs] = sums[(g * CRS + crs) * Kg + k];
  });
}

template void conv2d_backward_weight_wide<float>(const Conv2dShape&, const float*, const float*, float*);
template void conv2d_backward_weight_wide<double>(const Conv2dShape&, const double*, const double*, double*);
template void conv2d_forward_by_rows<float>(const Conv2dShape&, const float*, const float*, const float*, float*);
template void conv2d_forward_by_rows<double>(const Conv2dShape&, const double*, const double*, const double*,
                                             double*);

}  // namespace pykernels::cpu
