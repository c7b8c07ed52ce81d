// The one matrix-multiply every CPU conv pass is built on (no BLAS underneath: the kernels are ours).
//
//   C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N]
//
// A is read through a (row stride, column stride) pair, so a transposed operand costs nothing extra:
// packing reads it in whatever order it lies. B is either such a strided matrix or a BPacker, a
// function that writes any block of B straight into the packed layout: convolution uses that to
// form im2col columns on the fly (implicit GEMM) instead of materialising them. C is row-major with
// leading dimension ldc.
// Each element of C is summed over K in the same order whatever the thread count, so results are
// bit-for-bit identical run to run and between serial and parallel calls.
#pragma once

#include <cstdint>

namespace pykernels::cpu {

struct MatrixView {
  int64_t row_stride;
  int64_t col_stride;
};

// A matrix in memory through its strides, as the context of a StridedPackers' BPacker (or, given the
// transpose of A, of its APacker).
template <typename T>
struct StridedMatrix {
  const T* data;
  MatrixView view;
};

// B by blocks: pack(ctx, k0, kc, j0, nc, nr, out) writes rows [k0, k0+kc) x columns [j0, j0+nc) of B
// as strips of nr columns (strip s at out + s*kc*nr; for each k, nr consecutive values; columns past
// nc are zero). Optionally, where pack reads such a block as runs of memory (rows of a B read in place,
// or columns of x): source_runs(ctx, k0, kc, j0, nc, starts, run_bytes) puts the runs' first bytes in
// starts (at most max(kc, nc) of them) and their length in run_bytes, and returns how many; the GEMM
// prefetches the next block's runs while it multiplies the one before (gemm_impl.inc, NextPanelLines).
// They are only prefetched, never read: an approximate answer costs time, not correctness.
template <typename T>
struct BPacker {
  void (*pack)(const void* ctx, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int64_t nr, T* out);
  const void* ctx;
  int64_t (*source_runs)(const void* ctx, int64_t k0, int64_t kc, int64_t j0, int64_t nc, const char** starts,
                         int64_t* run_bytes) = nullptr;
};

// A by blocks: pack(ctx, i0, mc, k0, kc, mr, out) writes rows [i0, i0+mc) x columns [k0, k0+kc) of A as
// strips of mr rows (strip s at out + s*kc*mr; for each k, mr consecutive values; rows past mc zero).
// source_runs(ctx, i0, mc, k0, kc, starts, run_bytes): as BPacker's (at most max(mc, kc) runs).
template <typename T>
struct APacker {
  void (*pack)(const void* ctx, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int64_t mr, T* out);
  const void* ctx;
  int64_t (*source_runs)(const void* ctx, int64_t i0, int64_t mc, int64_t k0, int64_t kc, const char** starts,
                         int64_t* run_bytes) = nullptr;
};

// The packers of a StridedMatrix in one instruction-set build: b packs it as B; a packs A from a
// StridedMatrix of A^T (packing MR-row strips of A is packing MR-column strips of A^T).
template <typename T>
struct StridedPackers {
  decltype(BPacker<T>::pack) b;
  decltype(APacker<T>::pack) a;
  decltype(BPacker<T>::source_runs) b_runs;
};

// How a row-major A (column stride 1) that meets few columns of B is read: packed into register strips (the
// default), or in place (no packing, which was a tenth of resnet_3x3_512's forward at batch 1). In place,
// the last 1 to 3 columns of B are summed as dot products along K, in another order than packed: a
// caller must choose by the shape alone, never by the thread count, for results not to depend on it.
enum class ReadA { packed, rows_in_place };

// Serial GEMM on the calling thread.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, APacker<T> a, BPacker<T> b, T* C, int64_t ldc, bool accumulate);
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, BPacker<T> b, T* C, int64_t ldc,
          bool accumulate, ReadA read = ReadA::packed);
template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, BPacker<T> b, T* C, int64_t ldc,
                   bool accumulate, ReadA read = ReadA::packed);

// C = A * B (not accumulated) with the rows of C in blocks of block_rows (the last one shorter), the blocks
// split among the OpenMP threads and B packed once for all of them; after_block(ctx, i0, i1) runs on the
// thread that wrote rows [i0, i1) of C, right after it did, while they are still in its caches (backward-
// input adds its col's rows into grad_x there). Each C element sums over K in the serial order. B's packing
// is shared up to 16 MiB (the caller checks gemm_shares_packed_b); past that each block packs it again.
template <typename T>
void gemm_parallel_row_blocks(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, BPacker<T> b, T* C,
                              int64_t ldc, int64_t block_rows, void (*after_block)(void* ctx, int64_t i0, int64_t i1),
                              void* ctx);
