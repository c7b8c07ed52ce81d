// 2-D cross-correlation on the GPU: forward, backward-input, backward-weight and backward-bias, the
// same maths as csrc/cpu/conv2d.cpp and the same parameter struct (Conv2dShape).
//
// Every pass is an implicit GEMM: the im2col matrix is never stored; the loaders compute, for each
// element of a shared-memory tile, which input cell it is (or that it is padding, then 0). Per group g,
// with CRS = C/groups * R * S:
//   forward          y_g  (K/g x N*P*Q)  = w_g (K/g x CRS)          * col (CRS x N*P*Q)
//   backward-input   gx_g (C/g x N*H*W)  = w_g^T (C/g x K/g*R*S)    * gy-gather (K/g*R*S x N*H*W)
//   backward-weight  gw_g (K/g x CRS)    = gy_g (K/g x N*P*Q)       * col^T (N*P*Q x CRS)
// Backward-input with stride > 1 is split into sh*sw phases (the output cells h = a (mod sh),
// w = b (mod sw)): inside one phase only every (sh/gcd(sh,dh))-th kernel row can reach a cell, so the
// GEMM skips the taps that would only multiply zeros (4x fewer for a stride-2 layer) and needs no
// division per element. Backward-weight reduces over N*P*Q: a block owns a tile of grad_w and sums
// its share of the reduction itself, in order; when there are too few tiles to fill the GPU, the
// reduction is split in a fixed number of chunks (from the shape only) whose partial tiles go to a
// stream-ordered workspace and are summed in chunk order by a second kernel. No atomics anywhere:
// the same inputs give the same bits.
//
// The GEMM (gemm_mainloop): 256 threads, a BM x BN output tile, kBK-deep stages double-buffered in
// shared memory (next stage's global loads are in flight while this stage is multiplied), each thread
// holding TM x TN accumulators in registers, spread in groups of 4 over the tile so that shared-memory
// reads are conflict-free. Two tile shapes: 128x128 (TM = TN = 8), and 32x256 for the GEMMs with few
// rows (K/groups or C/groups <= 32: LeNet, depthwise). float16 is loaded, converted and multiplied in
// float32. Index arithmetic is 32-bit where the tensors allow it (the common case), else 64-bit.
#include <algorithm>
#include <numeric>
#include <vector>

#include "cuda/common.cuh"

namespace pykernels::cuda {

namespace {

constexpr int kBK = 8;   // reduction depth of one shared-memory stage
constexpr int kPad = 4;  // extra columns per shared row: conflict-free transposed stores, rows stay 16-byte aligned

// Two resident blocks per SM (<= 128 registers a thread) for the float32-accumulating GEMMs with 32-bit
// indices; the double and 64-bit-index variants need more registers than that without spilling.
template <typename T, typename I>
constexpr int gemm_min_blocks() {
  return sizeof(Acc<T>) == 4 && sizeof(I) == 4 ? 2 : 1;
}

template <int BM, int BN>
struct Tile {
  static constexpr int TN = 8;
  static constexpr int TM = BM * BN / kThreads / TN;
  static constexpr int TX = BN / TN;  // threads along the columns
  static constexpr int kA = BM * kBK / kThreads;  // A elements one thread loads per stage
  static constexpr int kB = BN * kBK / kThreads;  // B elements one thread loads per stage
  static_assert(TM % 4 == 0 && (BM / TM) * TX == kThreads, "tile does not fit 256 threads");
  static_assert(kA >= 1 && kB >= 1 && BM * kBK % kThreads == 0 && BN * kBK % kThreads == 0, "bad tile");
  // The thread's i-th row / j-th column inside the tile: groups of 4 spread over the tile.
  __device__ static int row(int ty, int i) { return (i / 4) * (BM / (TM / 4)) + ty * 4 + i % 4; }
  __device__ static int col(int tx, int j) { return (j / 4) * (BN / 2) + tx * 4 + j % 4; }
};

// Everything a conv kernel needs, passed by value (kernel parameter space).
template <typename T, typename I>
struct ConvArgs {
  const T* x = nullptr;
  const T* w = nullptr;
  const T* bias = nullptr;
  const T* gy = nullptr;
  T* out = nullptr;
  Acc<T>* partial = nullptr;  // backward-weight split-K workspace, or null

  I N, C, H, W, K, P, Q, R, S, G, Cg, Kg;
  I sh, sw, dh, dw, pt, pl;
  I HW, PQ, RS, CRS, CHW, KPQ;

  // The GEMM: M x Ncols outputs per group, reduced over Kdim in `splits` chunks of k_chunk.
  I M, Ncols, Kdim, k_chunk, splits, m_tiles, n_tiles;
  int64_t tiles;  // G * splits * m_tiles * n_tiles blocks' worth of work
  Step3<I> kstep;  // digits of kBK in the decomposition of the reduction index

