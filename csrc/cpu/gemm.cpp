// Run-time choice between the AVX-512, AVX2+FMA and portable GEMM builds, and the parallel driver.
#include "cpu/gemm.hpp"
#include "cpu/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>


namespace pykernels::cpu {

PYKERNELS_DECLARE_GEMM_BUILD(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_GEMM_BUILD(avx2)
PYKERNELS_DECLARE_GEMM_BUILD(avx512)
#endif

namespace {

bool cpu_supports(Isa isa) {
#if defined(PYKERNELS_X86_ISAS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::portable:
      return true;
  }
  return false;
#else
  return isa == Isa::portable;
#endif
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::portable, Isa::avx2, Isa::avx512})
    if (std::strcmp(name, isa == Isa::portable ? "portable" : isa == Isa::avx2 ? "avx2" : "avx512") == 0) {
      *out = isa;
      return true;
    }
  return false;
}

Isa initial_isa() {
  // PYKERNELS_CPU_ISA=portable|avx2 caps the choice (for tests and for bisecting a CPU issue).
  Isa forced;
  const char* env = std::getenv("PYKERNELS_CPU_ISA");
  if (env && parse_isa(env, &forced) && cpu_supports(forced)) return forced;
  for (Isa isa : {Isa::avx512, Isa::avx2})
    if (cpu_supports(isa)) return isa;
  return Isa::portable;
}

std::atomic<Isa>& current_isa() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

const char* active_isa() {
  switch (current_isa().load()) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "portable";
  }
}

Isa active_build() { return current_isa().load(); }

bool set_isa(const char* name) {
  Isa isa;
  if (!parse_isa(name, &isa) || !cpu_supports(isa)) return false;
  current_isa().store(isa);
  return true;
}