// Whether gemm_parallel_row_blocks packs a K x N B once for all its blocks.
template <typename T>
bool gemm_shares_packed_b(int64_t N, int64_t K);

// Serial GEMM on the calling thread.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, const T* B, MatrixView b, T* C,
          int64_t ldc, bool accumulate, ReadA read = ReadA::packed);

// Same result, with the columns of C split among the OpenMP threads.
template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, const T* B, MatrixView b, T* C,
                   int64_t ldc, bool accumulate, ReadA read = ReadA::packed);

// A packed once for many GEMMs (Winograd's transformed filters against every chunk of tiles): the
// layout the active instruction set's GEMM reads, fixed when the layout is made. Depth blocks of kc
// columns follow each other; inside one, strips of mr rows, each holding mr consecutive values per
// column. Rows past `rows` up to a multiple of mr are padding and must be zero.
// The instruction-set builds of the hot loops (see active_isa below).
enum class Isa { portable, avx2, avx512 };

struct PackedLayout {
  Isa isa;  // the build the layout was made for; gemm_packed runs on that build
  int64_t rows, depth, mr, kc;

  int64_t padded_rows() const { return (rows + mr - 1) / mr * mr; }
  int64_t size() const { return padded_rows() * depth; }
  // Where the mr values A[i0 .. i0+mr)[k] start, for i0 a multiple of mr.
  int64_t strip_offset(int64_t i0, int64_t k) const {
    const int64_t block = k / kc * kc, block_depth = depth - block < kc ? depth - block : kc;
    return block * padded_rows() + i0 * block_depth + (k - block) * mr;
  }
};

template <typename T>
PackedLayout packed_layout(int64_t rows, int64_t depth);  // for the active instruction set

// C[M x N] (+)= A * B with A (layout.rows x layout.depth) already packed in `layout`.
template <typename T>
void gemm_packed(const PackedLayout& layout, const T* packed_a, int64_t N, BPacker<T> b, T* C, int64_t ldc,
                 bool accumulate);
template <typename T>
void gemm_packed(const PackedLayout& layout, const T* packed_a, int64_t N, const T* B, MatrixView b, T* C,
                 int64_t ldc, bool accumulate);

// C[M x N] (+)= A * B with A packed in `layout` and row k of B the N values from base + row_offsets[k]
// on, read where they lie: no packing (conv_rows.cpp's forward reads its rows from a prepared copy of
// x). The micro-kernel reads B by whole strips, so up to kGemmMaxStripWidth - 1 values past the end of
// each row are read and then ignored: they must be readable memory.
constexpr int64_t kGemmMaxStripWidth = 48;  // the widest build's strip (AVX-512 float: 3 vectors of 16)
template <typename T>
void gemm_packed_rows(const PackedLayout& layout, const T* packed_a, int64_t N, const T* base,
                      const int64_t* row_offsets, T* C, int64_t ldc, bool accumulate);

// B (depth x columns) packed once, in the layout the active build's GEMM reads: depth blocks of kc rows
// after each other, each as strips of nr columns (for each row, nr consecutive values; columns past
// `columns` zero). For GEMMs whose A is read in place (gemm_rows_of_a).
struct PackedBLayout {
  Isa isa;  // the build the layout was made for; gemm_rows_of_a runs on that build
  int64_t depth, columns, nr, kc;

  int64_t padded_columns() const { return (columns + nr - 1) / nr * nr; }
  int64_t size() const { return padded_columns() * depth; }
};

template <typename T>
PackedBLayout packed_b_layout(int64_t depth, int64_t columns);  // for the active instruction set
template <typename T>
void pack_b(const PackedBLayout& layout, BPacker<T> b, T* packed);