  // backward-input phase: output cells h = a + th*sh (th < Hc), w = b + tw*sw (tw < Wc); kernel taps
  // r = r0 + ri*rstep (ri < Rc), s = s0 + si*sstep (si < Sc); they read grad_y row
  // p = p_base + th - ri*pstep and column q = q_base + tw - si*qstep.
  I a, b, Hc, Wc, r0, rstep, Rc, s0, sstep, Sc, p_base, q_base, pstep, qstep;
};

template <typename T, typename I>
ConvArgs<T, I> make_args(const Conv2dShape& s) {
  ConvArgs<T, I> p{};
  const Window2d& w = s.win;
  p.N = I(s.N), p.C = I(s.C), p.H = I(s.H), p.W = I(s.W), p.K = I(s.K), p.P = I(s.P), p.Q = I(s.Q);
  p.R = I(s.R), p.S = I(s.S), p.G = I(s.groups), p.Cg = I(s.C_per_group()), p.Kg = I(s.K_per_group());
  p.sh = I(w.stride_h), p.sw = I(w.stride_w), p.dh = I(w.dilation_h), p.dw = I(w.dilation_w);
  p.pt = I(w.pad_top), p.pl = I(w.pad_left);
  p.HW = I(s.H * s.W), p.PQ = I(s.P * s.Q), p.RS = I(s.R * s.S), p.CRS = I(s.C_per_group() * s.R * s.S);
  p.CHW = I(s.C * s.H * s.W), p.KPQ = I(s.K * s.P * s.Q);
  p.splits = 1;
  return p;
}

// Every value the kernels form stays below kInt32Limit: offsets into x, y and w, window coordinates.
bool conv_fits_int32(const Conv2dShape& s) {
  const Window2d& w = s.win;
  const int64_t values[] = {s.x_numel(), s.y_numel(), s.w_numel(),
                            s.H + w.pad_top + w.pad_bottom + w.stride_h + w.dilation_h,
                            s.W + w.pad_left + w.pad_right + w.stride_w + w.dilation_w};
  for (int64_t v : values)
    if (v >= kInt32Limit) return false;
  return !force_int64_indexing();
}

template <typename I>
__device__ __forceinline__ I div_up(I a, I b) {
  return (a + b - 1) / b;
}

// ---- the loaders' stash into a shared stage: a thread's kCount values go either across the tile
// (one reduction index, every `step`-th row or column) or down the reduction (every `step`-th index).

template <typename AccT, int W, int N>
__device__ __forceinline__ void stash_across(AccT (&stage)[kBK][W], int kk, int first, int step, const AccT (&v)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) stage[kk][first + e * step] = v[e];
}

template <typename AccT, int W, int N>
__device__ __forceinline__ void stash_down(AccT (&stage)[kBK][W], int kk, int first, int step, const AccT (&v)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) stage[kk + e * step][first] = v[e];
}

// ---- the GEMM main loop ------------------------------------------------------------------------------

// acc = A (BM x reduction) * B (reduction x BN) over `steps` stages of kBK, where the loaders
// fetch their share of each stage from global memory (load) and put it into shared memory (stash).
template <int BM, int BN, typename Args, typename AccT, class ALoader, class BLoader>
__device__ __forceinline__ void gemm_mainloop(const Args& p, ALoader& a, BLoader& b, int64_t steps,
                                              AccT (&acc)[Tile<BM, BN>::TM][Tile<BM, BN>::TN]) {
  using TS = Tile<BM, BN>;
  __shared__ AccT As[2][kBK][BM + kPad];
  __shared__ AccT Bs[2][kBK][BN + kPad];
  PK_REGISTER_SHARED(As);
  PK_REGISTER_SHARED(Bs);
  const int tx = int(threadIdx.x) % TS::TX, ty = int(threadIdx.x) / TS::TX;
#pragma unroll
  for (int i = 0; i < TS::TM; ++i)
#pragma unroll
    for (int j = 0; j < TS::TN; ++j) acc[i][j] = AccT(0);
  if (steps <= 0) return;  // uniform over the block: no thread waits at a barrier alone
  AccT ra[TS::kA], rb[TS::kB];
  a.load(p, ra);
  b.load(p, rb);
  a.stash(As[0], ra);
  b.stash(Bs[0], rb);
  __syncthreads();
  for (int64_t step = 0; step < steps; ++step) {
    const int cur = int(step & 1);
    const bool more = step + 1 < steps;
    if (more) {  // the next stage's global loads overlap this stage's arithmetic
      a.load(p, ra);
      b.load(p, rb);
    }
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      AccT av[TS::TM], bv[TS::TN];
#pragma unroll
      for (int i = 0; i < TS::TM; ++i) av[i] = As[cur][k][TS::row(ty, i)];
#pragma unroll
      for (int j = 0; j < TS::TN; ++j) bv[j] = Bs[cur][k][TS::col(tx, j)];
#pragma unroll
      for (int i = 0; i < TS::TM; ++i)
#pragma unroll
        for (int j = 0; j < TS::TN; ++j) acc[i][j] += av[i] * bv[j];
    }
    if (more) {  // the other buffer was last read before the previous barrier
      a.stash(As[cur ^ 1], ra);
      b.stash(Bs[cur ^ 1], rb);
    }
    __syncthreads();
  }
}

// The block's tile: group g, split, rows [m0, m0 + BM), columns [j0, j0 + BN), reduction [kb, ke).
template <typename I>
struct TileOrigin {
  I g, split, m0, j0, kb, ke;
  int64_t steps;
};

