// Forward convolution without im2col packing: one GEMM per output row, whose B rows the micro-kernel
// reads in place from a padded copy of the input split into its stride phases.
//
// Output column q reads padded input column q*sw + kw*dw. Split each padded input row into sw phases
// (phase f holds padded columns f, f + sw, f + 2*sw, ...); then tap kw's inputs for q = 0, 1, 2, ... are
// one contiguous run, in phase (kw*dw) % sw from index (kw*dw) / sw on. So row (c, r, kw) of im2col's
// col, restricted to one output row p, is a run at a fixed offset from that row's start in the copy,
// and gemm_packed_rows multiplies it where it lies. The copy is about as large as x; im2col's packing
// moved R*S/(sh*sw) times as much (12x for resnet_stem, whose packing was a fifth of the forward time
// on AVX2).
#include <algorithm>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

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
std::vector<int64_t> tap_offsets(const Conv2dShape& s, const PhaseSplitCopy& copy) {
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
// padding are zero. Row index c * copy.rows + h.
template <typename T>
void fill_rows(const Conv2dShape& s, const PhaseSplitCopy& copy, const T* x_g, int64_t row0, int64_t row1, T* out) {
  const Window2d& win = s.win;
  const int64_t sw = win.stride_w;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t c = row / copy.rows, h = row % copy.rows - win.pad_top;
    T* o = out + row * sw * copy.width;
    if (h < 0 || h >= s.H) {
      std::fill(o, o + sw * copy.width, T(0));
      continue;
    }
    const T* in = x_g + (c * s.H + h) * s.W;
    for (int64_t f = 0; f < sw; ++f, o += copy.width) {
      // o[i] = x column i*sw + f - pad_left, zero outside [0, W)
      const int64_t first = f - win.pad_left;
      const int64_t begin = std::min(copy.width, first >= 0 ? 0 : (-first + sw - 1) / sw);
      const int64_t end = std::clamp(s.W - 1 - first < 0 ? 0 : (s.W - 1 - first) / sw + 1, begin, copy.width);
      std::fill(o, o + begin, T(0));
      const T* from = in + first;
      for (int64_t i = begin; i < end; ++i) o[i] = from[i * sw];
      std::fill(o + end, o + copy.width, T(0));
    }
  }
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
  return s.R * s.S >= 2 * win.stride_h * win.stride_w && s.Q >= 32 && footprint <= 192.0 * 1024;
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

  // Output rows [p0, p1) of one item from its copy.
  auto rows_of = [&](int64_t item, const T* from, int64_t p0, int64_t p1) {
    const int64_t n = item / G, g = item % G;
    T* y_g = y + (n * s.K + g * Kg) * PQ;
    for (int64_t p = p0; p < p1; ++p)
      gemm_packed_rows<T>(layout, packed.data() + g * layout.size(), s.Q, from + copy.output_row_offset(s, p),
                          offsets.data(), y_g + p * s.Q, PQ, false);
    if (bias)
      for (int64_t k = 0; k < Kg; ++k) {
        const T b = bias[g * Kg + k];
        for (T *v = y_g + k * PQ + p0 * s.Q, *e = y_g + k * PQ + p1 * s.Q; v < e; ++v) *v += b;
      }
  };
  auto x_of = [&](int64_t item) { return x + (item / G * s.C + item % G * Cg) * HW; };
  const int threads = available_threads();
  const bool worth_threads = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;
  const int64_t copy_rows = Cg * copy.rows;
  ParallelErrors errors;
  if (items >= threads) {  // one item per thread at a time, each with its own copy
    for_each_index(items, items > 1 && worth_threads, [&](int64_t item) {
      errors.run([&] {
        T* own = reusable_buffer<T, 0>(copy.size);
        fill_rows(s, copy, x_of(item), 0, copy_rows, own);
        std::fill(own + copy.size - kGemmMaxStripWidth, own + copy.size, T(0));
        rows_of(item, own, 0, s.P);
      });
    });
  } else {  // fewer items than threads (batch 1): the threads share each item's copy and its rows
    T* shared = reusable_buffer<T, 1>(copy.size);
    std::fill(shared + copy.size - kGemmMaxStripWidth, shared + copy.size, T(0));
    for (int64_t item = 0; item < items; ++item) {
      const int64_t chunks = std::min<int64_t>(copy_rows, 4 * threads);
      for_each_index(chunks, worth_threads, [&](int64_t i) {
        fill_rows(s, copy, x_of(item), copy_rows * i / chunks, copy_rows * (i + 1) / chunks, shared);
      });
      const int64_t parts = std::min<int64_t>(s.P, 4 * threads);
      for_each_index(parts, worth_threads, [&](int64_t i) {
        errors.run([&] { rows_of(item, shared, s.P * i / parts, s.P * (i + 1) / parts); });
      });
      errors.rethrow();
    }
  }
  errors.rethrow();
}

template void conv2d_forward_by_rows<float>(const Conv2dShape&, const float*, const float*, const float*, float*);
template void conv2d_forward_by_rows<double>(const Conv2dShape&, const double*, const double*, const double*,
                                             double*);

}  // namespace pykernels::cpu
