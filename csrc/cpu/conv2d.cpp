// 2-D cross-correlation on the CPU: forward, backward-input, backward-weight and backward-bias.
//
// Every pass is one GEMM (gemm.hpp) per image and group, with CRS = C/groups * R * S:
//   forward         y_g  (K/g x PQ)  = w_g (K/g x CRS)   * col (CRS x PQ)
//   backward-input  col  (CRS x PQ)  = w_g^T (CRS x K/g) * gy_g (K/g x PQ), then col2im adds into gx
//   backward-weight gw_g (K/g x CRS) = GY_g (K/g x N*PQ) * COL^T (N*PQ x CRS), one GEMM over the batch
//                   (or over each half of it, the halves then added, where grad_y dwarfs grad_w)
// col (im2col of x) is never stored for forward and backward-weight: the GEMM asks for it block by
// block and im2col.hpp's packers write it straight into the packed layout (implicit GEMM), which saves
// a full write and read of a buffer as large as the GEMM's B. A 1x1 kernel with stride 1 and no padding
// needs no im2col at all: col is x.
// Other paths, chosen per layer:
// - 3x3 stride-1 layers take the Winograd path (winograd_impl.inc) for all three passes, backward-input
//   as the transposed convolution, where winograd.cpp's cost rules say it pays (backward-weight's is
//   stricter for the largest layers); those with few tiles take F(2x2, 3x3) (winograd_f2_impl.inc) instead
//   for forward and backward-input where that costs less; set_conv_algorithm("gemm") turns both off.
// - Forward of layers with overlapping windows and wide output rows (resnet_stem): one GEMM per output
//   row reading x in place from a padded, stride-phase-split copy (conv_rows.cpp), with nothing packed;
//   their backward-weight packs COL^T straight from such copies (phase_split_copy.hpp).
// - Layers with overlapping windows and output rows shorter than 32 (resnet_3x3_512's 7): forward's col
//   and backward-weight's COL^T gathered value by value from such copies through tables of offsets
//   (GatheredColumns), where im2col's packing went a few values at a time.
// - Forward of layers whose output channels fill whole register strips and whose outputs are too few per
//   row for those plans to keep more than 80 % of the lanes (CIFAR's 3x3 stride-2 layers onto 8x8): one
//   GEMM per tap over channels-last copies of the images (channels_last_conv.cpp); backward-input and
//   backward-weight of strided layers on small images likewise (in place of col2im, and of wide rows);
//   and grouped layers with 32 output channels a group or fewer on few positions (ResNeXt's last stage),
//   a group at a time, in place of the direct sums.
// - Depthwise layers of 32 channels or more on planes up to about 112x112, all three passes, with the
//   channels across the vector lanes (depthwise_conv.cpp), before the direct sums.
// - Layers with few weights per group (has_few_weights: LeNet, depthwise) are summed directly, all
//   three passes (direct_conv_impl.inc); so are grouped layers with few output channels per group
//   (sums_directly: up to 32 per group; backward-weight not 17-32 on fewer than 100 positions).
// - Dilated stride-1 layers whose padding and size the dilation divides: as their undilated layer over a
//   batch of x's dilation phases, where that takes Winograd (dilated_phases.cpp), all three passes.
// - Grouped layers of 48 or more channels a group whose groups alone take Winograd: one layer per group over
//   the whole batch (grouped_winograd.cpp), all three passes.
// - Grouped 3x3 stride-1 layers of one to four vectors of channels a group (ResNeXt's 16 and 32 with AVX-512)
//   on F(2x2, 3x3), a group's channels across the lanes (small_group_conv.cpp), all three passes,
//   backward-input as the transposed forward; backward-weight of such groups with any other window, and
//   forward and backward-input of strided ones, summed directly the same way; before the channels-last and
//   direct grouped passes.
// - 4x4 to 6x6 kernels at stride 1 (conv_5x5_64) take the Winograd path as a 3x3 layer of four times the
//   input channels, x read shifted four ways, where that costs less (split_kernel.cpp): forward,
//   backward-weight, and backward-input where it runs as the transposed forward (below).
// - Backward-input of stride-1 layers with large (25+ taps) or dilated windows and 'same'-like padding
//   runs as the transposed convolution through the forward's paths, instead of col2im's scattered adds
//   (transposed_shape).
// - Few output positions and many weights (resnet_3x3_512 at batch 2 or 3, or under "gemm"): forward and
//   backward-input as one GEMM per group over the whole batch, so the weights are packed once per thread
//   instead of once per image.
// Forward and backward-input run one image per thread (each writes its own output); backward-weight
// splits the columns of grad_w among threads, so every gradient element is summed over n in the same
// order whatever the thread count: results are bit-for-bit reproducible.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <vector>

#include "cpu/conv_ranges.hpp"
#include "cpu/gemm.hpp"
#include "cpu/im2col.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/phase_split_copy.hpp"

