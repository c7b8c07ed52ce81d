// Winograd F(4x4, 3x3) convolution for 3x3, stride 1, undilated layers (Lavin & Gray, 2016).
//
// Each 4x4 block of output is computed from a 6x6 patch of input with 36 products per (channel pair)
// instead of 144: 4x fewer multiplications than direct convolution, which is how a 2-core AVX2/AVX-512
// CPU beats a direct kernel that already runs near its peak. Per chunk of Tc tiles:
//   1. input transform   V[xi][c][t] = (B^T d B)[xi] for the 6x6 patch d of tile t, channel c
//   2. 36 GEMMs           M[xi] (K x Tc) = U[xi] (K x C) * V[xi] (C x Tc)   (U = G g G^T, once per call)
//   3. output transform   y tile = A^T M A (4x4), plus bias
// Tiles sit innermost (index t contiguous) so both transforms are plain loops over t that the
// compiler vectorises. Threads take whole chunks when there are enough, else split each phase over
// independent outputs (channels, xi, output channels); no sum is ever split between threads, so
// results are bit-for-bit reproducible.
// Accuracy: the transforms mix values of magnitude up to ~10x the input's, so float32 results carry
// a few more ulps of rounding than direct convolution (tests bound it against the float64 reference).
#include <algorithm>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

constexpr int64_t kTile = 4;    // output block per tile
constexpr int64_t kAlpha = 6;   // input patch per tile: kTile + 3 - 1
constexpr int64_t kXi = kAlpha * kAlpha;

// out_k[t] = sum_i B^T[k][i] * in_i[t] for k < 6: the input transform along one axis.
template <typename T>
void input_transform_1d(const T* const in[6], T* const out[6], int64_t n) {
  const T *d0 = in[0], *d1 = in[1], *d2 = in[2], *d3 = in[3], *d4 = in[4], *d5 = in[5];
  T *r0 = out[0], *r1 = out[1], *r2 = out[2], *r3 = out[3], *r4 = out[4], *r5 = out[5];
  for (int64_t t = 0; t < n; ++t) {
    r0[t] = T(4) * d0[t] - T(5) * d2[t] + d4[t];
    r1[t] = -T(4) * (d1[t] + d2[t]) + d3[t] + d4[t];
    r2[t] = T(4) * (d1[t] - d2[t]) - d3[t] + d4[t];
    r3[t] = T(2) * (d3[t] - d1[t]) - d2[t] + d4[t];
    r4[t] = T(2) * (d1[t] - d3[t]) - d2[t] + d4[t];
    r5[t] = T(4) * d1[t] - T(5) * d3[t] + d5[t];
  }
}

// out_k[t] = sum_i A^T[k][i] * in_i[t] for k < 4: the output transform along one axis.
template <typename T>
void output_transform_1d(const T* const in[6], T* const out[4], int64_t n) {
  const T *m0 = in[0], *m1 = in[1], *m2 = in[2], *m3 = in[3], *m4 = in[4], *m5 = in[5];
  T *o0 = out[0], *o1 = out[1], *o2 = out[2], *o3 = out[3];
  for (int64_t t = 0; t < n; ++t) {
    const T a = m1[t] + m2[t], b = m1[t] - m2[t], c = m3[t] + m4[t], d = m3[t] - m4[t];
    o0[t] = m0[t] + a + c;
    o1[t] = b + T(2) * d;
    o2[t] = a + T(4) * c;
    o3[t] = b + T(8) * d + m5[t];
  }
}

// U[xi][k][c] = (G g G^T)[xi] for every filter g = w[k][c], computed in double, one output channel at a
// time: the 36 values of each filter are formed side by side, then copied into U in runs of C values
// (writing 36 places 4 KiB apart per filter would thrash one cache set).
template <typename T>
std::vector<T> transform_filters(const T* w, int64_t K, int64_t C) {
  std::vector<T> U(static_cast<size_t>(kXi * K * C));
  std::vector<double> row(static_cast<size_t>(kXi * C));  // row[c * 36 + xi] for the current k
  auto G = [](double g0, double g1, double g2, double* u) {  // u = G (g0, g1, g2)^T
    u[0] = g0 / 4;
    u[1] = -(g0 + g1 + g2) / 6;
    u[2] = -(g0 - g1 + g2) / 6;
    u[3] = g0 / 24 + g1 / 12 + g2 / 6;
    u[4] = g0 / 24 - g1 / 12 + g2 / 6;
    u[5] = g2;
  };
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const T* g = w + (k * C + c) * 9;
      double cols[3][6];  // G applied down each column of g
      for (int j = 0; j < 3; ++j) G(g[j], g[3 + j], g[6 + j], cols[j]);
      for (int i = 0; i < 6; ++i) {  // then along each row
        double u[6];
        G(cols[0][i], cols[1][i], cols[2][i], u);
        for (int j = 0; j < 6; ++j) row[static_cast<size_t>(c * kXi + i * 6 + j)] = u[j];
      }
    }
    for (int64_t xi = 0; xi < kXi; ++xi) {
      T* u = U.data() + (xi * K + k) * C;
      for (int64_t c = 0; c < C; ++c) u[c] = T(row[static_cast<size_t>(c * kXi + xi)]);
    }
  }
  return U;
}