template <int BM, int BN, typename T, typename I>
__device__ __forceinline__ TileOrigin<I> tile_origin(const ConvArgs<T, I>& p, int64_t tile) {
  TileOrigin<I> o;
  const I nt = I(tile % p.n_tiles);
  tile /= p.n_tiles;
  const I mt = I(tile % p.m_tiles);
  tile /= p.m_tiles;
  o.g = I(tile % p.G);
  o.split = I(tile / p.G);
  o.m0 = mt * BM;
  o.j0 = nt * BN;
  o.kb = o.split * p.k_chunk;
  o.ke = p.Kdim - o.kb < p.k_chunk ? p.Kdim : o.kb + p.k_chunk;
  o.steps = o.ke > o.kb ? (int64_t(o.ke) - o.kb + kBK - 1) / kBK : 0;
  return o;
}

// ---- forward -----------------------------------------------------------------------------------------

// A(m, kk) = w[g*Kg + m, kk]: weight rows, kk contiguous; consecutive threads take consecutive kk.
template <typename T, typename I, int BM>
struct ForwardA {
  static constexpr int kCount = BM * kBK / kThreads, kRowStep = kThreads / kBK;
  I rowoff[kCount];  // (g*Kg + m) * CRS, or -1 past the last row
  I kk, kend;
  int a_kk, a_m;
  __device__ ForwardA(const ConvArgs<T, I>& p, I g, I m0, I kb, I ke) {
    a_kk = int(threadIdx.x) % kBK;
    a_m = int(threadIdx.x) / kBK;
    kk = kb + a_kk;
    kend = ke;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I m = m0 + a_m + e * kRowStep;
      rowoff[e] = m < p.Kg ? (g * p.Kg + m) * p.CRS : I(-1);
    }
  }
  __device__ void load(const ConvArgs<T, I>& p, Acc<T> (&r)[kCount]) {
    const bool ok = kk < kend;
#pragma unroll
    for (int e = 0; e < kCount; ++e) r[e] = (ok && rowoff[e] >= 0) ? to_acc(p.w[rowoff[e] + kk]) : Acc<T>(0);
    kk += kBK;
  }
  __device__ void stash(Acc<T> (&As)[kBK][BM + kPad], const Acc<T> (&r)[kCount]) const {
    stash_across(As, a_kk, a_m, kRowStep, r);
  }
};

// B(kk, j) = x[n, g*Cg + c, p*sh - pt + r*dh, q*sw - pl + s*dw] for kk = (c, r, s), j = (n, p, q);
// consecutive threads take consecutive j (output columns: neighbouring input cells).
template <typename T, typename I, int BN>
struct ForwardB {
  static constexpr int kCount = BN * kBK / kThreads, kRowStep = kThreads / BN;
  const T* xn;
  I h0, w0, kk, kend;
  I c[kCount], r[kCount], s[kCount];
  bool col_ok;
  int b_j, b_kk;
  __device__ ForwardB(const ConvArgs<T, I>& p, I g, I j0, I kb, I ke) {
    b_j = int(threadIdx.x) % BN;
    b_kk = int(threadIdx.x) / BN;
    const I j = j0 + b_j;
    col_ok = j < p.Ncols;
    I n = 0, pp = 0, q = 0;
    if (col_ok) {
      n = j / p.PQ;
      const I pq = j - n * p.PQ;
      pp = pq / p.Q;
      q = pq - pp * p.Q;
    }
    xn = p.x + (n * p.C + g * p.Cg) * p.HW;
    h0 = pp * p.sh - p.pt;
    w0 = q * p.sw - p.pl;
    kk = kb + b_kk;
    kend = ke;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I k = kk + e * kRowStep;
      c[e] = k / p.RS;
      const I rs = k - c[e] * p.RS;
      r[e] = rs / p.S;
      s[e] = rs - r[e] * p.S;
    }
  }
  __device__ void load(const ConvArgs<T, I>& p, Acc<T> (&v)[kCount]) {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I h = h0 + r[e] * p.dh, w = w0 + s[e] * p.dw;
      const bool ok = col_ok && kk + e * kRowStep < kend && in_range(h, p.H) && in_range(w, p.W);
      v[e] = ok ? to_acc(xn[c[e] * p.HW + h * p.W + w]) : Acc<T>(0);
      advance3(c[e], r[e], s[e], p.kstep, p.R, p.S);
    }
    kk += kBK;
  }
  __device__ void stash(Acc<T> (&Bs)[kBK][BN + kPad], const Acc<T> (&v)[kCount]) const {
    stash_down(Bs, b_kk, b_j, kRowStep, v);
  }
};

template <typename T, typename I, int BM, int BN>
__global__ void __launch_bounds__(kThreads, gemm_min_blocks<T, I>()) conv2d_forward_kernel(const ConvArgs<T, I> p) {
  using TS = Tile<BM, BN>;
  const int tx = int(threadIdx.x) % TS::TX, ty = int(threadIdx.x) / TS::TX;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const TileOrigin<I> o = tile_origin<BM, BN>(p, tile);
    ForwardA<T, I, BM> a(p, o.g, o.m0, o.kb, o.ke);
    ForwardB<T, I, BN> b(p, o.g, o.j0, o.kb, o.ke);
    Acc<T> acc[TS::TM][TS::TN];
    gemm_mainloop<BM, BN>(p, a, b, o.steps, acc);
#pragma unroll
    for (int j = 0; j < TS::TN; ++j) {
      const I col = o.j0 + TS::col(tx, j);
      if (col >= p.Ncols) continue;
      const I n = col / p.PQ, pq = col - n * p.PQ;
#pragma unroll
      for (int i = 0; i < TS::TM; ++i) {
        const I m = o.m0 + TS::row(ty, i);
        if (m >= p.Kg) continue;
        const I k = o.g * p.Kg + m;
        const Acc<T> bias = p.bias ? to_acc(p.bias[k]) : Acc<T>(0);
        p.out[(n * p.K + k) * p.PQ + pq] = from_acc<T>(acc[i][j] + bias);
      }
    }
  }
}