// C[M x layout.columns] (+)= A * B with B packed in `layout` and row i of A the layout.depth values from
// base + row_offsets[i] on, read where they lie, value by value as the micro-kernel broadcasts them: A is
// not packed at all (conv_rows.cpp's backward-weight reads its rows from prepared copies of x).
// row_offsets holds M + kGemmMaxTileRows entries, the extra ones any readable row (their sums are dropped):
// the last register tile reads a whole tile's offsets, and tiles of 6 rows end past any multiple of 8.
constexpr int64_t kGemmMaxTileRows = 8;  // the tallest build's register tile (AVX-512: 8 rows)
template <typename T>
void gemm_rows_of_a(const PackedBLayout& layout, int64_t M, const T* base, const int64_t* row_offsets,
                    const T* packed_b, T* C, int64_t ldc, bool accumulate);

// A (layout.rows x layout.depth, read through `a`) into layout's order, padding rows zero.
template <typename T>
void pack_a(const PackedLayout& layout, const T* A, MatrixView a, T* packed);

// Which instruction set the hot loops use: "avx512", "avx2" (AVX2+FMA) or "portable" (any x86-64); the
// best the CPU runs is chosen at load time. Tests force each in turn to cover every path.
const char* active_isa();
Isa active_build();  // the same, for dispatching to a build's namespace

// `return ns::call;` for the namespace of build `isa` (avx512, avx2 or portable): the one dispatch to the
// per-instruction-set code of the *_impl.inc files. Non-x86 builds have only the portable one.
#ifdef PYKERNELS_X86_ISAS
#define PYKERNELS_RETURN_ON_BUILD(isa, call)       \
  switch (isa) {                                   \
    case ::pykernels::cpu::Isa::avx512:            \
      return avx512::call;                         \
    case ::pykernels::cpu::Isa::avx2:              \
      return avx2::call;                           \
    default:                                       \
      return portable::call;                       \
  }
#else
#define PYKERNELS_RETURN_ON_BUILD(isa, call) return portable::call;
#endif
// Returns false when the name is unknown or the CPU cannot run it.
bool set_isa(const char* name);

// The entry points of one build's GEMM (gemm_impl.inc, in namespace ns), for gemm.cpp's dispatch and for
// code compiled inside the same build (winograd_impl.inc). gemm: columns [j_offset, j_offset + N) of B
// into C; A from the APacker or, when not null, already packed in PackedLayout order; B from the BPacker
// or, when not null, already packed whole by pack_b_blocks. gemm_a_in_place: the same with A's whole
// register strips read where they lie (A[i][k] at A + k * a_k_stride + i * a_i_stride, one of the two
// strides 1), the packer used only for a ragged last strip. blocking: the register tile (mr x nr) and the
// depth block kc. pack_b_blocks: depth blocks [block0, block1) of B (K x N), the block of rows
// [pc, pc + kc) at pc * (N rounded up to whole strips of nr). strided_packers: a StridedMatrix's packers.
#define PYKERNELS_DECLARE_GEMM_BUILD(ns)                                                                    \
  namespace ns {                                                                                           \
  template <typename T>                                                                                    \
  void gemm(int64_t M, int64_t N, int64_t K, APacker<T> a, const T* packed_a, BPacker<T> b, int64_t j_offset, \
            T* C, int64_t ldc, bool accumulate, const T* prepacked_b);                                     \
  template <typename T>                                                                                    \
  void gemm_a_in_place(int64_t M, int64_t N, int64_t K, APacker<T> a, const T* A, int64_t a_k_stride,        \
                       int64_t a_i_stride, BPacker<T> b, int64_t j_offset, T* C, int64_t ldc, bool accumulate, \
                       const T* prepacked_b);                                                              \
  template <typename T>                                                                                    \
  void blocking(int64_t* mr, int64_t* nr, int64_t* kc);                                                    \
  template <typename T>                                                                                    \
  void pack_b_blocks(BPacker<T> b, int64_t K, int64_t N, int64_t block0, int64_t block1, T* out);          \
  template <typename T>                                                                                    \
  void gemm_rows(int64_t, int64_t, int64_t, const T*, const T*, const int64_t*, T*, int64_t, bool);        \
  template <typename T>                                                                                    \
  void gemm_rows_of_a(int64_t, int64_t, int64_t, int64_t, const T*, const int64_t*, const T*, T*, int64_t,   \
                      bool);                                                                               \
  template <typename T>                                                                                    \
  int64_t rows_of_a_strip_width(int64_t);                                                                  \
  template <typename T>                                                                                    \
  int64_t rows_of_a_narrow_strip_width();                                                                  \
  template <typename T>                                                                                    \
  StridedPackers<T> strided_packers();                                                                     \
  }

}  // namespace pykernels::cpu