// stage[(i*6 + j) * stride + t] = the 6x6 patch of one channel at (h0, w0), zero outside the H x W plane.
template <typename T>
void load_patch(const T* xc, int64_t H, int64_t W, int64_t h0, int64_t w0, T* stage, int64_t stride) {
  if (h0 >= 0 && w0 >= 0 && h0 + kAlpha <= H && w0 + kAlpha <= W) {  // interior: no checks
    for (int64_t i = 0; i < kAlpha; ++i) {
      const T* row = xc + (h0 + i) * W + w0;
      for (int64_t j = 0; j < kAlpha; ++j) stage[(i * kAlpha + j) * stride] = row[j];
    }
    return;
  }
  for (int64_t i = 0; i < kAlpha; ++i) {
    const int64_t h = h0 + i;
    for (int64_t j = 0; j < kAlpha; ++j) {
      const int64_t ww = w0 + j;
      stage[(i * kAlpha + j) * stride] = (h >= 0 && h < H && ww >= 0 && ww < W) ? xc[h * W + ww] : T(0);
    }
  }
}

}  // namespace

bool winograd_applies(const Conv2dShape& s) {
  const Window2d& w = s.win;
  return s.R == 3 && s.S == 3 && w.stride_h == 1 && w.stride_w == 1 && w.dilation_h == 1 && w.dilation_w == 1 &&
         s.groups == 1 && s.C >= 8 && s.K >= 8 && s.P >= 4 && s.Q >= 4 &&
         // Enough tiles to amortise transforming and packing every filter (K*C*36 values).
         s.N * ((s.P + 3) / 4) * ((s.Q + 3) / 4) >= 96;
}

namespace {

// Everything one chunk of tiles needs; V and M are per chunk in flight.
template <typename T>
struct WinogradChunk {
  const Conv2dShape& s;
  const T* x;
  const T* U;
  const T* bias;
  T* y;
  int64_t Tc, tile_cols, per_image;
};

// Transforms, multiplies and writes out tiles [t0, t0 + n_tiles). With `parallel`, each phase is
// split among the OpenMP threads (three barriers) and each thread takes its slice of `scratch`;
// without, it runs on the calling thread with `own_scratch` (inside another parallel region the
// thread number of a nested one-thread team is 0, so it cannot pick its own slice).
template <typename T>
void winograd_chunk(const WinogradChunk<T>& job, int64_t t0, int64_t n_tiles, T* V, T* M, int64_t* tiles,
                    Workspace<T>& scratch, T* own_scratch, bool parallel, ParallelErrors& errors) {
  const Conv2dShape& s = job.s;
  const int64_t C = s.C, K = s.K, HW = s.H * s.W, PQ = s.P * s.Q, Tc = job.Tc;
  int64_t *tile_n = tiles, *tile_h = tiles + Tc, *tile_w = tiles + 2 * Tc;
  for (int64_t t = 0; t < n_tiles; ++t) {  // tile -> image and top-left output cell
    const int64_t id = t0 + t, in_image = id % job.per_image;
    tile_n[t] = id / job.per_image;
    tile_h[t] = (in_image / job.tile_cols) * kTile;
    tile_w[t] = (in_image % job.tile_cols) * kTile;
  }

  // 1. Input transform, by channel.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < C; ++c) {
    errors.run([&] {
      T* stage = parallel ? scratch.for_this_thread() : own_scratch;
      T* mid = stage + kXi * Tc;
      for (int64_t t = 0; t < n_tiles; ++t)
        load_patch(job.x + (tile_n[t] * C + c) * HW, s.H, s.W, tile_h[t] - s.win.pad_top,
                   tile_w[t] - s.win.pad_left, stage + t, Tc);
      for (int64_t j = 0; j < kAlpha; ++j) {  // along rows of the patch: mid[k][j] = sum_i Bt[k][i] d[i][j]
        const T* in[6];
        T* out[6];
        for (int i = 0; i < 6; ++i) in[i] = stage + (i * kAlpha + j) * Tc, out[i] = mid + (i * kAlpha + j) * Tc;
        input_transform_1d(in, out, n_tiles);
      }
      for (int64_t k = 0; k < kAlpha; ++k) {  // along columns: V[k][l] = sum_j mid[k][j] Bt[l][j]
        const T* in[6];
        T* out[6];
        for (int j = 0; j < 6; ++j) in[j] = mid + (k * kAlpha + j) * Tc, out[j] = V + ((k * kAlpha + j) * C + c) * Tc;
        input_transform_1d(in, out, n_tiles);
      }
    });
  }
  errors.rethrow();