// ---- backward-input ------------------------------------------------------------------------------------

// Decomposes reduction index kk into (k, ri, si) over (Kg, Rc, Sc).
template <typename I>
__device__ __forceinline__ void decode_krs(I kk, I Rc, I Sc, I& k, I& ri, I& si) {
  const I RcSc = Rc * Sc;
  if (RcSc == 0) {  // no tap reaches this phase: the reduction is empty
    k = ri = si = 0;
    return;
  }
  k = kk / RcSc;
  const I rem = kk - k * RcSc;
  ri = rem / Sc;
  si = rem - ri * Sc;
}

// A(m, kk) = w[g*Kg + k, m, r0 + ri*rstep, s0 + si*sstep] for m = input channel c, kk = (k, ri, si);
// consecutive threads take consecutive c (strided reads of the small, cached weight tensor).
template <typename T, typename I, int BM>
struct BackwardInputA {
  static constexpr int kCount = BM * kBK / kThreads, kRowStep = kThreads / BM;
  const T* wc;
  I kk, kend;
  I k[kCount], ri[kCount], si[kCount];
  bool row_ok;
  int a_m, a_kk;
  __device__ BackwardInputA(const ConvArgs<T, I>& p, I g, I m0, I kb, I ke) {
    a_m = int(threadIdx.x) % BM;
    a_kk = int(threadIdx.x) / BM;
    const I m = m0 + a_m;
    row_ok = m < p.Cg;
    wc = p.w + g * p.Kg * p.CRS + (row_ok ? m : I(0)) * p.RS;
    kk = kb + a_kk;
    kend = ke;
#pragma unroll
    for (int e = 0; e < kCount; ++e) decode_krs(I(kk + e * kRowStep), p.Rc, p.Sc, k[e], ri[e], si[e]);
  }
  __device__ void load(const ConvArgs<T, I>& p, Acc<T> (&v)[kCount]) {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const bool ok = row_ok && kk + e * kRowStep < kend;
      v[e] = ok ? to_acc(wc[k[e] * p.CRS + (p.r0 + ri[e] * p.rstep) * p.S + p.s0 + si[e] * p.sstep]) : Acc<T>(0);
      advance3(k[e], ri[e], si[e], p.kstep, p.Rc, p.Sc);
    }
    kk += kBK;
  }
  __device__ void stash(Acc<T> (&As)[kBK][BM + kPad], const Acc<T> (&v)[kCount]) const {
    stash_down(As, a_kk, a_m, kRowStep, v);
  }
};

// B(kk, j) = grad_y[n, g*Kg + k, p_base + th - ri*pstep, q_base + tw - si*qstep] for kk = (k, ri, si),
// j = (n, th, tw); consecutive threads take consecutive tw.
template <typename T, typename I, int BN>
struct BackwardInputB {
  static constexpr int kCount = BN * kBK / kThreads, kRowStep = kThreads / BN;
  const T* gyn;
  I pc, qc, kk, kend;
  I k[kCount], ri[kCount], si[kCount];
  bool col_ok;
  int b_j, b_kk;
  __device__ BackwardInputB(const ConvArgs<T, I>& p, I g, I j0, I kb, I ke) {
    b_j = int(threadIdx.x) % BN;
    b_kk = int(threadIdx.x) / BN;
    const I j = j0 + b_j;
    col_ok = j < p.Ncols;
    I n = 0, th = 0, tw = 0;
    if (col_ok) {
      const I HcWc = p.Hc * p.Wc;
      n = j / HcWc;
      const I t = j - n * HcWc;
      th = t / p.Wc;
      tw = t - th * p.Wc;
    }
    gyn = p.gy + (n * p.K + g * p.Kg) * p.PQ;
    pc = p.p_base + th;
    qc = p.q_base + tw;
    kk = kb + b_kk;
    kend = ke;
#pragma unroll
    for (int e = 0; e < kCount; ++e) decode_krs(I(kk + e * kRowStep), p.Rc, p.Sc, k[e], ri[e], si[e]);
  }
  __device__ void load(const ConvArgs<T, I>& p, Acc<T> (&v)[kCount]) {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I pp = pc - ri[e] * p.pstep, qq = qc - si[e] * p.qstep;
      const bool ok = col_ok && kk + e * kRowStep < kend && in_range(pp, p.P) && in_range(qq, p.Q);
      v[e] = ok ? to_acc(gyn[k[e] * p.PQ + pp * p.Q + qq]) : Acc<T>(0);
      advance3(k[e], ri[e], si[e], p.kstep, p.Rc, p.Sc);
    }
    kk += kBK;
  }
  __device__ void stash(Acc<T> (&Bs)[kBK][BN + kPad], const Acc<T> (&v)[kCount]) const {
    stash_down(Bs, b_kk, b_j, kRowStep, v);
  }
};

