// Winograd F(4x4, 3x3) convolution for 3x3, stride 1, undilated layers (Lavin & Gray, 2016).
//
// Each 4x4 block of output is computed from a 6x6 patch of input with 36 products per (channel pair)
// instead of 144: 4x fewer multiplications than direct convolution, which is how a CPU beats a direct
// kernel that already runs near its peak. With U = G g G^T (the filters, transformed once per call,
// straight into the GEMM's packed-A layout), per chunk of Tc tiles:
//   1. input transform   V[xi][c][t] = (B^T d B)[xi] for the 6x6 patch d of tile t, channel c
//   2. 36 GEMMs           M[xi] (K x Tc) = U[xi] (K x C) * V[xi] (C x Tc)
//   3. output transform   y tile = A^T M A (4x4), plus bias
// Both transforms work on whole rows of tiles: the vertical half runs along image rows (contiguous
// in memory, so it vectorises), the horizontal half over the tiles of the row.
// Threads take whole chunks when each gets at least a few register tiles of columns, else split each
// phase over independent outputs (channels, xi, output channels); no sum is ever split between
// threads, so results are bit-for-bit reproducible whatever the thread count.
// Accuracy: the transforms mix values of magnitude up to ~10x the input's, so float32 results carry
// a few more ulps of rounding than direct convolution (tests bound it against the float64 reference).
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

constexpr int64_t kTile = 4;    // output block per tile
constexpr int64_t kAlpha = 6;   // input patch per tile: kTile + 3 - 1
constexpr int64_t kXi = kAlpha * kAlpha;

// Uninitialised scratch kept by the calling thread between calls, one buffer per Slot: every element
// is written before it is read, and a buffer of tens of megabytes (the transformed filters of a
// 512-channel layer) allocated afresh on each call would be mapped anew by the kernel, whose page
// faults cost as much as the transform itself. The buffer stays until the thread exits.
template <typename T, int Slot>
T* reusable_buffer(int64_t count) {
  thread_local std::unique_ptr<T[]> buffer;
  thread_local int64_t capacity = 0;
  if (count > capacity) {
    buffer.reset();  // free the old one first: peak memory is the new size, not both
    buffer.reset(new T[static_cast<size_t>(count)]);
    capacity = count;
  }
  return buffer.get();
}

// u = G (g0, g1, g2)^T over n lanes: the filter transform along one axis.
template <typename T>
void filter_transform_1d(const T* g0, const T* g1, const T* g2, T* const u[6], int64_t n) {
  const T quarter = T(0.25), sixth = T(1) / T(6), twelfth = T(1) / T(12), twenty_fourth = T(1) / T(24);
  for (int64_t i = 0; i < n; ++i) {
    const T a = g0[i], b = g1[i], c = g2[i];
    u[0][i] = quarter * a;
    u[1][i] = -sixth * (a + b + c);
    u[2][i] = -sixth * (a - b + c);
    u[3][i] = twenty_fourth * a + twelfth * b + sixth * c;
    u[4][i] = twenty_fourth * a - twelfth * b + sixth * c;
    u[5][i] = c;
  }
}

// out_k[i] = sum_j B^T[k][j] * d_j[i] for k < 6, over n lanes: the input transform along one axis.
template <typename T>
__attribute__((noinline)) void input_transform_1d(const T* const d[6], T* const out[6], int64_t n) {
  const T *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
  T *r0 = out[0], *r1 = out[1], *r2 = out[2], *r3 = out[3], *r4 = out[4], *r5 = out[5];
  for (int64_t i = 0; i < n; ++i) {
    r0[i] = T(4) * d0[i] - T(5) * d2[i] + d4[i];
    r1[i] = -T(4) * (d1[i] + d2[i]) + d3[i] + d4[i];
    r2[i] = T(4) * (d1[i] - d2[i]) - d3[i] + d4[i];
    r3[i] = T(2) * (d3[i] - d1[i]) - d2[i] + d4[i];
    r4[i] = T(2) * (d1[i] - d3[i]) - d2[i] + d4[i];
    r5[i] = T(4) * d1[i] - T(5) * d3[i] + d5[i];
  }
}