namespace {

// Columns [j_offset, j_offset + N) of B into columns [0, N) of C on build `isa`; A from `a` or, when
// packed_a is not null, already packed in that build's layout.
template <typename T>
void gemm_on(Isa isa, int64_t M, int64_t N, int64_t K, APacker<T> a, const T* packed_a, BPacker<T> b,
             int64_t j_offset, T* C, int64_t ldc, bool accumulate, const T* prepacked_b = nullptr) {
  PYKERNELS_RETURN_ON_BUILD(isa, gemm<T>(M, N, K, a, packed_a, b, j_offset, C, ldc, accumulate, prepacked_b))
}

// An A read in place (gemm_impl.inc's gemm_a_in_place): A[i][k] at a + k * k_stride + i * i_stride; none
// (all of A packed, as gemm does) when a is null.
template <typename T>
struct AInPlace {
  const T* a = nullptr;
  int64_t k_stride = 0, i_stride = 0;
  AInPlace rows_from(int64_t i0) const { return {a ? a + i0 * i_stride : nullptr, k_stride, i_stride}; }
};

// At most this many columns of B for an A read in place: packed, each value of A would serve only a
// few register strips of B.
constexpr int64_t kAInPlaceMaxColumns = 256;

// Build `isa`'s GEMM with A read in place where `in_place` says so, else packed (gemm_a_in_place with a null
// A is gemm).
template <typename T>
void gemm_a_in_place_on(Isa isa, int64_t M, int64_t N, int64_t K, APacker<T> a, AInPlace<T> in_place, BPacker<T> b,
                        int64_t j_offset, T* C, int64_t ldc, bool accumulate, const T* prepacked_b) {
  PYKERNELS_RETURN_ON_BUILD(isa, gemm_a_in_place<T>(M, N, K, a, in_place.a, in_place.k_stride, in_place.i_stride, b,
                                                    j_offset, C, ldc, accumulate, prepacked_b))
}

// The register-tile height and width and the depth block of build `isa`'s GEMM.
template <typename T>
void blocking_on(Isa isa, int64_t* mr, int64_t* nr, int64_t* kc) {
  PYKERNELS_RETURN_ON_BUILD(isa, blocking<T>(mr, nr, kc))
}

template <typename T>
int64_t rows_of_a_strip_width_on(Isa isa, int64_t columns) {
  PYKERNELS_RETURN_ON_BUILD(isa, rows_of_a_strip_width<T>(columns))
}

template <typename T>
void pack_b_blocks_on(Isa isa, BPacker<T> b, int64_t K, int64_t N, int64_t block0, int64_t block1, T* out) {
  PYKERNELS_RETURN_ON_BUILD(isa, pack_b_blocks<T>(b, K, N, block0, block1, out))
}

template <typename T>
void gemm_columns(int64_t M, int64_t N, int64_t K, APacker<T> a, BPacker<T> b, int64_t j_offset, T* C, int64_t ldc,
                  bool accumulate, AInPlace<T> in_place = {}) {
  gemm_a_in_place_on<T>(current_isa().load(), M, N, K, a, in_place, b, j_offset, C, ldc, accumulate, nullptr);
}

// ReadA::rows_in_place for a row-major A that meets few columns of B; decided by the shape alone, as
// gemm.hpp requires.
template <typename T>
AInPlace<T> rows_in_place(const T* A, MatrixView a, int64_t N, ReadA read) {
  if (read == ReadA::rows_in_place && a.col_stride == 1 && a.row_stride > 1 && N <= kAInPlaceMaxColumns)
    return {A, 1, a.row_stride};
  return {};
}

// The packers of a StridedMatrix on the active build (any build's strips suit any build's GEMM: the
// strip width is an argument); they were compiled here for SSE2 only, and copied the 1x1 layers' x at
// 16 bytes a step: a third of resnet_1x1_256_64's forward.
template <typename T>
StridedPackers<T> active_strided_packers() {
  PYKERNELS_RETURN_ON_BUILD(current_isa().load(), strided_packers<T>())
}

template <typename T>
BPacker<T> b_packer_for(const StridedMatrix<T>& b) {
  const StridedPackers<T> packers = active_strided_packers<T>();
  return BPacker<T>{packers.b, &b, packers.b_runs};
}

// A as an APacker through its transpose (a_transposed = A with the two strides swapped).
template <typename T>
APacker<T> a_packer_for(const StridedMatrix<T>& a_transposed) {
  return APacker<T>{active_strided_packers<T>().a, &a_transposed};
}

// Splits `units` into one contiguous share [begin, end) per thread of a parallel region and runs
// work(begin, end) on each non-empty share; the first exception is rethrown afterwards.
template <typename Work>
void for_each_thread_share(int threads, int64_t units, Work&& work) {
  ParallelErrors errors;
#pragma omp parallel num_threads(threads)
  errors.run([&] {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    const int64_t begin = units * t / nt, end = units * (t + 1) / nt;
    if (end > begin) work(begin, end);
  });
  errors.rethrow();
}

// The largest B that gemm_split_rows and gemm_parallel_row_blocks pack once and share among their threads.
constexpr int64_t kSharedBBytes = int64_t(16) << 20;

// B (K x N) packed whole, as pack_b_blocks lays it out: its size in values on build `isa`.
template <typename T>
int64_t packed_b_size(Isa isa, int64_t N, int64_t K) {
  int64_t mr, nr, kc;
  blocking_on<T>(isa, &mr, &nr, &kc);
  return K * ((N + nr - 1) / nr * nr);
}

// Whether a packed B of `size` values is small enough to pack once and share.
template <typename T>
bool fits_shared_b(int64_t size) {
  return size * int64_t(sizeof(T)) <= kSharedBBytes;
}

// Inside a parallel region, on every thread of the team: the threads pack B's depth blocks side by side into
// shared_b, then wait for each other (a barrier, so all of them or none must call it). Nothing where shared_b
// is null.
template <typename T>
void pack_shared_b(Isa isa, BPacker<T> b, int64_t K, int64_t N, T* shared_b, ParallelErrors& errors) {
  if (!shared_b) return;
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  const int64_t t = 0, nt = 1;
#endif
  int64_t mr, nr, kc;
  blocking_on<T>(isa, &mr, &nr, &kc);
  const int64_t blocks = (K + kc - 1) / kc;
  errors.run([&] { pack_b_blocks_on<T>(isa, b, K, N, blocks * t / nt, blocks * (t + 1) / nt, shared_b); });
#pragma omp barrier
}

// An A whose columns are contiguous (backward-input's w^T) multiplying few columns of B, read in place; its
// kernels sum in the packed order, so this needs no decision by shape. resnet_3x3_512 at batch 1 (49 columns),
// where packing was a fifth of the time: 0.80-0.85 -> 0.66-0.68 ms; a 3x3 stride-2 layer on 28x28 (196
// columns): 0.55 -> 0.51.
template <typename T>
AInPlace<T> columns_in_place(const T* A, MatrixView a, int64_t N) {
  return a.row_stride == 1 && N <= kAInPlaceMaxColumns ? AInPlace<T>{A, a.col_stride, 1} : AInPlace<T>{};
}

// gemm_parallel with the rows of C split among threads in shares of whole chunks of `row_chunk` rows. B,
// which every share multiplies, is packed once and shared when it is between 64 Ki values and 16 MiB
// (the im2col columns of resnet_3x3_512 at batch 1: 4608 x 49), the threads packing its depth blocks side
// by side: each thread packing all of it took a quarter of that layer's time. A smaller B (grad_y in that
// layer's backward-input, 512 x 49) is cheaper to pack twice than to wait at a barrier for. Either way
// each C element is summed over K in the serial order.
template <typename T>
void gemm_split_rows(int threads, int64_t row_chunk, int64_t M, int64_t N, int64_t K, const T* A, MatrixView a,
                     BPacker<T> b, T* C, int64_t ldc, bool accumulate, AInPlace<T> row_major) {
  const Isa isa = current_isa().load();
  const int64_t shared_size = packed_b_size<T>(isa, N, K);
  const bool share = shared_size >= (int64_t(1) << 16) && fits_shared_b<T>(shared_size);
  T* shared_b = share ? reusable_buffer<T, 0>(shared_size) : nullptr;
  const AInPlace<T> in_place = row_major.a ? row_major : columns_in_place(A, a, N);
  const int64_t row_chunks = (M + row_chunk - 1) / row_chunk;
  ParallelErrors errors;
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    pack_shared_b(isa, b, K, N, shared_b, errors);
    errors.run([&] {
      const int64_t c0 = row_chunks * t / nt, c1 = row_chunks * (t + 1) / nt;
      if (c1 <= c0) return;
      const int64_t i0 = c0 * row_chunk, i1 = std::min(M, c1 * row_chunk);
      const StridedMatrix<T> rows{A + i0 * a.row_stride, {a.col_stride, a.row_stride}};
      gemm_a_in_place_on<T>(isa, i1 - i0, N, K, a_packer_for(rows), in_place.rows_from(i0), b, 0, C + i0 * ldc, ldc,
                            accumulate, shared_b);
    });
  }
  errors.rethrow();
}

}  // namespace

