// 2-D max pooling on the CPU: forward (with optional indices) and backward.
//
// Forward: each window scans only its in-bounds cells (padding acts as -inf, so it can never win),
// in row-major order; a later cell wins only if strictly greater (ties go to the first maximum) or
// if it is the first NaN (NaN propagates with the index of the first NaN, NumPy's argmax rule).
// A window of only -inf therefore keeps its first in-bounds cell: never an index of -1.
// Backward gathers: each input cell sums the gradients of the windows whose index names it, in a
// fixed order, so it needs no atomics and is bit-for-bit deterministic. Indices come from the user,
// so they are checked first: each must be a cell of its own window.
#include <algorithm>
#include <atomic>

#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

struct Span {
  int64_t begin, end;  // kernel taps j in [begin, end) land inside [0, limit)
};

// Taps j < kernel with start + j*dilation in [0, limit).
Span taps_inside(int64_t start, int64_t kernel, int64_t dilation, int64_t limit) {
  const int64_t begin = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
  const int64_t end = start > limit - 1 ? 0 : std::min(kernel, (limit - 1 - start) / dilation + 1);
  return {begin, std::max(begin, end)};
}

}  // namespace

template <typename T>
void max_pool2d_forward(const Pool2dShape& s, const T* x, T* y, int64_t* indices) {
  const Window2d& win = s.win;
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q, planes = s.N * s.C;
#pragma omp parallel for schedule(static) if (planes > 1 && planes * (HW + PQ) >= kMinParallelWork)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const T* xp = x + plane * HW;
    T* yp = y + plane * PQ;
    int64_t* ip = indices ? indices + plane * PQ : nullptr;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t h0 = p * win.stride_h - win.pad_top;
      const Span rows = taps_inside(h0, win.kernel_h, win.dilation_h, s.H);
      for (int64_t q = 0; q < s.Q; ++q) {
        const int64_t w0 = q * win.stride_w - win.pad_left;
        const Span cols = taps_inside(w0, win.kernel_w, win.dilation_w, s.W);
        int64_t best_at = (h0 + rows.begin * win.dilation_h) * s.W + w0 + cols.begin * win.dilation_w;
        T best = xp[best_at];
        for (int64_t r = rows.begin; r < rows.end && best == best; ++r) {
          const int64_t row_at = (h0 + r * win.dilation_h) * s.W + w0;
          for (int64_t c = cols.begin; c < cols.end; ++c) {
            const int64_t at = row_at + c * win.dilation_w;
            const T v = xp[at];
            if (v > best || v != v) {
              best = v;
              best_at = at;
              if (v != v) break;  // first NaN wins; the outer loop stops too (best != best)
            }
          }
        }
        yp[p * s.Q + q] = best;
        if (ip) ip[p * s.Q + q] = best_at;
      }
    }
  }
}

template <typename T>
int64_t max_pool2d_backward(const Pool2dShape& s, const T* grad_y, const int64_t* indices, T* grad_x) {
  const Window2d& win = s.win;
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q, planes = s.N * s.C;

  // 1. Every index must be a cell of its own window; report the first that is not.
  std::atomic<int64_t> first_bad{-1};
#pragma omp parallel for schedule(static) if (planes > 1 && planes * (HW + PQ) >= kMinParallelWork)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t* ip = indices + plane * PQ;
    for (int64_t o = 0; o < PQ; ++o) {
      const int64_t idx = ip[o];
      bool ok = idx >= 0 && idx < HW;
      if (ok) {
        const int64_t dh = idx / s.W - ((o / s.Q) * win.stride_h - win.pad_top);
        const int64_t dw = idx % s.W - ((o % s.Q) * win.stride_w - win.pad_left);
        ok = dh >= 0 && dw >= 0 && dh % win.dilation_h == 0 && dw % win.dilation_w == 0 &&
             dh / win.dilation_h < win.kernel_h && dw / win.dilation_w < win.kernel_w;
      }
      if (!ok) {
        const int64_t at = plane * PQ + o;
        int64_t cur = first_bad.load();
        while ((cur < 0 || at < cur) && !first_bad.compare_exchange_weak(cur, at)) {
        }
        break;
      }
    }
  }
  if (first_bad.load() >= 0) return first_bad.load();

  // 2. Gather: input cell (h, w) collects window (p, q) when h = p*sh - pt + r*dh for some tap r.
#pragma omp parallel for schedule(static) if (planes > 1 && planes * (HW + PQ) >= kMinParallelWork)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const T* gyp = grad_y + plane * PQ;
    const int64_t* ip = indices + plane * PQ;
    T* gxp = grad_x + plane * HW;
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t w = 0; w < s.W; ++w) {
        const int64_t cell = h * s.W + w;
        T sum = T(0);
        for (int64_t r = 0; r < win.kernel_h; ++r) {
          const int64_t ph = h + win.pad_top - r * win.dilation_h;  // = p * stride_h
          if (ph < 0) break;
          if (ph % win.stride_h != 0 || ph / win.stride_h >= s.P) continue;
          const int64_t p = ph / win.stride_h;
          for (int64_t c = 0; c < win.kernel_w; ++c) {
            const int64_t qw = w + win.pad_left - c * win.dilation_w;
            if (qw < 0) break;
            if (qw % win.stride_w != 0 || qw / win.stride_w >= s.Q) continue;
            const int64_t o = p * s.Q + qw / win.stride_w;
            if (ip[o] == cell) sum += gyp[o];
          }
        }
        gxp[cell] = sum;
      }
    }
  }
  return -1;
}

#define PYKERNELS_INSTANTIATE(T)                                                               \
  template void max_pool2d_forward<T>(const Pool2dShape&, const T*, T*, int64_t*);             \
  template int64_t max_pool2d_backward<T>(const Pool2dShape&, const T*, const int64_t*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