// Splits row[4t + j] into four contiguous phase arrays p_j[t] (t < n): a loop the compiler turns
// into vector shuffles, so the per-tile transform after it runs on whole vectors of tiles.
template <typename T>
void split_phases(const T* row, int64_t n, T* p0, T* p1, T* p2, T* p3) {
  for (int64_t t = 0; t < n; ++t) {
    p0[t] = row[kTile * t];
    p1[t] = row[kTile * t + 1];
    p2[t] = row[kTile * t + 2];
    p3[t] = row[kTile * t + 3];
  }
}

// The same along a row, for the n tiles starting at `row`: tile t reads row[4t .. 4t+5].
// `phases`: room for 4 * (n + 1) values.
template <typename T>
__attribute__((noinline)) void input_transform_tiles(const T* row, T* const out[6], int64_t n, T* phases) {
  T *p0 = phases, *p1 = p0 + n + 1, *p2 = p1 + n + 1, *p3 = p2 + n + 1;
  split_phases(row, n, p0, p1, p2, p3);
  p0[n] = row[kTile * n];  // the last tile's d4, d5
  p1[n] = row[kTile * n + 1];
  const T* d[6] = {p0, p1, p2, p3, p0 + 1, p1 + 1};
  input_transform_1d(d, out, n);
}

// o_a[i] = sum_j A^T[a][j] * m_j[i] + bias for a < 4, over n lanes: the output transform along one axis.
template <typename T>
__attribute__((noinline)) void output_transform_1d(const T* const m[6], T* const out[4], int64_t n, T bias) {
  const T *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3], *m4 = m[4], *m5 = m[5];
  T *o0 = out[0], *o1 = out[1], *o2 = out[2], *o3 = out[3];
  for (int64_t i = 0; i < n; ++i) {
    const T a = m1[i] + m2[i], b = m1[i] - m2[i], c = m3[i] + m4[i], d = m3[i] - m4[i];
    o0[i] = m0[i] + a + c + bias;
    o1[i] = b + T(2) * d + bias;
    o2[i] = a + T(4) * c + bias;
    o3[i] = b + T(8) * d + m5[i] + bias;
  }
}

// The same across tiles, written interleaved: row[4t + a] for tile t, from the six values m_j[t].
template <typename T>
__attribute__((noinline)) void output_transform_tiles(const T* const m[6], T* row, int64_t n) {
  const T *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3], *m4 = m[4], *m5 = m[5];
  for (int64_t t = 0; t < n; ++t) {
    const T a = m1[t] + m2[t], b = m1[t] - m2[t], c = m3[t] + m4[t], d = m3[t] - m4[t];
    T* o = row + kTile * t;
    o[0] = m0[t] + a + c;
    o[1] = b + T(2) * d;
    o[2] = a + T(4) * c;
    o[3] = b + T(8) * d + m5[t];
  }
}

}  // namespace

bool winograd_applies(const Conv2dShape& s) {
  const Window2d& w = s.win;
  if (!(s.R == 3 && s.S == 3 && w.stride_h == 1 && w.stride_w == 1 && w.dilation_h == 1 && w.dilation_w == 1 &&
        s.groups == 1 && s.C >= 8 && s.K >= 8 && s.P >= 4 && s.Q >= 4))
    return false;
  // Worth it when the 36 GEMMs (72 flops per tile and channel pair) plus transforming every filter
  // (36 values written and read back, each costing about 200 flops' time: measured on resnet_3x3_512,
  // where 32 tiles cannot amortise 37 MB of transformed filters) cost less than direct convolution's
  // 18 flops per output and channel pair.
  const double tiles = double(s.N) * double((s.P + 3) / 4) * double((s.Q + 3) / 4);
  return 72.0 * tiles + 36.0 * 200.0 < 18.0 * double(s.N) * double(s.P) * double(s.Q);
}

