// 2-D max pooling on the GPU: forward (with optional indices) and backward, the same rules as
// csrc/cpu/max_pool2d.cpp and the same parameter struct (Pool2dShape).
//
// Forward: one thread per output. Each window scans only its in-bounds cells (padding acts as -inf,
// so it can never win) in row-major order; a later cell wins only if strictly greater (ties go to the
// first maximum) or if it is the first NaN (NaN propagates with the index of the first NaN, NumPy's
// argmax rule). A window of only -inf keeps its first in-bounds cell: never an index of -1.
// Consecutive threads take consecutive outputs of a row, so reads and writes coalesce.
//
// Backward: a gather, one thread per input cell: it sums, in a fixed order (window row, then column),
// the gradients of the windows whose index names it. No atomics, so bit-for-bit deterministic, and
// every byte of grad_x is written exactly once. Indices come from the user, so each is checked on the
// way: the thread that owns the first in-bounds cell of a window checks that window's index (so every
// index is checked exactly once, in the same pass) and records the smallest bad position with an
// integer atomicMin; the launcher reads that one value back (the only synchronisation).
// Index arithmetic is 32-bit when the tensors allow it (divisions are the cost here), else 64-bit.
#include "cuda/common.cuh"

namespace pykernels::cuda {

namespace {

template <typename I>
struct PoolArgs {
  I N, C, H, W, P, Q;
  I kh, kw, sh, sw, dh, dw, pt, pl;
  I HW, PQ;
};

template <typename I>
PoolArgs<I> pool_args(const Pool2dShape& s) {
  PoolArgs<I> a;
  a.N = I(s.N), a.C = I(s.C), a.H = I(s.H), a.W = I(s.W), a.P = I(s.P), a.Q = I(s.Q);
  a.kh = I(s.win.kernel_h), a.kw = I(s.win.kernel_w), a.sh = I(s.win.stride_h), a.sw = I(s.win.stride_w);
  a.dh = I(s.win.dilation_h), a.dw = I(s.win.dilation_w), a.pt = I(s.win.pad_top), a.pl = I(s.win.pad_left);
  a.HW = I(s.H * s.W), a.PQ = I(s.P * s.Q);
  return a;
}

// Every value the kernels form (offsets, window starts and ends) fits in 31 bits.
bool pool_fits_int32(const Pool2dShape& s) {
  const Window2d& w = s.win;
  const int64_t values[] = {s.x_numel(), s.y_numel(), s.H + w.pad_top + w.pad_bottom + w.stride_h,
                            s.W + w.pad_left + w.pad_right + w.stride_w,
                            w.dilation_h * (w.kernel_h - 1) + 1 + s.H + w.pad_top,
                            w.dilation_w * (w.kernel_w - 1) + 1 + s.W + w.pad_left};
  for (int64_t v : values)
    if (v >= kInt32Limit) return false;
  return !force_int64_indexing();
}

// First tap j >= 0 with start + j*dilation >= 0, and one past the last tap inside [0, limit).
template <typename I>
__device__ __forceinline__ void taps_inside(I start, I kernel, I dilation, I limit, I& begin, I& end) {
  begin = start >= 0 ? I(0) : (-start + dilation - 1) / dilation;
  end = start > limit - 1 ? I(0) : (limit - 1 - start) / dilation + 1;
  if (end > kernel) end = kernel;
  if (end < begin) end = begin;
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_forward_kernel(const PoolArgs<I> a, const T* __restrict__ x, T* __restrict__ y,
                              int64_t* __restrict__ indices) {
  const I total = a.N * a.C * a.PQ;
  for (I o = I(blockIdx.x) * kThreads + I(threadIdx.x); o < total; o += I(gridDim.x) * kThreads) {
    const I q = o % a.Q, pq = o % a.PQ, plane = o / a.PQ, p = pq / a.Q;
    const T* xp = x + plane * a.HW;
    const I h0 = p * a.sh - a.pt, w0 = q * a.sw - a.pl;
    I r0, r1, c0, c1;
    taps_inside(h0, a.kh, a.dh, a.H, r0, r1);
    taps_inside(w0, a.kw, a.dw, a.W, c0, c1);
    // Pool2dShape::validate guarantees r0 < r1 and c0 < c1 (every window overlaps the input).
    I best_at = (h0 + r0 * a.dh) * a.W + w0 + c0 * a.dw;
    T best = xp[best_at];
    auto best_v = to_acc(best);
    bool nan = best_v != best_v;
    for (I r = r0; r < r1 && !nan; ++r) {
      const I row_at = (h0 + r * a.dh) * a.W + w0;
      for (I c = c0; c < c1; ++c) {
        const I at = row_at + c * a.dw;
        const T v = xp[at];
        const auto vv = to_acc(v);
        if (vv > best_v || vv != vv) {
          best = v;
          best_v = vv;
          best_at = at;
          if (vv != vv) {
            nan = true;  // the first NaN wins; the row loop stops too
            break;
          }
        }
      }
    }
    y[o] = best;
    if (indices) indices[o] = int64_t(best_at);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_backward_kernel(const PoolArgs<I> a, const T* __restrict__ grad_y, const int64_t* __restrict__ indices,
                               T* __restrict__ grad_x, unsigned long long* __restrict__ first_bad) {
  const I total = a.N * a.C * a.HW;
  for (I i = I(blockIdx.x) * kThreads + I(threadIdx.x); i < total; i += I(gridDim.x) * kThreads) {
    const I w = i % a.W, hw = i % a.HW, plane = i / a.HW, h = hw / a.W;
    const int64_t* ip = indices + plane * a.PQ;
    const T* gyp = grad_y + plane * a.PQ;
    // Window rows p with h = p*sh - pt + r*dh for a tap r: r in [r_lo, r_hi) keeps p in [0, P).
    const I hp = h + a.pt, wp = w + a.pl;
    const I r_hi = (hp / a.dh + 1 < a.kh) ? hp / a.dh + 1 : a.kh;                 // p*sh = hp - r*dh >= 0
    const I over_h = hp - (a.P - 1) * a.sh;                                       // p <= P-1
    const I r_lo = over_h > 0 ? (over_h + a.dh - 1) / a.dh : I(0);
    const I c_hi = (wp / a.dw + 1 < a.kw) ? wp / a.dw + 1 : a.kw;
    const I over_w = wp - (a.Q - 1) * a.sw;
    const I c_lo = over_w > 0 ? (over_w + a.dw - 1) / a.dw : I(0);
    Acc<T> sum = 0;
    for (I r = r_lo; r < r_hi; ++r) {
      const I ph = hp - r * a.dh;
      if (ph % a.sh != 0) continue;
      const I p = ph / a.sh;
      const bool first_row = r == 0 || h < a.dh;  // the previous tap of this window is above the input
      for (I c = c_lo; c < c_hi; ++c) {
        const I qw = wp - c * a.dw;
        if (qw % a.sw != 0) continue;
        const I o = p * a.Q + qw / a.sw;
        const int64_t idx = ip[o];
        if (first_row && (c == 0 || w < a.dw)) {
          // This cell is the window's first in-bounds cell: check the window's index (once).
          bool ok = idx >= 0 && idx < int64_t(a.HW);
          if (ok) {
            const int64_t dh = idx / a.W - (int64_t(p) * a.sh - a.pt);
            const int64_t dw = idx % a.W - (int64_t(qw / a.sw) * a.sw - a.pl);
            ok = dh >= 0 && dw >= 0 && dh % a.dh == 0 && dw % a.dw == 0 && dh / a.dh < a.kh && dw / a.dw < a.kw;
          }
          if (!ok) atomicMin(first_bad, (unsigned long long)(int64_t(plane) * a.PQ + o));
        }
        if (idx == int64_t(hw)) sum += to_acc(gyp[o]);
      }
    }
    grad_x[i] = from_acc<T>(sum);
  }
}

}  // namespace

template <typename T>
void max_pool2d_forward(const Pool2dShape& s, const T* x, T* y, int64_t* indices, cudaStream_t stream) {
  const int64_t total = s.y_numel();
  if (total == 0) return;
  if (pool_fits_int32(s)) {
    auto* kernel = max_pool2d_forward_kernel<T, int32_t>;
    PK_LAUNCH(kernel, grid_for(total), kThreads, 0, stream, pool_args<int32_t>(s), x, y, indices);
  } else {
    auto* kernel = max_pool2d_forward_kernel<T, int64_t>;
    PK_LAUNCH(kernel, grid_for(total), kThreads, 0, stream, pool_args<int64_t>(s), x, y, indices);
  }
  check_launch("max_pool2d forward kernel launch");
}

template <typename T>
BadIndex max_pool2d_backward(const Pool2dShape& s, const T* grad_y, const int64_t* indices, T* grad_x,
                             cudaStream_t stream) {
  const int64_t total = s.x_numel();
  if (total == 0) return {};
  // One 8-byte flag: the smallest bad position, all ones when none.
  Workspace ws(sizeof(unsigned long long), stream, "max_pool2d backward workspace");
  unsigned long long* flag = ws.as<unsigned long long>();
  check_cuda(cudaMemsetAsync(flag, 0xFF, sizeof(*flag), stream), "max_pool2d backward");
  if (pool_fits_int32(s)) {
    auto* kernel = max_pool2d_backward_kernel<T, int32_t>;
    PK_LAUNCH(kernel, grid_for(total), kThreads, 0, stream, pool_args<int32_t>(s), grad_y, indices, grad_x, flag);
  } else {
    auto* kernel = max_pool2d_backward_kernel<T, int64_t>;
    PK_LAUNCH(kernel, grid_for(total), kThreads, 0, stream, pool_args<int64_t>(s), grad_y, indices, grad_x, flag);
  }
  check_launch("max_pool2d backward kernel launch");
  // The one synchronisation of the backend: the check's result decides between a result and an error.
  unsigned long long bad = ~0ull;
  check_cuda(cudaMemcpyAsync(&bad, flag, sizeof(bad), cudaMemcpyDeviceToHost, stream), "max_pool2d backward");
  check_cuda(cudaStreamSynchronize(stream), "max_pool2d backward");
  if (bad == ~0ull) return {};
  int64_t value = 0;  // error path only: the offending value, for the message
  check_cuda(cudaMemcpyAsync(&value, indices + bad, sizeof(value), cudaMemcpyDeviceToHost, stream),
             "max_pool2d backward");
  check_cuda(cudaStreamSynchronize(stream), "max_pool2d backward");
  return {int64_t(bad), value};
}

#define PYKERNELS_INSTANTIATE(T)                                                                        \
  template void max_pool2d_forward<T>(const Pool2dShape&, const T*, T*, int64_t*, cudaStream_t);         \
  template BadIndex max_pool2d_backward<T>(const Pool2dShape&, const T*, const int64_t*, T*, cudaStream_t);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
PYKERNELS_INSTANTIATE(__half)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cuda