template <typename T, typename I, int BM, int BN>
__global__ void __launch_bounds__(kThreads, gemm_min_blocks<T, I>())
    conv2d_backward_input_kernel(const ConvArgs<T, I> p) {
  using TS = Tile<BM, BN>;
  const int tx = int(threadIdx.x) % TS::TX, ty = int(threadIdx.x) / TS::TX;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const TileOrigin<I> o = tile_origin<BM, BN>(p, tile);
    BackwardInputA<T, I, BM> a(p, o.g, o.m0, o.kb, o.ke);
    BackwardInputB<T, I, BN> b(p, o.g, o.j0, o.kb, o.ke);
    Acc<T> acc[TS::TM][TS::TN];
    gemm_mainloop<BM, BN>(p, a, b, o.steps, acc);
    const I HcWc = p.Hc * p.Wc;
#pragma unroll
    for (int j = 0; j < TS::TN; ++j) {
      const I col = o.j0 + TS::col(tx, j);
      if (col >= p.Ncols) continue;
      const I n = col / HcWc, t = col - n * HcWc, th = t / p.Wc, tw = t - th * p.Wc;
      const I h = p.a + th * p.sh, w = p.b + tw * p.sw;
#pragma unroll
      for (int i = 0; i < TS::TM; ++i) {
        const I c = o.m0 + TS::row(ty, i);
        if (c >= p.Cg) continue;
        p.out[((n * p.C + o.g * p.Cg + c) * p.H + h) * p.W + w] = from_acc<T>(acc[i][j]);
      }
    }
  }
}

// ---- backward-weight -----------------------------------------------------------------------------------

// A(m, kk) = grad_y[n, g*Kg + m, pq] for kk = (n, pq); consecutive threads take consecutive pq.
template <typename T, typename I, int BM>
struct BackwardWeightA {
  static constexpr int kCount = BM * kBK / kThreads, kRowStep = kThreads / kBK;
  I rowoff[kCount];  // (g*Kg + m) * PQ, or -1 past the last row
  I n, pq, kk, kend, dn, dpq;
  int a_kk, a_m;
  __device__ BackwardWeightA(const ConvArgs<T, I>& p, I g, I m0, I kb, I ke) {
    a_kk = int(threadIdx.x) % kBK;
    a_m = int(threadIdx.x) / kBK;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I m = m0 + a_m + e * kRowStep;
      rowoff[e] = m < p.Kg ? (g * p.Kg + m) * p.PQ : I(-1);
    }
    kk = kb + a_kk;
    kend = ke;
    n = kk / p.PQ;
    pq = kk - n * p.PQ;
    dn = kBK / p.PQ;  // kBK = dn*PQ + dpq: the stage step in (n, pq) digits
    dpq = kBK - dn * p.PQ;
  }
  __device__ void load(const ConvArgs<T, I>& p, Acc<T> (&v)[kCount]) {
    const bool ok = kk < kend;
#pragma unroll
    for (int e = 0; e < kCount; ++e)
      v[e] = (ok && rowoff[e] >= 0) ? to_acc(p.gy[n * p.KPQ + rowoff[e] + pq]) : Acc<T>(0);
    pq += dpq;
    if (pq >= p.PQ) {
      pq -= p.PQ;
      ++n;
    }
    n += dn;
    kk += kBK;
  }
  __device__ void stash(Acc<T> (&As)[kBK][BM + kPad], const Acc<T> (&v)[kCount]) const {
    stash_across(As, a_kk, a_m, kRowStep, v);
  }
};

// B(kk, j) = x[n, g*Cg + c, p*sh - pt + r*dh, q*sw - pl + s*dw] for kk = (n, p, q), j = (c, r, s);
// consecutive threads take consecutive q (neighbouring input cells).
template <typename T, typename I, int BN>
struct BackwardWeightB {
  static constexpr int kCount = BN * kBK / kThreads, kColStep = kThreads / kBK;
  const T* xg;
  I coff[kCount], hoff[kCount], woff[kCount];  // c*HW (or -1 past the last column), r*dh - pt, s*dw - pl
  I n, pp, q, kk, kend;
  int b_kk, b_j;
  __device__ BackwardWeightB(const ConvArgs<T, I>& p, I g, I j0, I kb, I ke) {
    b_kk = int(threadIdx.x) % kBK;
    b_j = int(threadIdx.x) / kBK;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I j = j0 + b_j + e * kColStep;
      coff[e] = I(-1);
      hoff[e] = woff[e] = 0;
      if (j < p.CRS) {
        const I c = j / p.RS, rs = j - c * p.RS, r = rs / p.S, s = rs - r * p.S;
        coff[e] = c * p.HW;
        hoff[e] = r * p.dh - p.pt;
        woff[e] = s * p.dw - p.pl;
      }
    }
    xg = p.x + g * p.Cg * p.HW;
    kk = kb + b_kk;
    kend = ke;
    n = kk / p.PQ;
    const I pq = kk - n * p.PQ;
    pp = pq / p.Q;
    q = pq - pp * p.Q;
  }
  __device__ void load(const ConvArgs<T, I>& p, Acc<T> (&v)[kCount]) {
    const bool ok = kk < kend;
    const I hb = pp * p.sh, wb = q * p.sw;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const I h = hb + hoff[e], w = wb + woff[e];
      const bool in = ok && coff[e] >= 0 && in_range(h, p.H) && in_range(w, p.W);
      v[e] = in ? to_acc(xg[n * p.CHW + coff[e] + h * p.W + w]) : Acc<T>(0);
    }
    advance3(n, pp, q, p.kstep, p.P, p.Q);
    kk += kBK;
  }
  __device__ void stash(Acc<T> (&Bs)[kBK][BN + kPad], const Acc<T> (&v)[kCount]) const {
    stash_across(Bs, b_kk, b_j, kColStep, v);
  }
};