namespace {

// Transforms every filter g(k, c) = w[k * k_stride + c * c_stride + (0..8)] (rotated 180 degrees when
// `flipped`) into U: for each xi, the K x C matrix U[xi] in `layout`, at U + xi * layout.size().
// One strip of mr output channels at a time, 32 input channels per pass: in the packed layout those
// 32 * mr values of each U[xi] are one contiguous run, which the second pass writes directly.
template <typename T>
void transform_filters(const WinogradFilters<T>& f, int64_t K, int64_t C, const PackedLayout& layout, T* U) {
  const int64_t mr = layout.mr, strips = layout.padded_rows() / mr;
  constexpr int64_t kChannels = 32;  // divides the GEMM's depth block, so a pass never straddles two
  static_assert(256 % kChannels == 0, "kChannels must divide every build's KC");
  const int64_t lanes = kChannels * mr;
  Workspace<T> scratch(available_threads(), (9 + 18) * lanes);
  ParallelErrors errors;
#pragma omp parallel for schedule(static) if (strips > 1 && K * C * kXi >= kMinParallelWork)
  for (int64_t strip = 0; strip < strips; ++strip) {
    errors.run([&] {
      T* g = scratch.for_this_thread();  // g[rs][cc * mr + i]: filter (k0 + i, c0 + cc), tap rs
      T* tmp = g + 9 * lanes;            // tmp[a * 3 + s]: G applied down column s
      const int64_t k0 = strip * mr;
      for (int64_t c0 = 0; c0 < C; c0 += kChannels) {
        const int64_t channels = std::min(kChannels, C - c0), n = channels * mr;
        for (int64_t i = 0; i < mr; ++i) {
          const int64_t k = k0 + i;
          for (int64_t cc = 0; cc < channels; ++cc) {
            T* dst = g + cc * mr + i;
            if (k >= K) {  // padding rows of the last strip
              for (int rs = 0; rs < 9; ++rs) dst[rs * lanes] = T(0);
              continue;
            }
            const T* src = f.w + k * f.k_stride + (c0 + cc) * f.c_stride;
            for (int rs = 0; rs < 9; ++rs) dst[rs * lanes] = src[f.flipped ? 8 - rs : rs];
          }
        }
        for (int s = 0; s < 3; ++s) {
          T* out[6];
          for (int a = 0; a < 6; ++a) out[a] = tmp + (a * 3 + s) * lanes;
          filter_transform_1d(g + s * lanes, g + (3 + s) * lanes, g + (6 + s) * lanes, out, n);
        }
        T* run = U + layout.strip_offset(k0, c0);  // U[0]'s run; U[xi]'s is xi * layout.size() further
        for (int a = 0; a < 6; ++a) {
          T* out[6];
          for (int b = 0; b < 6; ++b) out[b] = run + (a * 6 + b) * layout.size();
          filter_transform_1d(tmp + (a * 3) * lanes, tmp + (a * 3 + 1) * lanes, tmp + (a * 3 + 2) * lanes, out, n);
        }
      }
    });
  }
  errors.rethrow();
}

// Where a chunk's tiles lie: tile t (counted over the batch) is image t / per_image, tile row
// (t % per_image) / tile_cols, tile column t % tile_cols. visit(n, tile_row, first column, columns,
// position of that first tile in the chunk) for each run of tiles of one tile row.
template <typename Visit>
void for_each_tile_row(int64_t t0, int64_t count, int64_t tile_cols, int64_t per_image, Visit&& visit) {
  for (int64_t t = t0; t < t0 + count;) {
    const int64_t n = t / per_image, in_image = t % per_image, tile_row = in_image / tile_cols;
    const int64_t col = in_image % tile_cols, run = std::min(tile_cols - col, t0 + count - t);
    visit(n, tile_row, col, run, t - t0);
    t += run;
  }
}

// Everything the phases need; V and M are those of the chunk in flight.
template <typename T>
struct WinogradJob {
  const Conv2dShape& s;
  const T* x;
  const T* U;
  PackedLayout layout;
  const T* bias;
  T* y;
  int64_t Tc, tile_cols, per_image, row_len;  // row_len: 4 * tile_cols + 2, a padded row of tiles