namespace pykernels::cpu {

namespace {

// PYKERNELS_CONV_ALGORITHM=gemm turns Winograd off for the whole process (e.g. to compare results).
bool winograd_by_default() {
  const char* env = std::getenv("PYKERNELS_CONV_ALGORITHM");
  return !(env && std::strcmp(env, "gemm") == 0);
}

std::atomic<bool> winograd_enabled{winograd_by_default()};

// True when no value is NaN or +-inf. Winograd's transforms mix a whole 6x6 patch, so one non-finite
// input would reach outputs whose windows never see it. Each pass therefore checks Winograd's output: a
// NaN or inf anywhere in the inputs a tile reads leaves one in that tile's outputs (no transform skips a
// value, and inf or NaN times or plus anything is not finite), and then the GEMM path recomputes the
// pass, with exactly the outputs direct summation reaches; an overflow inside the transforms goes the
// same way. Checking the output reads it once; checking the inputs first read all of them on every call
// (9.4 MB of weights on resnet_3x3_512). The direct backward-weight (sums_weight_gradient_directly) is
// checked likewise: its zero-filled columns meet real values of x, and 0 * inf is NaN (direct_conv_impl.inc).
// Both cores scan (alone, one took 5 % of resnet_3x3_128's float64 forward).
template <typename T>
bool all_finite(const T* v, int64_t count) {
  int finite = 1;  // an integer AND reduction, which the compiler vectorises (a float sum it may not)
#pragma omp parallel for simd schedule(static) reduction(& : finite) if (parallel : count >= kMinParallelWork)
  for (int64_t i = 0; i < count; ++i) finite &= (v[i] - v[i] == T(0));  // NaN for NaN and +-inf
  return finite != 0;
}

// Backward-input of a stride-1 convolution is a forward convolution of grad_y with the kernel flipped
// and its channel axes swapped, padded by (R-1)*dilation - pad: the transposed convolution. Its shape,
// or nothing where that padding would be negative.
std::optional<Conv2dShape> transposed_convolution_shape(const Conv2dShape& s) {
  const Window2d& win = s.win;
  if (win.stride_h != 1 || win.stride_w != 1) return std::nullopt;
  const int64_t extent_h = (s.R - 1) * win.dilation_h, extent_w = (s.S - 1) * win.dilation_w;
  if (std::max(win.pad_top, win.pad_bottom) > extent_h || std::max(win.pad_left, win.pad_right) > extent_w)
    return std::nullopt;
  Conv2dShape t;
  t.N = s.N, t.C = s.K, t.H = s.P, t.W = s.Q, t.K = s.C, t.R = s.R, t.S = s.S, t.groups = s.groups;
  t.win.dilation_h = win.dilation_h, t.win.dilation_w = win.dilation_w;
  t.win.pad_top = extent_h - win.pad_top, t.win.pad_bottom = extent_h - win.pad_bottom;
  t.win.pad_left = extent_w - win.pad_left, t.win.pad_right = extent_w - win.pad_right;
  t.validate();
  if (t.P != s.H || t.Q != s.W) return std::nullopt;  // cannot happen at stride 1; never a wrong shape
  return t;
}

// For 3x3 layers that take the Winograd path, the transposed convolution can too; its shape, or nothing.
std::optional<Conv2dShape> winograd_transposed_shape(const Conv2dShape& s, int64_t element_bytes) {
  if (!conv2d_winograd_chosen(s, element_bytes)) return std::nullopt;
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  if (!t || !winograd_applies(*t, element_bytes)) return std::nullopt;
  return t;
}

// x[2m] += even[m] for m < evens, x[2m + 1] += odd[m] for m < odds (restrict: no overlap checks).
template <typename T>
void add_pairs(const T* __restrict even, int64_t evens, const T* __restrict odd, int64_t odds, T* __restrict x) {
  const int64_t pairs = std::min(evens, odds);
  for (int64_t m = 0; m < pairs; ++m) {
    x[2 * m] += even[m];
    x[2 * m + 1] += odd[m];
  }
  if (evens > pairs) x[2 * pairs] += even[pairs];
}

// col2im_add at stride 2 across: per channel c, kernel row r and output row p, tap kw's run lands on every
// other column of one input row, from 2 * q + kw * dilation_w - pad_left, even or odd by that offset. Each
// run is added into that parity's half row (contiguous), then both halves into x in one interleaving pass:
// value by value at a stride of 2, CIFAR's stride-2 3x3 layers spent half their backward-input in col2im.
// Each cell receives its (c, r) entries' sum over kw, in col's row order, whatever the ranges.
template <typename T>
void col2im_add_by_pairs(const Conv2dShape& s, const T* col, int64_t row_stride, T* gx_g, int64_t p0, int64_t p1,
                         int64_t h0, int64_t h1, int64_t c0, int64_t c1) {
  const Window2d& win = s.win;
  const int64_t HW = s.H * s.W, sh = win.stride_h, evens = (s.W + 1) / 2, odds = s.W / 2;
  std::vector<T> halves(static_cast<size_t>(evens + odds));
  // Tap kw's run q in qs lands on halves[start + q] (the same for every row)
  struct TapRun {
    Range qs;
    int64_t start;
  };
  std::vector<TapRun> runs(static_cast<size_t>(s.S));
  for (int64_t kw = 0; kw < s.S; ++kw) {
    const int64_t w_off = kw * win.dilation_w - win.pad_left, parity = w_off & 1;
    runs[static_cast<size_t>(kw)] = {valid_outputs(w_off, 2, s.W, s.Q), parity * evens + (w_off - parity) / 2};
  }
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = s.R - 1; r >= 0; --r) {  // output rows p in ascending order: see col2im_add
      const int64_t h_off = r * win.dilation_h - win.pad_top;
      const Range ps = valid_outputs(h_off, sh, s.H, s.P);
      const Range in_rows = valid_outputs(h_off - h0, sh, h1 - h0, s.P);  // h in [h0, h1)
      const int64_t last = std::min({ps.end, p1, in_rows.end});
      for (int64_t p = std::max({ps.begin, p0, in_rows.begin}); p < last; ++p) {
        fill_short(halves.data(), evens + odds, T(0));
        const T* from = col + (c * s.R + r) * s.S * row_stride + (p - p0) * s.Q;
        T* half = halves.data();
        for (const TapRun& run : runs) {
          for (int64_t q = run.qs.begin; q < run.qs.end; ++q) half[run.start + q] += from[q];
          from += row_stride;
        }
        add_pairs(halves.data(), evens, halves.data() + evens, odds, gx_g + c * HW + (p * sh + h_off) * s.W);
      }
    }
}

// The adjoint of im2col: gx_g[c, h, w] += col[...] for every col entry that came from x, for output rows
// [p0, p1) (col holds their positions from column 0 on), input rows [h0, h1) and channels [c0, c1). Each
// cell receives its entries by ascending output row p (col's kernel rows r from last to first: p falls as r
// rises; at stride 2 across, each kernel row's entries summed first: col2im_add_by_pairs), so splitting the
// input rows or the channels among threads (disjoint writes), or taking blocks of output rows in turn,
// gives the same bits as one pass: a result that does not depend on the thread count, which picks between
// them (in kernel row order, one thread's blocks of output rows gave a resnet_stem-like layer at batch 1
// other bits than two threads' one pass).
template <typename T>
// col's rows are row_stride apart (PQ for one image's col; N*PQ when col holds the batch side by side).
void col2im_add(const Conv2dShape& s, const T* col, int64_t row_stride, T* gx_g, int64_t p0, int64_t p1,
                int64_t h0 = 0, int64_t h1 = -1, int64_t c0 = 0, int64_t c1 = -1) {
  const int64_t HW = s.H * s.W, sh = s.win.stride_h, sw = s.win.stride_w;
  if (h1 < 0) h1 = s.H;
  if (c1 < 0) c1 = s.C_per_group();
  if (sw == 2) return col2im_add_by_pairs(s, col, row_stride, gx_g, p0, p1, h0, h1, c0, c1);
  const auto add_segment = [&](int64_t row, int64_t c, Range ps, Range qs, int64_t h_off, int64_t w_off) {
    const T* in = col + row * row_stride;
    const Range in_rows = valid_outputs(h_off - h0, sh, h1 - h0, s.P);  // h in [h0, h1)
    const int64_t first = std::max({ps.begin, p0, in_rows.begin});
    for (int64_t p = first; p < std::min({ps.end, p1, in_rows.end}); ++p) {
      const T* i = in + (p - p0) * s.Q;
      T* xr = gx_g + c * HW + (p * sh + h_off) * s.W + w_off;
      for (int64_t q = qs.begin; q < qs.end; ++q) xr[q * sw] += i[q];
    }
  };
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = s.R - 1; r >= 0; --r) {
      const int64_t row = (c * s.R + r) * s.S;
      for_each_col_segment(s, row, row + s.S, add_segment);
    }
}

}  // namespace

bool conv2d_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return winograd_enabled.load() && winograd_applies(s, element_bytes);
}

bool conv2d_backward_input_small_group_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  return t && conv2d_small_group_winograd_chosen(*t, element_bytes);
}