template <typename T>
bool gemm_shares_packed_b(int64_t N, int64_t K) {
  return fits_shared_b<T>(packed_b_size<T>(current_isa().load(), N, K));
}

template <typename T>
void gemm_parallel_row_blocks(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, BPacker<T> b, T* C,
                              int64_t ldc, int64_t block_rows, void (*after_block)(void* ctx, int64_t i0, int64_t i1),
                              void* ctx) {
  if (M <= 0) return;
  const Isa isa = current_isa().load();
  const int64_t blocks = (M + block_rows - 1) / block_rows;
  const int64_t shared_size = packed_b_size<T>(isa, N, K);
  T* shared_b = fits_shared_b<T>(shared_size) ? reusable_buffer<T, 0>(shared_size) : nullptr;
  const AInPlace<T> in_place = columns_in_place(A, a, N);  // as gemm_split_rows, by the shape alone
  const bool parallel = blocks > 1 && double(M) * double(N) * double(K) >= 4.0 * double(kMinParallelWork);
  ParallelErrors errors;
#pragma omp parallel if (parallel)
  {
    pack_shared_b(isa, b, K, N, shared_b, errors);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block)
      errors.run([&] {
        const int64_t i0 = block * block_rows, i1 = std::min(M, i0 + block_rows);
        const StridedMatrix<T> rows{A + i0 * a.row_stride, {a.col_stride, a.row_stride}};
        gemm_a_in_place_on<T>(isa, i1 - i0, N, K, a_packer_for(rows), in_place.rows_from(i0), b, 0, C + i0 * ldc, ldc,
                              false, shared_b);
        after_block(ctx, i0, i1);
      });
  }
  errors.rethrow();
}