  // Per thread: 6 transform rows, a row of zeros (or of discarded output), 2 rows of phase arrays.
  int64_t scratch_per_thread() const { return 9 * row_len; }
};

// Phase 1 for channel c: V[xi][c][t] for the chunk's tiles [t0, t0 + count).
template <typename T>
__attribute__((noinline)) void transform_input_channel(const WinogradJob<T>& job, int64_t c, int64_t t0, int64_t count, T* V, T* scratch) {
  const Conv2dShape& s = job.s;
  const int64_t H = s.H, W = s.W, Tc = job.Tc;
  T* mid = scratch;                      // 6 rows of row_len: the vertical transform of six image rows
  T* zeros = scratch + 6 * job.row_len;   // an image row of zeros, for rows in the padding
  T* phases = scratch + 7 * job.row_len;  // 2 rows: input_transform_tiles' phase arrays
  std::fill(zeros, zeros + W, T(0));
  for_each_tile_row(t0, count, job.tile_cols, job.per_image, [&](int64_t n, int64_t tile_row, int64_t col0,
                                                                 int64_t run, int64_t at) {
    const T* plane = job.x + (n * s.C + c) * H * W;
    const int64_t h0 = tile_row * kTile - s.win.pad_top, w0 = col0 * kTile - s.win.pad_left;
    const int64_t width = run * kTile + 2;  // mid[l][j] holds image column w0 + j
    const int64_t j_begin = std::clamp<int64_t>(-w0, 0, width), j_end = std::clamp<int64_t>(W - w0, j_begin, width);
    const T* rows[6];
    T* out[6];
    for (int i = 0; i < 6; ++i) {
      const int64_t h = h0 + i;
      rows[i] = (h >= 0 && h < H ? plane + h * W : zeros) + w0 + j_begin;
      out[i] = mid + i * job.row_len;
      std::fill(out[i], out[i] + j_begin, T(0));
      std::fill(out[i] + j_end, out[i] + width, T(0));
      out[i] += j_begin;
    }
    input_transform_1d(rows, out, j_end - j_begin);
    for (int l = 0; l < 6; ++l) {
      T* v[6];
      for (int k = 0; k < 6; ++k) v[k] = V + ((l * kAlpha + k) * s.C + c) * Tc + at;
      input_transform_tiles(mid + l * job.row_len, v, run, phases);
    }
  });
}

// Phase 3 for output channel k: the chunk's output tiles from M[xi][k][t], plus bias.
template <typename T>
__attribute__((noinline)) void transform_output_channel(const WinogradJob<T>& job, int64_t k, int64_t t0, int64_t count, const T* M,
                              T* scratch) {
  const Conv2dShape& s = job.s;
  const int64_t P = s.P, Q = s.Q, Tc = job.Tc;
  T* mid = scratch;                         // 6 rows: the horizontal transform, 4 values per tile
  T* discard = scratch + 6 * job.row_len;   // output rows past the bottom edge
  const T b = job.bias ? job.bias[k] : T(0);
  for_each_tile_row(t0, count, job.tile_cols, job.per_image, [&](int64_t n, int64_t tile_row, int64_t col0,
                                                                 int64_t run, int64_t at) {
    for (int i = 0; i < 6; ++i) {
      const T* m[6];
      for (int j = 0; j < 6; ++j) m[j] = M + ((i * kAlpha + j) * s.K + k) * Tc + at;
      output_transform_tiles(m, mid + i * job.row_len, run);
    }
    const int64_t p0 = tile_row * kTile, q0 = col0 * kTile, width = std::min(run * kTile, Q - q0);
    T* plane = job.y + (n * s.K + k) * P * Q;
    const T* m[6];
    T* out[4];
    for (int i = 0; i < 6; ++i) m[i] = mid + i * job.row_len;
    for (int a = 0; a < 4; ++a) out[a] = p0 + a < P ? plane + (p0 + a) * Q + q0 : discard;
    output_transform_1d(m, out, width, b);
  });
}

// All three phases for tiles [t0, t0 + count). With `parallel`, each phase is split among the OpenMP
// threads and each thread takes its own slice of `scratch`; without, it runs on the calling thread with
// `own_scratch` (inside another parallel region a nested one-thread team's thread number is 0).
template <typename T>
void winograd_chunk(const WinogradJob<T>& job, int64_t t0, int64_t count, T* V, T* M, Workspace<T>& scratch,
                    T* own_scratch, bool parallel, ParallelErrors& errors) {
  const Conv2dShape& s = job.s;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < s.C; ++c)
    errors.run([&] { transform_input_channel(job, c, t0, count, V, parallel ? scratch.for_this_thread() : own_scratch); });
  errors.rethrow();

#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t xi = 0; xi < kXi; ++xi)
    errors.run([&] {
      gemm_packed<T>(job.layout, job.U + xi * job.layout.size(), count, V + xi * s.C * job.Tc, {job.Tc, 1},
                     M + xi * s.K * job.Tc, job.Tc, false);
    });
  errors.rethrow();

#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t k = 0; k < s.K; ++k)
    errors.run([&] { transform_output_channel(job, k, t0, count, M, parallel ? scratch.for_this_thread() : own_scratch); });
  errors.rethrow();
}

}  // namespace