bool conv2d_backward_input_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return winograd_transposed_shape(s, element_bytes).has_value();
}

bool conv2d_backward_weight_winograd_chosen(const Conv2dShape& s, bool sums_in_registers) {
  return winograd_enabled.load() && winograd_backward_weight_applies(s, sums_in_registers);
}

bool conv2d_backward_weight_winograd_f2_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return winograd_enabled.load() && winograd_backward_weight_f2_applies(s, element_bytes);
}

bool conv2d_backward_weight_winograd_rows_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return winograd_enabled.load() && winograd_backward_weight_rows_applies(s, element_bytes);
}

bool conv2d_backward_weight_winograd_in_registers_chosen(const Conv2dShape& s, int64_t) {
  return conv2d_backward_weight_winograd_chosen(s) && winograd_backward_weight_in_registers(s);
}

bool set_conv_algorithm(const char* name) {
  if (std::strcmp(name, "auto") != 0 && std::strcmp(name, "gemm") != 0) return false;
  winograd_enabled.store(std::strcmp(name, "auto") == 0);
  return true;
}

const char* conv_algorithm() { return winograd_enabled.load() ? "auto" : "gemm"; }

namespace {

// Layers with output rows shorter than this (resnet_3x3_512's 7) gather col's strips from padded copies of
// the images (GatheredColumns): im2col's packer, which copies whole strips only where they lie in one
// output row, went there a few values at a time (a quarter of that layer's forward at batch 1).
constexpr int64_t kGatherMaxQ = 32;

bool gathers_columns(const Conv2dShape& s, int64_t element_bytes) {
  const PhaseSplitCopy copy(s);
  // Only where windows overlap (as conv_rows.cpp's rule): a 1x1 stride-2 layer's copy holds 4x what it
  // reads, and gathering from it ran resnet's 256 -> 512 downsampling at batch 1 11 % slower.
  return !is_pointwise(s) && s.Q < kGatherMaxQ && s.R * s.S >= 2 * s.win.stride_h * s.win.stride_w &&
         PhaseSplitCopy::fits(s) &&
         double(s.N * s.groups) * double(copy.size) * double(element_bytes) <= double(int64_t(64) << 20);
}

// Phase-split copies of every image and group of x, item n * groups + g at the result + item * copy.size,
// in the calling thread's buffer (forward's gathered columns or backward-weight's runs: no call uses both).
// Threads split the items' rows too, so that one image's copy is shared among them.
template <typename T>
T* fill_copies(const Conv2dShape& s, const PhaseSplitCopy& copy, const T* x, bool parallel) {
  const int64_t G = s.groups, Cg = s.C_per_group(), items = s.N * G, copy_rows = Cg * copy.rows;
  T* copies = reusable_buffer<T, 3>(items * copy.size);
  const int64_t parts = std::max<int64_t>(1, 4 * available_threads() / items);
  for_each_index(items * parts, parallel, [&](int64_t i) {
    const int64_t item = i / parts, part = i % parts;
    fill_rows(s, copy, x + (item / G * s.C + item % G * Cg) * s.H * s.W, copy_rows * part / parts,
              copy_rows * (part + 1) / parts, copies + item * copy.size);
  });
  return copies;
}

// The copies (fill_copies) and the offset tables of their CopyGather.
template <typename T>
struct GatheredColumns {
  PhaseSplitCopy copy;
  std::vector<int64_t> taps, columns;
  int64_t groups;
  T* copies;

  GatheredColumns(const Conv2dShape& s, const T* x, bool parallel)
      : copy(s), taps(tap_offsets(s, copy)), columns(static_cast<size_t>(s.N * s.P * s.Q)), groups(s.groups),
        copies(fill_copies(s, copy, x, parallel)) {
    for (int64_t n = 0, j = 0; n < s.N; ++n)
      for (int64_t p = 0; p < s.P; ++p)
        for (int64_t q = 0; q < s.Q; ++q)
          columns[static_cast<size_t>(j++)] = n * groups * copy.size + copy.output_row_offset(p) + q;
  }
  // col of group g over the batch, or from image n on (its columns counted from 0), from row first_tap on.
  CopyGather<T> of_group(int64_t g, int64_t n = 0, int64_t first_tap = 0) const {
    return {copies + (n * groups + g) * copy.size, taps.data() + first_tap, columns.data()};
  }
};

// Few output positions per image (resnet_3x3_512's 7x7): one GEMM per group over the whole batch,
// (K/g x N*PQ) = w_g * col, so each thread packs the weights once rather than once per image and the
// register tiles are full; the result goes through a buffer into y's (n, k, pq) order. Not pointwise
// layers, whose GEMM per image reads both w and x in place: at batch 8, 1.06-1.7x faster so on 7x7 to
// 28x28 (256 -> 512 channels on 28x28 4.4 -> 3.4 ms, 384 -> 64 on 14x14 0.31 -> 0.19; 512 -> 2048 on 7x7
// level).
constexpr int64_t kBatchGemmMaxPQ = 1024;

template <typename T>
void forward_as_batch_gemm(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const int64_t Cg = s.C_per_group(), Kg = s.K_per_group(), CRS = Cg * s.R * s.S, PQ = s.P * s.Q;
  const int64_t columns = s.N * PQ, HW = s.H * s.W;
  T* out = reusable_buffer<T, 1>(Kg * columns);  // written by each group's GEMM before it is read
  std::optional<GatheredColumns<T>> gathered;
  if (gathers_columns(s, sizeof(T))) gathered.emplace(s, x, true);
  for (int64_t g = 0; g < s.groups; ++g) {
    const Im2colSource<T> col{&s, x + g * Cg * HW, 0};
    const CopyGather<T> gather = gathered ? gathered->of_group(g) : CopyGather<T>{};
    const BPacker<T> B = gathered ? BPacker<T>{conv_packers<T>().copy_gather, &gather}
                                  : BPacker<T>{conv_packers<T>().col, &col};
    gemm_parallel<T>(Kg, columns, CRS, w + g * Kg * CRS, {CRS, 1}, B, out, columns, false);
#pragma omp parallel for schedule(static) if (s.N * Kg * PQ >= kMinParallelWork)
    for (int64_t nk = 0; nk < s.N * Kg; ++nk) {
      const int64_t n = nk / Kg, k = nk % Kg;
      const T b = bias ? bias[g * Kg + k] : T(0);
      const T* from = out + k * columns + n * PQ;
      T* to = y + (n * s.K + g * Kg + k) * PQ;
      for (int64_t i = 0; i < PQ; ++i) to[i] = from[i] + b;
    }
  }
}

}  // namespace

bool conv2d_forward_by_rows_chosen(const Conv2dShape& s, int64_t element_bytes) {
  if (sums_directly(s) || is_pointwise(s) || conv2d_forward_channels_last_chosen(s, element_bytes)) return false;
  return conv2d_forward_reads_wide_rows(s, element_bytes) ||
         (!(s.N > 1 && s.P * s.Q < kBatchGemmMaxPQ) && conv2d_forward_by_rows_applies(s, element_bytes));
}

