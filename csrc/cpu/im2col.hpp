// The convolution's GEMM operands formed on the fly (implicit GEMM): packers that write im2col columns,
// grad_y's rows and their transposes straight into the GEMM's packed layouts (gemm.hpp's APacker and
// BPacker), so col is never stored. They are compiled once per instruction set (im2col_impl.inc), like
// the GEMM: on resnet_stem, whose GEMM has a small side, packing is a quarter to a half of the time, and
// the baseline build moved four floats at a time.
#pragma once

#include <cstdint>

#include "common/shapes.hpp"
#include "cpu/gemm.hpp"

namespace pykernels::cpu {

// One group of x, as the GEMM's B operand. Forward reads it as col (rows crs, columns n*PQ + pq from the
// image at x_g); backward-weight as col^T of one image (rows pq, columns crs, starting at column_base).
template <typename T>
struct Im2colSource {
  const Conv2dShape* s;
  const T* x_g;
  int64_t column_base;
};

// grad_y of one group as A: rows are the group's output channels, columns n*PQ + pq.
template <typename T>
struct GradOutRows {
  const Conv2dShape* s;
  const T* grad_y;
  int64_t g;
};

// x of one group as B = col^T over the whole batch: rows n*PQ + pq, columns crs from column_base.
template <typename T>
struct BatchColTransposed {
  const Conv2dShape* s;
  const T* x;
  int64_t g;
  int64_t column_base;
};

// The same col^T from phase-split copies of x (phase_split_copy.hpp), whose im2col rows are runs in place:
// image n's copy of the group at copies + n * copy_stride (n counted from the first image of the
// GEMM), output row p's runs p * row_stride further on, col row crs at tap_offsets[crs] from there.
template <typename T>
struct BatchCopyTransposed {
  const Conv2dShape* s;
  const T* copies;
  int64_t copy_stride, row_stride;
  const int64_t* tap_offsets;
  int64_t column_base;
};

// col over the batch gathered value by value from phase-split copies of x (phase_split_copy.hpp), for
// layers whose output rows are too short for a register strip to lie in one: row crs at
// copies + tap_offsets[crs], column n*PQ + pq (image n's copy, output row p, column q) column_offsets[n*PQ
// + pq] further on.
template <typename T>
struct CopyGather {
  const T* copies;
  const int64_t* tap_offsets;
  const int64_t* column_offsets;
};

// grad_y of one group over the whole batch as a GEMM's B: rows k, columns n*PQ + pq.
template <typename T>
struct BatchGradOut {
  const Conv2dShape* s;
  const T* grad_y_g;  // grad_y + g * Kg * PQ
};

// grad_y of one image and group as B of backward-weight on wide rows (conv_rows.cpp): row j is wide position
// p * width + q of the phase-split copy's output rows, holding the Kg output channels' values at (p, q), and
// zeros where q >= Q (the columns past an output row, whose products are dropped).
template <typename T>
struct WideGradOut {
  const Conv2dShape* s;
  const T* grad_y_g;  // grad_y + (n * K + g * Kg) * PQ
  int64_t width;
};

// The packers of one instruction-set build; conv_packers<T>() gives the active one's.
template <typename T>
struct ConvPackers {
  decltype(BPacker<T>::pack) col;                   // B = col of one group from an Im2colSource
  decltype(BPacker<T>::pack) batch_col_transposed;  // B = col^T over the batch from a BatchColTransposed
  decltype(BPacker<T>::pack) batch_copy_transposed;  // the same from a BatchCopyTransposed
  decltype(BPacker<T>::source_runs) batch_copy_transposed_runs;  // the runs of x or its copy that it reads
  decltype(APacker<T>::pack) grad_out_rows;         // A = grad_y's rows over the batch from a GradOutRows
  decltype(APacker<T>::source_runs) grad_out_rows_runs;  // the runs of grad_y that it reads
  decltype(BPacker<T>::pack) batch_grad_out;        // B = grad_y over the batch from a BatchGradOut
  decltype(BPacker<T>::pack) copy_gather;           // B = col over the batch from a CopyGather
  decltype(BPacker<T>::pack) copy_gather_transposed;  // B = col^T over the batch from a CopyGather
  decltype(BPacker<T>::pack) wide_grad_out;         // B = grad_y at wide positions from a WideGradOut
};

template <typename T>
ConvPackers<T> conv_packers();

}  // namespace pykernels::cpu