  // 2. One GEMM per transformed position.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t xi = 0; xi < kXi; ++xi) {
    errors.run([&] {
      gemm<T>(K, n_tiles, C, job.U + xi * K * C, {C, 1}, V + xi * C * Tc, {Tc, 1}, M + xi * K * Tc, Tc, false);
    });
  }
  errors.rethrow();

  // 3. Output transform and bias, by output channel.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t k = 0; k < K; ++k) {
    errors.run([&] {
      T* mid = parallel ? scratch.for_this_thread() : own_scratch;  // 4 x 6 rows after the first pass
      T* out = mid + 4 * kAlpha * Tc;         // 4 x 4 outputs
      for (int64_t j = 0; j < kAlpha; ++j) {  // mid[a][j] = sum_i At[a][i] M[i][j]
        const T* in[6];
        T* o[4];
        for (int i = 0; i < 6; ++i) in[i] = M + ((i * kAlpha + j) * K + k) * Tc;
        for (int a = 0; a < 4; ++a) o[a] = mid + (a * kAlpha + j) * Tc;
        output_transform_1d(in, o, n_tiles);
      }
      for (int64_t a = 0; a < kTile; ++a) {  // out[a][b] = sum_j mid[a][j] At[b][j]
        const T* in[6];
        T* o[4];
        for (int j = 0; j < 6; ++j) in[j] = mid + (a * kAlpha + j) * Tc;
        for (int b = 0; b < 4; ++b) o[b] = out + (a * kTile + b) * Tc;
        output_transform_1d(in, o, n_tiles);
      }
      const T b = job.bias ? job.bias[k] : T(0);
      for (int64_t t = 0; t < n_tiles; ++t) {
        T* yk = job.y + (tile_n[t] * K + k) * PQ;
        const int64_t rows = std::min(kTile, s.P - tile_h[t]), cols = std::min(kTile, s.Q - tile_w[t]);
        for (int64_t a = 0; a < rows; ++a) {
          T* yr = yk + (tile_h[t] + a) * s.Q + tile_w[t];
          for (int64_t bb = 0; bb < cols; ++bb) yr[bb] = out[(a * kTile + bb) * Tc + t] + b;
        }
      }
    });
  }
  errors.rethrow();
}

}  // namespace

template <typename T>
void conv2d_forward_winograd(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const int64_t C = s.C, K = s.K;
  const int64_t tile_cols = (s.Q + kTile - 1) / kTile;
  const int64_t per_image = (s.P + kTile - 1) / kTile * tile_cols, total = s.N * per_image;
  if (total == 0) return;
  // Tiles per chunk: V (36 x C x Tc) of about 4 MiB, and at least 128 tiles: each chunk's 36 GEMMs pack
  // all of U (K x C) again, which only pays off over enough columns.
  const int64_t Tc = std::clamp<int64_t>((int64_t(4) << 20) / (kXi * C * int64_t(sizeof(T))) / 32 * 32, 128, 512);
  const int64_t chunks = (total + Tc - 1) / Tc;
  const std::vector<T> U = transform_filters(w, K, C);
  const WinogradChunk<T> job{s, x, U.data(), bias, y, Tc, tile_cols, per_image};
  const int threads = available_threads();
  const bool worth_threads = double(total) * double(K) * double(C) * kXi >= kMinParallelWork;
  // Enough chunks for every thread: one parallel region, a chunk per thread at a time, no barriers
  // inside (each thread has its own V and M). Otherwise split each phase of each chunk.
  const bool chunk_parallel = worth_threads && threads > 1 && chunks >= threads;
  const int slots = chunk_parallel ? threads : 1;
  const int64_t V_size = kXi * C * Tc, M_size = kXi * K * Tc;
  std::vector<T> V(static_cast<size_t>(slots * V_size)), M(static_cast<size_t>(slots * M_size));
  std::vector<int64_t> tiles(static_cast<size_t>(slots * 3 * Tc));
  Workspace<T> scratch(threads, 2 * kXi * Tc);  // per thread: a 36 x Tc patch stage and an intermediate
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
        winograd_chunk(job, t0, std::min(Tc, total - t0), V.data() + slot * V_size, M.data() + slot * M_size,
                       tiles.data() + slot * 3 * Tc, scratch, scratch.for_this_thread(), false, inner);
      });
    }
    errors.rethrow();
    return;
  }
  for (int64_t t0 = 0; t0 < total; t0 += Tc)
    winograd_chunk(job, t0, std::min(Tc, total - t0), V.data(), M.data(), tiles.data(), scratch,
                   scratch.for_this_thread(), worth_threads, errors);
}

template void conv2d_forward_winograd<float>(const Conv2dShape&, const float*, const float*, const float*, float*);
template void conv2d_forward_winograd<double>(const Conv2dShape&, const double*, const double*, const double*,
                                              double*);

}  // namespace pykernels::cpu