template <typename T>
void conv2d_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  // An empty batch has nothing to compute; some paths below divide by a count of tiles or images (float64
  // 64 -> 64 channels on 8x8 at batch 0 died of SIGFPE).
  if (s.N == 0) return;
  if (conv2d_forward_by_phases_chosen(s, sizeof(T))) return conv2d_forward_by_phases(s, x, w, bias, y);
  if (conv2d_forward_per_group_chosen(s, sizeof(T))) return conv2d_forward_per_group(s, x, w, bias, y);
  // Both check y as they write it; the paths below recompute a y that came out not finite (see all_finite).
  if (conv2d_winograd_chosen(s, sizeof(T))) {
    if (conv2d_winograd(s, x, WinogradFilters<T>{w, s.C * 9, 9, false}, bias, y)) return;
  } else if (conv2d_forward_split_winograd(s, x, w, bias, y)) {
    return;
  }
  if (conv2d_small_group_winograd_chosen(s, sizeof(T)) &&
      conv2d_small_group_winograd(s, x, WinogradFilters<T>{w, s.C_per_group() * 9, 9, false}, bias, y))
    return;
  if (conv2d_small_groups_directly_chosen(s, sizeof(T))) return conv2d_forward_small_groups_directly(s, x, w, bias, y);
  // Before the direct sums: it takes some of their grouped layers (channels_last_conv.cpp).
  if (conv2d_forward_channels_last_chosen(s, sizeof(T))) return conv2d_forward_channels_last(s, x, w, bias, y);
  if (conv2d_depthwise_channels_last_chosen(s, sizeof(T))) return conv2d_depthwise_forward(s, x, w, bias, y);
  if (sums_directly(s)) return conv2d_forward_direct(s, x, w, bias, y);
  if (conv2d_forward_subsampled(s, x, w, bias, y)) return;
  if (conv2d_forward_by_rows_chosen(s, sizeof(T))) return conv2d_forward_by_rows(s, x, w, bias, y);
  if (s.N > 1 && s.P * s.Q < kBatchGemmMaxPQ && !is_pointwise(s)) return forward_as_batch_gemm(s, x, w, bias, y);
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group();
  const int64_t CRS = Cg * s.R * s.S, PQ = s.P * s.Q, HW = s.H * s.W, items = s.N * G;
  const bool pointwise = is_pointwise(s);
  const bool per_item_threads = items >= available_threads();  // else the GEMM itself goes parallel
  const bool worth_threads = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;  // double: no overflow
  std::optional<GatheredColumns<T>> gathered;  // only where the GEMM of each item goes parallel: one copy
  if (!per_item_threads && gathers_columns(s, sizeof(T))) gathered.emplace(s, x, worth_threads);
  ParallelErrors errors;
  for_each_index(items, per_item_threads && items > 1 && worth_threads, [&](int64_t item) {
    errors.run([&] {
      const int64_t n = item / G, g = item % G;
      const T* x_g = x + (n * s.C + g * Cg) * HW;
      T* y_g = y + (n * s.K + g * Kg) * PQ;
      const T* A = w + g * Kg * CRS;
      if (pointwise) {  // col is x itself
        if (per_item_threads)
          gemm<T>(Kg, PQ, CRS, A, {CRS, 1}, x_g, {PQ, 1}, y_g, PQ, false, ReadA::rows_in_place);
        else
          gemm_parallel<T>(Kg, PQ, CRS, A, {CRS, 1}, x_g, {PQ, 1}, y_g, PQ, false, ReadA::rows_in_place);
      } else {
        const Im2colSource<T> col{&s, x_g, 0};
        const CopyGather<T> gather = gathered ? gathered->of_group(g, n) : CopyGather<T>{};
        const BPacker<T> B = gathered ? BPacker<T>{conv_packers<T>().copy_gather, &gather}
                                      : BPacker<T>{conv_packers<T>().col, &col};
        if (per_item_threads)
          gemm<T>(Kg, PQ, CRS, A, {CRS, 1}, B, y_g, PQ, false, ReadA::rows_in_place);
        else
          gemm_parallel<T>(Kg, PQ, CRS, A, {CRS, 1}, B, y_g, PQ, false, ReadA::rows_in_place);
      }
      if (bias)
        for (int64_t k = 0; k < Kg; ++k) {
          const T b = bias[g * Kg + k];
          for (T *v = y_g + k * PQ, *e = v + PQ; v < e; ++v) *v += b;
        }
    });
  });
  errors.rethrow();
}