template <typename T, typename I, int BM, int BN>
__global__ void __launch_bounds__(kThreads, gemm_min_blocks<T, I>())
    conv2d_backward_weight_kernel(const ConvArgs<T, I> p) {
  using TS = Tile<BM, BN>;
  const int tx = int(threadIdx.x) % TS::TX, ty = int(threadIdx.x) / TS::TX;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const TileOrigin<I> o = tile_origin<BM, BN>(p, tile);
    BackwardWeightA<T, I, BM> a(p, o.g, o.m0, o.kb, o.ke);
    BackwardWeightB<T, I, BN> b(p, o.g, o.j0, o.kb, o.ke);
    Acc<T> acc[TS::TM][TS::TN];
    gemm_mainloop<BM, BN>(p, a, b, o.steps, acc);
#pragma unroll
    for (int i = 0; i < TS::TM; ++i) {
      const I m = o.m0 + TS::row(ty, i);
      if (m >= p.Kg) continue;
      const int64_t row = (int64_t(o.g) * p.Kg + m) * p.CRS;  // into grad_w, or this split's slice of partial
#pragma unroll
      for (int j = 0; j < TS::TN; ++j) {
        const I col = o.j0 + TS::col(tx, j);
        if (col >= p.CRS) continue;
        if (p.partial)
          p.partial[int64_t(o.split) * p.G * p.Kg * p.CRS + row + col] = acc[i][j];
        else
          p.out[row + col] = from_acc<T>(acc[i][j]);
      }
    }
  }
}

// grad_w[i] = sum over splits s = 0, 1, ... of partial[s][i], in that order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const Acc<T>* __restrict__ partial, int64_t count, int64_t splits, T* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < count; i += int64_t(gridDim.x) * kThreads) {
    Acc<T> sum = partial[i];
    for (int64_t s = 1; s < splits; ++s) sum += partial[s * count + i];
    out[i] = from_acc<T>(sum);
  }
}

// ---- backward-bias -------------------------------------------------------------------------------------

// Block (k, split) sums grad_y[:, k] over its chunk of the N*P*Q values in a fixed pattern (thread t
// takes elements t, t + 256, ...; then a fixed tree), in double.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bias_grad_kernel(const T* __restrict__ gy, int64_t K, int64_t PQ, int64_t total, int64_t chunk, int64_t splits,
                     T* __restrict__ out, double* __restrict__ partial) {
  __shared__ double red[kThreads];
  PK_REGISTER_SHARED(red);
  const int tid = int(threadIdx.x);
  const int64_t dn = kThreads / PQ, di = kThreads - dn * PQ;  // the thread stride in (n, i) digits
  for (int64_t blk = blockIdx.x; blk < K * splits; blk += gridDim.x) {
    const int64_t k = blk / splits, split = blk - k * splits;
    const int64_t begin = split * chunk, end = begin + chunk < total ? begin + chunk : total;
    int64_t j = begin + tid, n = j / PQ, i = j - n * PQ;
    double sum = 0;
    for (; j < end; j += kThreads) {
      sum += double(to_acc(gy[(n * K + k) * PQ + i]));
      i += di;
      if (i >= PQ) {
        i -= PQ;
        ++n;
      }
      n += dn;
    }
    red[tid] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (tid < half) red[tid] += red[tid + half];
      __syncthreads();
    }
    if (tid == 0) {
      if (partial)
        partial[k * splits + split] = red[0];
      else
        out[k] = from_double<T>(red[0]);
    }
    __syncthreads();  // red is reused by the next block of the loop
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bias_sum_splits_kernel(const double* __restrict__ partial, int64_t K, int64_t splits, T* __restrict__ out) {
  for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < K; k += int64_t(gridDim.x) * kThreads) {
    double sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[k * splits + s];
    out[k] = from_double<T>(sum);
  }
}

// ---- launchers -----------------------------------------------------------------------------------------

template <typename I>
struct IndexTag {
  using type = I;
};
template <int BM_, int BN_>
struct TileTag {
  static constexpr int BM = BM_, BN = BN_;
};

// Calls f(IndexTag, TileTag) with 32-bit indices where they suffice, and the 32x256 tile for GEMMs
// of at most 32 rows.
template <class F>
void dispatch(const Conv2dShape& s, int64_t rows, F&& f) {
  if (!conv_fits_int32(s))
    f(IndexTag<int64_t>{}, TileTag<128, 128>{});
  else if (rows <= 32)
    f(IndexTag<int32_t>{}, TileTag<32, 256>{});
  else
    f(IndexTag<int32_t>{}, TileTag<128, 128>{});
}

template <int BM, int BN, typename T, typename I>
void set_grid(ConvArgs<T, I>& p, int64_t M, int64_t Ncols, int64_t Kdim, int64_t splits, int64_t k_chunk) {
  p.M = I(M);
  p.Ncols = I(Ncols);
  p.Kdim = I(Kdim);
  p.splits = I(splits);
  p.k_chunk = I(k_chunk);
  p.m_tiles = I((M + BM - 1) / BM);
  p.n_tiles = I((Ncols + BN - 1) / BN);
  p.tiles = int64_t(p.G) * splits * p.m_tiles * p.n_tiles;
}