template <typename T>
PackedLayout packed_layout(int64_t rows, int64_t depth) {
  const Isa isa = current_isa().load();
  PackedLayout layout{isa, rows, depth, 0, 0};
  int64_t nr;
  blocking_on<T>(isa, &layout.mr, &nr, &layout.kc);
  return layout;
}

template <typename T>
void gemm_packed(const PackedLayout& layout, const T* packed_a, int64_t N, BPacker<T> b, T* C, int64_t ldc,
                 bool accumulate) {
  gemm_on<T>(layout.isa, layout.rows, N, layout.depth, APacker<T>{nullptr, nullptr}, packed_a, b, 0,
             C, ldc, accumulate);
}

template <typename T>
void gemm_packed(const PackedLayout& layout, const T* packed_a, int64_t N, const T* B, MatrixView b, T* C,
                 int64_t ldc, bool accumulate) {
  const StridedMatrix<T> b_matrix{B, b};
  gemm_packed<T>(layout, packed_a, N, b_packer_for(b_matrix), C, ldc, accumulate);
}

template <typename T>
void gemm_packed_rows(const PackedLayout& layout, const T* packed_a, int64_t N, const T* base,
                      const int64_t* row_offsets, T* C, int64_t ldc, bool accumulate) {
  PYKERNELS_RETURN_ON_BUILD(layout.isa, gemm_rows<T>(layout.rows, N, layout.depth, packed_a, base, row_offsets, C,
                                                     ldc, accumulate))
}

template <typename T>
PackedBLayout packed_b_layout(int64_t depth, int64_t columns) {
  const Isa isa = current_isa().load();
  PackedBLayout layout{isa, depth, columns, 0, 0};
  int64_t mr, nr;
  blocking_on<T>(isa, &mr, &nr, &layout.kc);
  layout.nr = rows_of_a_strip_width_on<T>(isa, columns);
  return layout;
}

template <typename T>
void pack_b(const PackedBLayout& layout, BPacker<T> b, T* packed) {
  for (int64_t pc = 0; pc < layout.depth; pc += layout.kc)
    b.pack(b.ctx, pc, std::min(layout.kc, layout.depth - pc), 0, layout.columns, layout.nr,
           packed + pc * layout.padded_columns());
}

template <typename T>
void gemm_rows_of_a(const PackedBLayout& layout, int64_t M, const T* base, const int64_t* row_offsets,
                    const T* packed_b, T* C, int64_t ldc, bool accumulate) {
  PYKERNELS_RETURN_ON_BUILD(layout.isa, gemm_rows_of_a<T>(M, layout.columns, layout.depth, layout.nr, base,
                                                          row_offsets, packed_b, C, ldc, accumulate))
}

template <typename T>
void pack_a(const PackedLayout& layout, const T* A, MatrixView a, T* packed) {
  // A depth block at a time through the active build's packer of A's transpose, whose strips are the
  // layout's (value by value here, with a division per value, it took 15 % of a channels-last
  // backward-weight whose grad_y it packs).
  const StridedMatrix<T> a_transposed{A, {a.col_stride, a.row_stride}};
  const APacker<T> packer = a_packer_for(a_transposed);
  for (int64_t pc = 0; pc < layout.depth; pc += layout.kc)
    packer.pack(packer.ctx, 0, layout.rows, pc, std::min(layout.kc, layout.depth - pc), layout.mr,
                packed + pc * layout.padded_rows());
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, APacker<T> a, BPacker<T> b, T* C, int64_t ldc, bool accumulate) {
  gemm_columns<T>(M, N, K, a, b, 0, C, ldc, accumulate);
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, BPacker<T> b, T* C, int64_t ldc,
          bool accumulate, ReadA read) {
  const StridedMatrix<T> a_transposed{A, {a.col_stride, a.row_stride}};
  gemm_columns<T>(M, N, K, a_packer_for(a_transposed), b, 0, C, ldc, accumulate, rows_in_place(A, a, N, read));
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, const T* B, MatrixView b, T* C,
          int64_t ldc, bool accumulate, ReadA read) {
  const StridedMatrix<T> b_matrix{B, b};
  gemm<T>(M, N, K, A, a, b_packer_for(b_matrix), C, ldc, accumulate, read);
}