namespace {

// Backward-input as the transposed convolution on the Winograd path (winograd_transposed_shape).
// Returns false when it does not apply, or when its result is not finite (then grad_x is to be recomputed).
template <typename T>
bool backward_input_as_winograd(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const std::optional<Conv2dShape> t = winograd_transposed_shape(s, sizeof(T));
  if (!t) return false;
  // Filter (c, k) of the transposed convolution is w[k][c] rotated 180 degrees.
  // It checks grad_x as it writes it; if not finite, the GEMM path recomputes it (see all_finite).
  return conv2d_winograd<T>(*t, grad_y, WinogradFilters<T>{w, 9, s.C * 9, true}, nullptr, grad_x);
}

// Few output positions per image (resnet_3x3_512's 7x7), as in forward_as_batch_gemm: one GEMM per
// group over the whole batch, col (C/g*R*S x N*PQ) = w_g^T * GY_g, the weights packed once per thread
// rather than once per image; then each image's columns are added back into grad_x (col2im). Where it can,
// the GEMM writes col by blocks of whole channels, about 512 KB each, and col2im adds each block into those
// channels of grad_x right after (gemm_parallel_row_blocks), while it is in the thread's L2: written whole
// (14.4 MB for 256 channels 3x3 stride 2 from 28x28 at batch 8) and read back, col went out to memory, and
// col2im, its reads stalled, took a quarter of that layer's time. By blocks (ab.py, torch's backward-input
// between calls, batch 8, ms): 256 -> 256 channels 3x3 stride 2 from 28x28 5.84 -> 5.08, 512 -> 512 21.3
// -> 17.7, 128 -> 256 2.75 -> 2.62, 256 -> 256 from 14x14 level (float64 3.42 -> 2.74).
template <typename T>
struct BatchCol2im {
  const Conv2dShape* s;
  const T* col;
  int64_t columns;
  T* grad_x_g;  // the group's first channel of image 0
  // Rows [i0, i1) of col (whole channels) into grad_x, each image's channels zeroed first.
  static void add_rows(void* ctx, int64_t i0, int64_t i1) {
    const auto& b = *static_cast<const BatchCol2im*>(ctx);
    const Conv2dShape& s = *b.s;
    const int64_t taps = s.R * s.S, c0 = i0 / taps, c1 = i1 / taps, HW = s.H * s.W, PQ = s.P * s.Q;
    for (int64_t n = 0; n < s.N; ++n) {
      T* gx = b.grad_x_g + n * s.C * HW;
      std::fill(gx + c0 * HW, gx + c1 * HW, T(0));
      col2im_add(s, b.col + n * PQ, b.columns, gx, 0, s.P, 0, s.H, c0, c1);
    }
  }
};

template <typename T>
void backward_input_as_batch_gemm(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const int64_t Cg = s.C_per_group(), Kg = s.K_per_group(), CRS = Cg * s.R * s.S, PQ = s.P * s.Q;
  const int64_t columns = s.N * PQ, HW = s.H * s.W;
  T* col = reusable_buffer<T, 2>(CRS * columns);  // written by each group's GEMM before it is read
  // Blocks of about 512 KB of col in whole register strips of every build (24 rows: 8 channels of 3x3 taps;
  // 9 channels' 81 rows left a 1-row strip in every block), two a group at least (ResNeXt's 8 channels a
  // group in one block: 0.49 -> 0.53 ms, each group's GEMM on one thread). Not where that leaves no whole
  // strip of channels (128 channels 3x3 stride 2 from 56x56 at batch 8, 2 channels a block: 6.4 -> 6.9 ms),
  // nor pointwise layers, whose col2im is a copy (2048 <-> 512 on 7x7: 2.2 -> 2.6 ms, blocks of 312 and 200
  // rows).
  const int64_t taps = s.R * s.S, unit = 24 / std::gcd<int64_t>(taps, 24);
  const int64_t block_channels =
      std::min(Cg, (int64_t(512) << 10) / (taps * std::max<int64_t>(1, columns) * int64_t(sizeof(T))) / unit * unit);
  const bool by_blocks = !is_pointwise(s) && block_channels > 0 && Cg >= 2 * block_channels &&
                         gemm_shares_packed_b<T>(columns, Kg);
  if (!by_blocks) std::fill(grad_x, grad_x + s.x_numel(), T(0));
  for (int64_t g = 0; g < s.groups; ++g) {
    const BatchGradOut<T> gy{&s, grad_y + g * Kg * PQ};
    const BPacker<T> B{conv_packers<T>().batch_grad_out, &gy};
    // A = w_g^T: element (crs, k) at w[(g * Kg + k) * CRS + crs]
    if (by_blocks) {
      BatchCol2im<T> add{&s, col, columns, grad_x + g * Cg * HW};
      gemm_parallel_row_blocks<T>(CRS, columns, Kg, w + g * Kg * CRS, {1, CRS}, B, col, columns,
                                  block_channels * taps, &BatchCol2im<T>::add_rows, &add);
      continue;
    }
    gemm_parallel<T>(CRS, columns, Kg, w + g * Kg * CRS, {1, CRS}, B, col, columns, false);
#pragma omp parallel for schedule(static) if (s.N > 1 && CRS * columns >= kMinParallelWork)
    for (int64_t n = 0; n < s.N; ++n) col2im_add(s, col + n * PQ, columns, grad_x + (n * s.C + g * Cg) * HW, 0, s.P);
  }
}

}  // namespace

// Backward-input of a stride-1 layer as the transposed convolution through conv2d_forward, with the
// weights flipped and their channel axes swapped into a buffer (K x C/g x R x S values). The forward's
// paths read their inputs from padded copies or gather them; col2im adds every column back into grad_x,
// R x S scattered adds per value: 45 % of a 5x5 64-channel layer's backward-input. Taken where that
// costs most (at least 10 taps; 7 to 9 with 16 channels or more in and out and at most 4 MiB of weights;
// or dilated windows) and the transposed pass does no more work: padding
// close to 'same' (H*W at most 1.15 P*Q; a 'valid' 5x5 layer's transposed pass sums the full
// correlation, 36 % more products), whole images per thread or wide rows (a 5x5 64-channel image at
// batch 1, its rows split among the threads one GEMM per row, ran 20 % slower than col2im), the
// transposed padding (R-1)*dh - pad not negative.
// Measured against col2im (float32, batch 8): 7x7 32 channels 56x56 14.7 -> 6.2 ms, 5x5 64 channels
// 28x28 6.0 -> 4.1, 5x5 128 channels 17.7 -> 13.3, 3x3 dilation 4 3.35 -> 2.72, dilation 2 5.3 -> 4.9;
// 4x4 64 channels 28x28 2.73 -> 2.03, 5x3 2.62 -> 1.72, 3x5 32 channels 0.71 -> 0.50, 7x3 128 channels
// 17x17 5.6 -> 4.1 (float64 4x4 6.6 -> 3.3); since the forward runs 1x7 channels-last
// (channels_last_conv.cpp), 1x7 and 7x1 with 128 channels on 17x17 1.34 -> 1.32 and 1.47 -> 1.33 (float64
// 3.3 -> 3.0, 3.2 -> 2.7), 1x7 with 64 channels on 28x28 4.2 -> 4.0, 2x4 1.21 -> 1.04, 3x3 with 64
// channels on 3x3 0.106 -> 0.080 (not on Winograd: too few tiles). Not taken: 3x3 undilated with few
// channels (3 -> 64 on 32x32 1.09 -> 2.24 ms, 4 -> 16 0.058 -> 0.076: col2im cheap, the transposed
// forward's output channels few), resnet_3x3_512 at batch 1 (3x slower: 9.4 MB of weights to flip; at
// batch 8, on the GEMM, 5.0 -> 6.1 ms, where 3x3 layers of 64 to 256 channels on 56x56 to 14x14 gained
// 1.04-1.4x). The rule is the shape's alone, whatever the thread count. The forward multiplies grad_y's zero
// padding by the weights, so they must be finite (else NaN where col2im's sums have no such term);
// grad_y's values reach only their own sums.
namespace {

std::optional<Conv2dShape> transposed_shape(const Conv2dShape& s, int64_t element_bytes) {
  const bool dilated = s.win.dilation_h > 1 || s.win.dilation_w > 1;
  const bool many_taps = s.R * s.S >= 10 || (s.R * s.S >= 7 && s.C_per_group() >= 16 && s.K_per_group() >= 16 &&
                                              double(s.w_numel()) * double(element_bytes) <= double(4 << 20));
  if (is_pointwise(s) || !(many_taps || dilated) || double(s.H * s.W) > 1.15 * double(s.P * s.Q))
    return std::nullopt;
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  // Whole images per thread means at least 2 (a rule that must not depend on the thread count, or the
  // bits of grad_x would); at batch 1, where the threads split the image's rows, only on conv_rows.cpp's
  // wide rows (7x7 32 channels 56x56 at batch 1: 0.55 -> 0.89 of torch's speed; 5x5 128 channels 64x64
  // 0.63 -> 0.93; a 4-dilated 3x3 on 32x32, per row, 0.85 -> 0.81 stays on col2im), or where the transposed
  // forward splits its kernel into 3x3 pieces on Winograd (split_kernel.cpp, whose sums do not depend on
  // the thread count either). 5x5 at batch 1, float32, torch's speed / ours: 64 -> 64 channels on 28x28
  // 0.69 -> 1.10, on 32x32 0.76 -> 1.30; 32 -> 64 0.76 -> 1.00; 192 -> 32 0.38 -> 1.19; 256 -> 256 0.70 ->
  // 0.89; float64 64 -> 64 1.47 -> 1.85.
  if (t && s.N * s.groups < 2 && !conv2d_forward_reads_wide_rows(*t, element_bytes) &&
      !conv2d_split_winograd_chosen(*t, element_bytes))
    return std::nullopt;
  return t;
}

}  // namespace