unsigned tile_grid(int64_t tiles) { return unsigned(std::max<int64_t>(1, std::min(tiles, kMaxGridX))); }

// Enough blocks to fill any current GPU a few times over; the split count is a function of the
// shape only, so the summation order (and the bits) never depend on the device or the run.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinStagesPerSplit = 16;
constexpr int64_t kMaxWorkspaceBytes = int64_t(256) << 20;

}  // namespace

template <typename T>
void conv2d_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y, cudaStream_t stream) {
  if (s.y_numel() == 0) return;
  dispatch(s, s.K_per_group(), [&](auto index, auto tile) {
    using I = typename decltype(index)::type;
    constexpr int BM = decltype(tile)::BM, BN = decltype(tile)::BN;
    ConvArgs<T, I> p = make_args<T, I>(s);
    p.x = x, p.w = w, p.bias = bias, p.out = y;
    const int64_t CRS = s.C_per_group() * s.R * s.S;
    set_grid<BM, BN>(p, s.K_per_group(), s.N * s.P * s.Q, CRS, 1, CRS);
    p.kstep = split_step<I>(kBK, s.R, s.S);
    auto* kernel = conv2d_forward_kernel<T, I, BM, BN>;
    PK_LAUNCH(kernel, tile_grid(p.tiles), kThreads, 0, stream, p);
    check_launch("conv2d forward kernel launch");
  });
}

template <typename T>
void conv2d_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x, cudaStream_t stream) {
  if (s.x_numel() == 0) return;
  const Window2d& win = s.win;
  const int64_t sh = win.stride_h, sw = win.stride_w, dh = win.dilation_h, dw = win.dilation_w;
  // Taps of one phase along one axis: the r in [0, R) with (a + pad - r*d) divisible by the stride.
  struct Taps {
    int64_t first = 0, step = 1, count = 0, out_base = 0, out_step = 0;
  };
  auto taps = [](int64_t a, int64_t pad, int64_t kernel, int64_t stride, int64_t dil) {
    Taps t;
    for (int64_t r = 0; r < std::min(kernel, stride); ++r) {
      const int64_t num = a + pad - r * dil;
      if (((num % stride) + stride) % stride == 0) {
        t.first = r;
        t.step = stride / std::gcd(stride, dil);
        t.count = (kernel - 1 - r) / t.step + 1;
        t.out_base = num / stride;  // exact
        t.out_step = t.step * dil / stride;
        break;
      }
    }
    return t;
  };
  // The phases that some tap reaches (at most min(R, sh) x min(S, sw) of them); cells of the other
  // phases get no gradient at all: zero them first (only happens when the stride exceeds the kernel).
  auto reached = [](int64_t in, int64_t pad, int64_t kernel, int64_t stride, int64_t dil) {
    std::vector<int64_t> phases;
    for (int64_t r = 0; r < kernel; ++r) {
      const int64_t a = ((r * dil - pad) % stride + stride) % stride;
      if (a < in) phases.push_back(a);
    }
    std::sort(phases.begin(), phases.end());
    phases.erase(std::unique(phases.begin(), phases.end()), phases.end());
    return phases;
  };
  const std::vector<int64_t> phases_h = reached(s.H, win.pad_top, s.R, sh, dh);
  const std::vector<int64_t> phases_w = reached(s.W, win.pad_left, s.S, sw, dw);
  if (int64_t(phases_h.size()) < std::min(sh, s.H) || int64_t(phases_w.size()) < std::min(sw, s.W))
    check_cuda(cudaMemsetAsync(grad_x, 0, size_t(s.x_numel()) * sizeof(T), stream), "conv2d backward-input");
  dispatch(s, s.C_per_group(), [&](auto index, auto tile) {
    using I = typename decltype(index)::type;
    constexpr int BM = decltype(tile)::BM, BN = decltype(tile)::BN;
    for (const int64_t a : phases_h) {
      const Taps tr = taps(a, win.pad_top, s.R, sh, dh);
      for (const int64_t b : phases_w) {
        const Taps ts = taps(b, win.pad_left, s.S, sw, dw);
        ConvArgs<T, I> p = make_args<T, I>(s);
        p.gy = grad_y, p.w = w, p.out = grad_x;
        const int64_t Hc = (s.H - a + sh - 1) / sh, Wc = (s.W - b + sw - 1) / sw;
        p.a = I(a), p.b = I(b), p.Hc = I(Hc), p.Wc = I(Wc);
        p.r0 = I(tr.first), p.rstep = I(tr.step), p.Rc = I(tr.count), p.p_base = I(tr.out_base),
        p.pstep = I(tr.out_step);
        p.s0 = I(ts.first), p.sstep = I(ts.step), p.Sc = I(ts.count), p.q_base = I(ts.out_base),
        p.qstep = I(ts.out_step);
        const int64_t Kdim = s.K_per_group() * tr.count * ts.count;  // > 0: both phases are reached
        set_grid<BM, BN>(p, s.C_per_group(), s.N * Hc * Wc, Kdim, 1, Kdim);
        p.kstep = split_step<I>(kBK, tr.count, ts.count);
        auto* kernel = conv2d_backward_input_kernel<T, I, BM, BN>;
        PK_LAUNCH(kernel, tile_grid(p.tiles), kThreads, 0, stream, p);
        check_launch("conv2d backward-input kernel launch");
      }
    }
  });
}

