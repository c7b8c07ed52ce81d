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
#include "cpu/phase_split_copy.hpp"

namespace pykernels::cpu {

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
        rows_of(item, own, 0, s.P);
      });
    });
  } else {  // fewer items than threads (batch 1): the threads share each item's copy and its rows
    T* shared = reusable_buffer<T, 1>(copy.size);
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