bool conv2d_backward_input_transposed_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return !conv2d_backward_input_winograd_chosen(s, element_bytes) && !sums_directly(s) &&
         transposed_shape(s, element_bytes).has_value();
}

namespace {

// The transposed convolution's weights: filter (g, c, k) is w's (g, k, c) rotated 180 degrees. In the calling
// thread's buffer, valid until its next call (a fresh vector's pages, faulted in on every call, had cost
// ResNeXt's last stage a tenth of its backward-input: 1.2 MB of weights).
template <typename T>
const T* transposed_weights(const Conv2dShape& s, const T* w) {
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group(), RS = s.R * s.S;
  T* flipped = reusable_buffer<T, 4>(s.w_numel());
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t k = 0; k < Kg; ++k) {
        const T* from = w + ((g * Kg + k) * Cg + c) * RS;
        T* to = flipped + ((g * Cg + c) * Kg + k) * RS;
        for (int64_t rs = 0; rs < RS; ++rs) to[rs] = from[RS - 1 - rs];
      }
  return flipped;
}

template <typename T>
bool backward_input_as_transposed_forward(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const std::optional<Conv2dShape> t = transposed_shape(s, sizeof(T));
  if (!t || !all_finite(w, s.w_numel())) return false;
  conv2d_forward(*t, grad_y, transposed_weights(s, w), static_cast<const T*>(nullptr), grad_x);
  return true;
}

// Backward-input of a layer summed directly, with finite weights (the direct sums' zero-filled columns of
// grad_y meet only weights). At stride 1, where the transposed convolution is summed directly too, as
// that forward: it sums only grad_x's own H rows (W + padding wide), where the direct backward-input
// sums its whole padded planes (9x9 for 7x7 images: 1.5x the products once the spans are rounded up).
// A/B, float32 batch 8: 1024 channels in 32 groups on 7x7 1.43 -> 1.06 ms, 512 in 32 groups on 14x14
// 0.83 -> 0.73, 64 in 2 groups 0.60 -> 0.57, LeNet 0.102 -> 0.098. Not depthwise layers (one channel in
// and out per group), whose own backward-input was as fast or faster (3x3 512 channels on 14x14: 0.26
// against 0.29).
template <typename T>
void backward_input_directly(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  if (t && sums_directly(*t) && !(s.C_per_group() == 1 && s.K_per_group() == 1))
    return conv2d_forward_direct(*t, grad_y, transposed_weights(s, w), static_cast<const T*>(nullptr), grad_x);
  conv2d_backward_input_direct(s, grad_y, w, grad_x);
}

// Backward-input of the stride-1 grouped layers that the channels-last backward-input takes, where their
// transposed forward runs channels-last too, with finite weights: as that forward, each grad_x value summed
// in the GEMM, in place of adding each tap's rows into grad_x (ResNeXt's last stage, 1024 channels in 32
// groups on 7x7 at batch 8: 0.76 -> 0.65 ms).
template <typename T>
bool backward_input_as_channels_last_forward(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  if (!t || !conv2d_forward_channels_last_chosen(*t, sizeof(T)) || !all_finite(w, s.w_numel())) return false;
  conv2d_backward_input_as_forward_channels_last(s, *t, grad_y, w, grad_x);
  return true;
}

// Grouped layers of one to four vectors of channels a group (small_group_conv.cpp) as the transposed
// forward on F(2x2, 3x3): true where grad_x came out finite (else the other paths recompute it; see all_finite).
template <typename T>
bool backward_input_as_small_group_winograd(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  if (!conv2d_backward_input_small_group_winograd_chosen(s, sizeof(T))) return false;
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  // The transposed layer's filter (c, k) is w's (k, c) rotated: k_stride 9, c_stride C/groups * 9.
  return conv2d_small_group_winograd(*t, grad_y, WinogradFilters<T>{w, 9, s.C_per_group() * 9, true},
                                     static_cast<const T*>(nullptr), grad_x);
}

// Depthwise on small planes (depthwise_conv.cpp): at stride 1 with finite weights as the transposed forward,
// each grad_x cell summed in registers, else as the reference's scatter.
template <typename T>
void depthwise_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const std::optional<Conv2dShape> t = transposed_convolution_shape(s);
  if (t && all_finite(w, s.w_numel()))
    return conv2d_depthwise_forward(*t, grad_y, transposed_weights(s, w), static_cast<const T*>(nullptr),
                                    grad_x);
  conv2d_depthwise_backward_input(s, grad_y, w, grad_x);
}

}  // namespace