template <typename T>
void conv2d_winograd(const Conv2dShape& s, const T* x, const WinogradFilters<T>& filters, const T* bias, T* y) {
  const int64_t C = s.C, K = s.K;
  const int64_t tile_cols = (s.Q + kTile - 1) / kTile;
  const int64_t per_image = (s.P + kTile - 1) / kTile * tile_cols, total = s.N * per_image;
  if (total == 0) return;
  const PackedLayout layout = packed_layout<T>(K, C);
  T* U = reusable_buffer<T, 0>(kXi * layout.size());
  transform_filters(filters, K, C, layout, U);

  const int threads = available_threads();
  const bool worth_threads = double(total) * double(K) * double(C) * kXi >= kMinParallelWork;
  // Chunks of whole 32-column groups (a multiple of every build's register tile width), V within
  // about 4 MiB; a multiple of the thread count when threads take whole chunks, which they do when
  // each gets at least 64 tiles (fewer would leave the GEMMs' register tiles half empty).
  constexpr int64_t kGroup = 32;
  const int64_t groups = (total + kGroup - 1) / kGroup;
  const int64_t max_groups = std::max<int64_t>(1, (int64_t(4) << 20) / (kXi * C * int64_t(sizeof(T))) / kGroup);
  const bool chunk_parallel = worth_threads && threads > 1 && total >= 64 * threads;
  int64_t chunks = (groups + max_groups - 1) / max_groups;
  if (chunk_parallel) chunks = (chunks + threads - 1) / threads * threads;
  const int64_t Tc = std::min(total, (groups + chunks - 1) / chunks * kGroup);
  chunks = (total + Tc - 1) / Tc;

  const WinogradJob<T> job{s, x, U, layout, bias, y, Tc, tile_cols, per_image, tile_cols * kTile + 2};
  const int slots = chunk_parallel ? threads : 1;
  const int64_t V_size = kXi * C * Tc, M_size = kXi * K * Tc;
  T* V = reusable_buffer<T, 1>(slots * V_size);
  T* M = reusable_buffer<T, 2>(slots * M_size);
  Workspace<T> scratch(threads, job.scratch_per_thread());
  ParallelErrors errors;
  if (chunk_parallel) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      errors.run([&] {
#ifdef _OPENMP
        const int64_t slot = omp_get_thread_num();
#else
        const int64_t slot = 0;
#endif
        const int64_t t0 = chunk * Tc;
        ParallelErrors inner;
        winograd_chunk(job, t0, std::min(Tc, total - t0), V + slot * V_size, M + slot * M_size, scratch,
                       scratch.for_this_thread(), false, inner);
        inner.rethrow();
      });
    }
    errors.rethrow();
    return;
  }
  for (int64_t t0 = 0; t0 < total; t0 += Tc)
    winograd_chunk(job, t0, std::min(Tc, total - t0), V, M, scratch, scratch.for_this_thread(),
                   worth_threads, errors);
}

template void conv2d_winograd<float>(const Conv2dShape&, const float*, const WinogradFilters<float>&, const float*,
                                     float*);
template void conv2d_winograd<double>(const Conv2dShape&, const double*, const WinogradFilters<double>&,
                                      const double*, double*);

}  // namespace pykernels::cpu