template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, BPacker<T> b, T* C, int64_t ldc,
                   bool accumulate, ReadA read) {
  const int threads = available_threads();
  const AInPlace<T> row_major = rows_in_place(A, a, N, read);
  // Columns split in chunks of 96 so each thread's share is a whole number of register tiles (8, 16,
  // 32 or 48 columns wide); every C element still sums over K in the serial order, so the bits do not
  // depend on the thread count.
  constexpr int64_t kChunk = 96;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const StridedMatrix<T> a_transposed{A, {a.col_stride, a.row_stride}};
  const APacker<T> a_packer = a_packer_for(a_transposed);
  if (threads <= 1 || double(M) * double(N) * double(K) < 4.0 * double(kMinParallelWork)) {
    gemm_columns<T>(M, N, K, a_packer, b, 0, C, ldc, accumulate, row_major);
    return;
  }
  // Each thread packs the part of A or B it multiplies and all of the other. Split the rows instead of
  // the columns when A is the larger operand (deep layers: 512 channels by 49 positions at batch 1) or
  // when there are too few columns to go round; in chunks of 24 rows, whole register strips of every
  // build. Either way each C element is summed over K in the serial order.
  constexpr int64_t kRowChunk = 24;
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  if ((chunks < threads || M > N) && row_chunks >= threads) {
    gemm_split_rows<T>(threads, kRowChunk, M, N, K, A, a, b, C, ldc, accumulate, row_major);
    return;
  }
  if (chunks <= 1) {
    gemm_columns<T>(M, N, K, a_packer, b, 0, C, ldc, accumulate, row_major);
    return;
  }
  for_each_thread_share(threads, chunks, [&](int64_t c0, int64_t c1) {
    const int64_t j0 = c0 * kChunk, j1 = std::min(N, c1 * kChunk);
    gemm_columns<T>(M, j1 - j0, K, a_packer, b, j0, C + j0, ldc, accumulate, row_major);
  });
}

template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, const T* B, MatrixView b, T* C,
                   int64_t ldc, bool accumulate, ReadA read) {
  const StridedMatrix<T> matrix{B, b};
  gemm_parallel<T>(M, N, K, A, a, b_packer_for(matrix), C, ldc, accumulate, read);
}

#define PYKERNELS_INSTANTIATE(T)                                                                               \
  template void gemm<T>(int64_t, int64_t, int64_t, const T*, MatrixView, const T*, MatrixView, T*, int64_t, bool,  \
                        ReadA);                                                                                  \
  template void gemm<T>(int64_t, int64_t, int64_t, const T*, MatrixView, BPacker<T>, T*, int64_t, bool, ReadA);    \
  template void gemm<T>(int64_t, int64_t, int64_t, APacker<T>, BPacker<T>, T*, int64_t, bool);                     \
  template void gemm_parallel<T>(int64_t, int64_t, int64_t, const T*, MatrixView, const T*, MatrixView, T*,        \
                                 int64_t, bool, ReadA);                                                          \
  template void gemm_parallel<T>(int64_t, int64_t, int64_t, const T*, MatrixView, BPacker<T>, T*, int64_t, bool,  \
                                 ReadA);                                                                         \
  template void gemm_parallel_row_blocks<T>(int64_t, int64_t, int64_t, const T*, MatrixView, BPacker<T>, T*,       \
                                            int64_t, int64_t, void (*)(void*, int64_t, int64_t), void*);           \
  template bool gemm_shares_packed_b<T>(int64_t, int64_t);                                                       \
  template PackedLayout packed_layout<T>(int64_t, int64_t);                                                      \
  template void gemm_packed<T>(const PackedLayout&, const T*, int64_t, BPacker<T>, T*, int64_t, bool);           \
  template void gemm_packed<T>(const PackedLayout&, const T*, int64_t, const T*, MatrixView, T*, int64_t, bool); \
  template void gemm_packed_rows<T>(const PackedLayout&, const T*, int64_t, const T*, const int64_t*, T*, int64_t,   \
                                    bool);                                                                       \
  template void pack_a<T>(const PackedLayout&, const T*, MatrixView, T*);                                         \
  template PackedBLayout packed_b_layout<T>(int64_t, int64_t);                                                   \
  template void pack_b<T>(const PackedBLayout&, BPacker<T>, T*);                                                 \
  template void gemm_rows_of_a<T>(const PackedBLayout&, int64_t, const T*, const int64_t*, const T*, T*, int64_t, \
                                  bool);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