template <typename T>
void conv2d_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  if (s.N == 0) return;  // nothing to compute (see conv2d_forward)
  if (conv2d_backward_input_by_phases_chosen(s, sizeof(T)))
    return conv2d_backward_input_by_phases(s, grad_y, w, grad_x);
  if (conv2d_backward_input_per_group_chosen(s, sizeof(T)))
    return conv2d_backward_input_per_group(s, grad_y, w, grad_x);
  if (backward_input_as_winograd(s, grad_y, w, grad_x)) return;
  if (backward_input_as_small_group_winograd(s, grad_y, w, grad_x)) return;
  if (conv2d_backward_input_small_groups_directly_chosen(s, sizeof(T)))
    return conv2d_backward_input_small_groups_directly(s, grad_y, w, grad_x);
  // Before the direct sums: it takes some of their grouped layers (channels_last_conv.cpp).
  if (conv2d_backward_input_channels_last_chosen(s, sizeof(T))) {
    if (backward_input_as_channels_last_forward(s, grad_y, w, grad_x)) return;
    return conv2d_backward_input_channels_last(s, grad_y, w, grad_x);
  }
  if (conv2d_depthwise_channels_last_chosen(s, sizeof(T))) return depthwise_backward_input(s, grad_y, w, grad_x);
  if (sums_directly(s) && all_finite(w, s.w_numel())) return backward_input_directly(s, grad_y, w, grad_x);
  if (backward_input_as_transposed_forward(s, grad_y, w, grad_x)) return;
  // One GEMM over the batch when packing the weights for every image would cost more than it saves:
  // many weights, few output positions (resnet_3x3_512; not LeNet, 150 weights for 576 positions).
  // Pointwise layers, whose GEMM per image writes grad_x in place (no col2im), only with far more weights
  // than positions: at batch 8, 2048 <-> 512 channels on 7x7 2.5 -> 2.0 ms, but 960 -> 160 on 7x7 0.33 ->
  // 0.39 and 256 -> 512 on 28x28 3.7 -> 4.4 (14x14 layers of 256 to 1024 channels: within 7 % either way).
  const int64_t weights = s.K_per_group() * s.C_per_group() * s.R * s.S;
  if (s.N > 1 && s.P * s.Q < kBatchGemmMaxPQ && weights >= (is_pointwise(s) ? 4096 : 64) * s.P * s.Q)
    return backward_input_as_batch_gemm(s, grad_y, w, grad_x);
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group();
  const int64_t CRS = Cg * s.R * s.S, PQ = s.P * s.Q, HW = s.H * s.W, items = s.N * G;
  const bool pointwise = is_pointwise(s);
  const int threads = available_threads();
  const bool per_item_threads = items >= threads;
  const bool worth_threads = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;  // double: no overflow
  // Pointwise with an image per thread: the weights (w^T, CRS x Kg a group) packed once, not in every
  // image's GEMM (1024 -> 256 channels on 14x14 at batch 8: packing was an eighth of the time).
  const PackedLayout layout = packed_layout<T>(CRS, Kg);
  T* packed = pointwise && per_item_threads ? reusable_buffer<T, 5>(G * layout.size()) : nullptr;
  if (packed)
    for_each_index(G, G > 1 && worth_threads, [&](int64_t g) {
      pack_a<T>(layout, w + g * Kg * CRS, {1, CRS}, packed + g * layout.size());
    });
  ParallelErrors errors;
  for_each_index(items, per_item_threads && items > 1 && worth_threads, [&](int64_t item) {
    errors.run([&] {
      const int64_t n = item / G, g = item % G;
      const T* gy_g = grad_y + (n * s.K + g * Kg) * PQ;
      T* gx_g = grad_x + (n * s.C + g * Cg) * HW;
      const T* A = w + g * Kg * CRS;  // read transposed: (crs, k) at k*CRS + crs
      if (pointwise) {                 // col has x's layout: written in place
        if (packed)
          gemm_packed<T>(layout, packed + g * layout.size(), PQ, gy_g, {PQ, 1}, gx_g, PQ, false);
        else
          gemm_parallel<T>(CRS, PQ, Kg, A, {1, CRS}, gy_g, {PQ, 1}, gx_g, PQ, false);
        return;
      }
      // Else col, in each thread's own buffer kept between calls; with an image per thread, by blocks of
      // output rows, each added into grad_x while it is still in L2 (about 512 KB: whole, resnet_stem's col
      // is 7.4 MB per thread in float32 and 15 MB in float64, and the threads' two went to memory). One
      // image split among the threads keeps its col whole up to 64 MiB: it fits in L3, and every block would
      // be a parallel region of its own; past that by blocks too (a 4x4096x4096 image's whole col had taken
      // 2.6 GB, kept after the call, and a 4x23171x23171 one 19 GB). Same bits either way (col2im_add).
      const int64_t row_bytes = CRS * s.Q * int64_t(sizeof(T));
      const int64_t rows = std::clamp<int64_t>((per_item_threads ? int64_t(512) << 10 : int64_t(64) << 20) / row_bytes,
                                               1, s.P);
      T* col = reusable_buffer<T, 0>(CRS * rows * s.Q);
      std::fill(gx_g, gx_g + Cg * HW, T(0));
      for (int64_t p0 = 0; p0 < s.P; p0 += rows) {
        const int64_t p1 = std::min(s.P, p0 + rows), columns = (p1 - p0) * s.Q;
        if (per_item_threads) {
          gemm<T>(CRS, columns, Kg, A, {1, CRS}, gy_g + p0 * s.Q, {PQ, 1}, col, columns, false);
          col2im_add(s, col, columns, gx_g, p0, p1);
          continue;
        }
        gemm_parallel<T>(CRS, columns, Kg, A, {1, CRS}, gy_g + p0 * s.Q, {PQ, 1}, col, columns, false);
        // The threads add disjoint bands of input rows (resnet_stem at batch 1: a third of the time, serial).
        // Every band visits all of col's rows, so each should hold a fair share of positions: not
        // resnet_3x3_512's 49, where 7 bands spent 4x the single pass on finding their ranges; with few
        // positions the threads take disjoint bands of channels instead (that layer's col2im at batch 1:
        // 8 % of its time, on one thread while the other waited).
        const int64_t bands = std::min<int64_t>({s.H, 4 * int64_t(threads), columns / 64});
        if (bands > 1) {
          for_each_index(bands, worth_threads, [&](int64_t i) {
            col2im_add(s, col, columns, gx_g, p0, p1, s.H * i / bands, s.H * (i + 1) / bands);
          });
          continue;
        }
        const int64_t channel_bands = std::min<int64_t>(Cg, threads);
        for_each_index(channel_bands, worth_threads && channel_bands > 1, [&](int64_t i) {
          col2im_add(s, col, columns, gx_g, p0, p1, 0, s.H, Cg * i / channel_bands, Cg * (i + 1) / channel_bands);
        });
      }
    });
  });
  errors.rethrow();
}