template <typename T>
void conv2d_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w, cudaStream_t stream) {
  const int64_t w_numel = s.w_numel();
  if (s.N == 0) {  // an empty sum
    check_cuda(cudaMemsetAsync(grad_w, 0, size_t(w_numel) * sizeof(T), stream), "conv2d backward-weight");
    return;
  }
  dispatch(s, s.K_per_group(), [&](auto index, auto tile) {
    using I = typename decltype(index)::type;
    constexpr int BM = decltype(tile)::BM, BN = decltype(tile)::BN;
    const int64_t Kg = s.K_per_group(), CRS = s.C_per_group() * s.R * s.S, Kdim = s.N * s.P * s.Q;
    const int64_t base_tiles = s.groups * ((Kg + BM - 1) / BM) * ((CRS + BN - 1) / BN);
    const int64_t stages = (Kdim + kBK - 1) / kBK;
    int64_t splits = 1;
    if (base_tiles < kTargetBlocks) {
      splits = (kTargetBlocks + base_tiles - 1) / base_tiles;
      splits = std::min(splits, std::max<int64_t>(1, stages / kMinStagesPerSplit));
      splits = std::min(splits, std::max<int64_t>(1, kMaxWorkspaceBytes / (w_numel * int64_t(sizeof(Acc<T>)))));
    }
    const int64_t stages_per_split = (stages + splits - 1) / splits;
    splits = (stages + stages_per_split - 1) / stages_per_split;  // no empty split
    ConvArgs<T, I> p = make_args<T, I>(s);
    p.gy = grad_y, p.x = x, p.out = grad_w;
    set_grid<BM, BN>(p, Kg, CRS, Kdim, splits, stages_per_split * kBK);
    p.kstep = split_step<I>(kBK, s.P, s.Q);
    auto* kernel = conv2d_backward_weight_kernel<T, I, BM, BN>;
    if (splits == 1) {
      PK_LAUNCH(kernel, tile_grid(p.tiles), kThreads, 0, stream, p);
      check_launch("conv2d backward-weight kernel launch");
      return;
    }
    Workspace ws(size_t(splits * w_numel) * sizeof(Acc<T>), stream, "conv2d backward-weight workspace");
    p.partial = ws.as<Acc<T>>();
    PK_LAUNCH(kernel, tile_grid(p.tiles), kThreads, 0, stream, p);
    check_launch("conv2d backward-weight kernel launch");
    auto* sum = sum_splits_kernel<T>;
    PK_LAUNCH(sum, grid_for(w_numel), kThreads, 0, stream, p.partial, w_numel, splits, grad_w);
    check_launch("conv2d backward-weight reduction launch");
  });
}

template <typename T>
void conv2d_backward_bias(const Conv2dShape& s, const T* grad_y, T* grad_b, cudaStream_t stream) {
  const int64_t PQ = s.P * s.Q, total = s.N * PQ;
  if (s.K == 0) return;
  if (total == 0) {
    check_cuda(cudaMemsetAsync(grad_b, 0, size_t(s.K) * sizeof(T), stream), "conv2d backward-bias");
    return;
  }
  // Split each channel's sum in fixed chunks when there are few channels and many values.
  const int64_t per_block = int64_t(kThreads) * 16;
  const int64_t splits = std::max<int64_t>(1, std::min((kTargetBlocks + s.K - 1) / s.K, total / per_block));
  const int64_t chunk = (total + splits - 1) / splits;
  auto* kernel = bias_grad_kernel<T>;
  const unsigned blocks = unsigned(std::min<int64_t>(s.K * splits, kMaxGridX));
  if (splits == 1) {
    PK_LAUNCH(kernel, blocks, kThreads, 0, stream, grad_y, s.K, PQ, total, chunk, splits, grad_b, nullptr);
    check_launch("conv2d backward-bias kernel launch");
    return;
  }
  Workspace ws(size_t(s.K * splits) * sizeof(double), stream, "conv2d backward-bias workspace");
  double* partial = ws.as<double>();
  PK_LAUNCH(kernel, blocks, kThreads, 0, stream, grad_y, s.K, PQ, total, chunk, splits, grad_b, partial);
  check_launch("conv2d backward-bias kernel launch");
  auto* sum = bias_sum_splits_kernel<T>;
  PK_LAUNCH(sum, grid_for(s.K), kThreads, 0, stream, partial, s.K, splits, grad_b);
  check_launch("conv2d backward-bias reduction launch");
}

#define PYKERNELS_INSTANTIATE(T)                                                                             \
  template void conv2d_forward<T>(const Conv2dShape&, const T*, const T*, const T*, T*, cudaStream_t);        \
  template void conv2d_backward_input<T>(const Conv2dShape&, const T*, const T*, T*, cudaStream_t);           \
  template void conv2d_backward_weight<T>(const Conv2dShape&, const T*, const T*, T*, cudaStream_t);          \
  template void conv2d_backward_bias<T>(const Conv2dShape&, const T*, T*, cudaStream_t);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
PYKERNELS_INSTANTIATE(__half)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cuda