template <typename T>
void conv2d_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  if (s.N == 0) {  // a sum over no images (see conv2d_forward)
    std::fill(grad_w, grad_w + s.w_numel(), T(0));
    return;
  }
  if (conv2d_backward_weight_by_phases_chosen(s)) return conv2d_backward_weight_by_phases(s, grad_y, x, grad_w);
  if (conv2d_backward_weight_per_group_chosen(s, sizeof(T)))
    return conv2d_backward_weight_per_group(s, grad_y, x, grad_w);
  if (conv2d_backward_weight_small_groups_chosen(s, sizeof(T))) {
    conv2d_backward_weight_small_groups(s, grad_y, x, grad_w);
    if (all_finite(grad_w, s.w_numel())) return;  // else the paths below recompute grad_w (see all_finite)
  }
  // First: for grouped layers it takes the place of the direct sums (channels_last_conv.cpp).
  if (conv2d_backward_weight_channels_last_chosen(s, sizeof(T)))
    return conv2d_backward_weight_channels_last(s, grad_y, x, grad_w);
  if (conv2d_depthwise_weight_channels_last_chosen(s, sizeof(T)))
    return conv2d_depthwise_backward_weight(s, grad_y, x, grad_w);
  if (sums_weight_gradient_directly(s)) {
    conv2d_backward_weight_direct(s, grad_y, x, grad_w);
    if (all_finite(grad_w, s.w_numel())) return;  // else the GEMM below recomputes grad_w (see all_finite)
  }
  // The Winograd paths check their own result as they write it; if not finite, the GEMM below recomputes
  // grad_w (all_finite).
  if (conv2d_backward_weight_winograd_rows_chosen(s, sizeof(T))) {
    if (conv2d_backward_weight_winograd_rows(s, grad_y, x, grad_w)) return;
  } else if (conv2d_backward_weight_winograd_f2_chosen(s, sizeof(T))) {
    if (conv2d_backward_weight_winograd_f2(s, grad_y, x, grad_w)) return;
  } else if (conv2d_backward_weight_winograd_chosen(s)) {
    if (conv2d_backward_weight_winograd(s, grad_y, x, grad_w)) return;
  } else if (conv2d_backward_weight_split_winograd(s, grad_y, x, grad_w)) {
    if (all_finite(grad_w, s.w_numel())) return;  // else the GEMM below recomputes grad_w (see all_finite)
  } else if (conv2d_backward_weight_reads_wide_rows(s, sizeof(T))) {
    conv2d_backward_weight_wide(s, grad_y, x, grad_w);
    if (all_finite(grad_w, s.w_numel())) return;  // else the GEMM below recomputes grad_w (kernels.hpp)
  }
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group();
  const int64_t CRS = Cg * s.R * s.S, PQ = s.P * s.Q;
  // One GEMM per work unit = (group, block of crs columns of grad_w, half of the batch): each sums its
  // half's n*PQ + pq in order into its own partial gradient, and the two halves are added at the end.
  // Halving the batch rather than the columns halves the packing: every column block packs all of the
  // group's grad_y rows again, every batch half only its own. Worth it where grad_y is large next to
  // grad_w (resnet_stem: 100352 positions for 147 columns; not resnet_3x3_512: 392 for 4608). The
  // halves depend on the shape alone, so the sum order never depends on the thread count.
  const int threads = available_threads();
  const int64_t halves = s.N >= 2 && s.N * PQ >= 8 * CRS ? 2 : 1;
  // As few column blocks as keep every thread busy.
  const int64_t per_block = G * halves;
  const int64_t blocks_per_group = std::max<int64_t>(1, std::min<int64_t>(CRS, (threads + per_block - 1) / per_block));
  const int64_t cols_per_block = (CRS + blocks_per_group - 1) / blocks_per_group;
  const int64_t units = G * blocks_per_group * halves;
  std::vector<T> second_half(static_cast<size_t>(halves > 1 ? s.w_numel() : 0));
  const bool parallel = units > 1 && double(s.N * G) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;
  // Where col's rows are runs of x itself (pointwise layers: channel c at c * H*W) or of phase-split copies
  // of it (the layers forward reads by rows, resnet_stem: one copy per image and group, made first, at most
  // 64 MiB in all), COL^T's strips are transposed straight from those runs: packing them through
  // im2col's rows was a fifth of resnet_stem's time and two fifths of resnet_1x1_256_64's.
  const bool pointwise = is_pointwise(s);
  const PhaseSplitCopy copy(s);
  const bool from_copies = !pointwise && conv2d_forward_by_rows_applies(s, sizeof(T)) &&
                           double(s.N * G) * double(copy.size) * double(sizeof(T)) <= double(int64_t(64) << 20);
  std::vector<int64_t> taps;
  const T* runs = nullptr;  // image n's runs of group g at runs + n * image_stride + g * group_stride
  int64_t group_stride = 0, image_stride = 0, row_stride = 0;
  if (pointwise) {
    for (int64_t c = 0; c < Cg; ++c) taps.push_back(c * s.H * s.W);
    runs = x, group_stride = Cg * s.H * s.W, image_stride = s.C * s.H * s.W, row_stride = s.W;
  } else if (from_copies) {
    taps = tap_offsets(s, copy);
    runs = fill_copies(s, copy, x, parallel), group_stride = copy.size, image_stride = G * copy.size;
    row_stride = copy.output_row_offset(1);
  }
  // Output rows too short for such runs (resnet_3x3_512's 7): COL^T's strips gathered from the copies.
  std::optional<GatheredColumns<T>> gathered;
  if (!pointwise && !from_copies && gathers_columns(s, sizeof(T))) gathered.emplace(s, x, parallel);
  ParallelErrors errors;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t unit = 0; unit < units; ++unit) {
    errors.run([&] {
      const int64_t half = unit % halves, block = unit / halves % blocks_per_group;
      const int64_t g = unit / halves / blocks_per_group;
      const int64_t col0 = block * cols_per_block, col1 = std::min(CRS, col0 + cols_per_block);
      if (col1 <= col0) return;
      const int64_t n0 = half * (s.N / 2), n1 = halves > 1 && half == 0 ? s.N / 2 : s.N;
      const GradOutRows<T> gy{&s, grad_y + n0 * s.K * PQ, g};
      const BatchColTransposed<T> col_t{&s, x + n0 * s.C * s.H * s.W, g, col0};
      const BatchCopyTransposed<T> copy_t{&s, runs + n0 * image_stride + g * group_stride, image_stride, row_stride,
                                          taps.data(), col0};
      const CopyGather<T> gather = gathered ? gathered->of_group(g, n0, col0) : CopyGather<T>{};
      const BPacker<T> col_transposed = runs       ? BPacker<T>{conv_packers<T>().batch_copy_transposed, &copy_t,
                                                                conv_packers<T>().batch_copy_transposed_runs}
                                        : gathered ? BPacker<T>{conv_packers<T>().copy_gather_transposed, &gather}
                                                   : BPacker<T>{conv_packers<T>().batch_col_transposed, &col_t};
      T* out = (half == 0 ? grad_w : second_half.data()) + g * Kg * CRS + col0;
      // out[:, col0:col1] = GY_g (Kg x n*PQ) * COL^T[:, col0:col1] (n*PQ x cols), n over [n0, n1)
      const APacker<T> gy_rows{conv_packers<T>().grad_out_rows, &gy, conv_packers<T>().grad_out_rows_runs};
      gemm<T>(Kg, col1 - col0, (n1 - n0) * PQ, gy_rows, col_transposed, out, CRS, false);
    });
  }
  errors.rethrow();
  if (halves > 1) {
    const int64_t count = s.w_numel();
#pragma omp parallel for schedule(static) if (count >= kMinParallelWork)
    for (int64_t i = 0; i < count; ++i) grad_w[i] += second_half[static_cast<size_t>(i)];
  }
}

template <typename T>
void conv2d_backward_bias(const Conv2dShape& s, const T* grad_y, T* grad_b) {
  const int64_t PQ = s.P * s.Q;
#pragma omp parallel for schedule(static) if (s.K > 1 && s.y_numel() >= kMinParallelWork)
  for (int64_t k = 0; k < s.K; ++k) {
    double sum = 0;  // wide accumulator: N*P*Q terms, fixed order
    for (int64_t n = 0; n < s.N; ++n) {
      const T* v = grad_y + (n * s.K + k) * PQ;
      for (int64_t i = 0; i < PQ; ++i) sum += double(v[i]);
    }
    grad_b[k] = T(sum);
  }
}

#define PYKERNELS_INSTANTIATE(T)                                                             \
  template void conv2d_forward<T>(const Conv2dShape&, const T*, const T*, const T*, T*);     \
  template void conv2d_backward_input<T>(const Conv2dShape&, const T*, const T*, T*);        \
  template void conv2d_backward_weight<T>(const Conv2dShape&, const T*, const T*, T*);       \
  template void conv2d_backward_bias<T>(const Conv2dShape&, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
