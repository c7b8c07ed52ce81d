// 2-D max pooling on the CPU: forward (with optional indices) and backward.
//
// Forward: each window scans only its in-bounds cells (padding acts as -inf, so it can never win),
// in row-major order; a later cell wins only if strictly greater (ties go to the first maximum) or
// if it is the first NaN (NaN propagates with the index of the first NaN, NumPy's argmax rule).
// A window of only -inf therefore keeps its first in-bounds cell: never an index of -1.
// Backward: one thread per plane adds each window's gradient into the cell its index names, in output
// order. That fixed order makes it bit-for-bit deterministic with no atomics (the CUDA kernel, with
// many threads per plane, gathers instead). Indices come from the user, so each is checked to be a
// cell of its own window before it is used.
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

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

// The general window scan: taps in row-major order, only those inside x.
template <typename T>
void pool_window(const Pool2dShape& s, const T* xp, int64_t h0, Span rows, int64_t w0, T* y_out, int64_t* idx_out) {
  const Window2d& win = s.win;
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
  *y_out = best;
  *idx_out = best_at;
}

// One output row's interior windows [q0, q1) (every column tap inside x), all at once: for each tap in
// row-major order, one pass over q. The same update rule as pool_window, written without branches
// (the winner kept as its offset from the window's first cell, an integer of T's width) so the compiler
// vectorises the q loop; STRIDE is the column stride when it is a small constant (1, 2), or 0 for any
// other (read from `stride`). The caller checks that every offset fits that integer.
template <int STRIDE, typename T>
void pool_row_interior(const Pool2dShape& s, const T* xp, int64_t h0, Span rows, int64_t q0, int64_t q1, T* y_row,
                       int64_t* idx_row, std::vector<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>& offsets) {
  using Offset = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const Window2d& win = s.win;
  const int64_t stride = STRIDE ? STRIDE : win.stride_w;
  const int64_t n = q1 - q0;
  T* best = y_row + q0;
  Offset* winner = offsets.data();
  const int64_t base = (h0 + rows.begin * win.dilation_h) * s.W + q0 * stride - win.pad_left;  // first cell
  const T* first = xp + base;
  for (int64_t i = 0; i < n; ++i) {
    best[i] = first[i * stride];
    winner[i] = Offset(0);
  }
  for (int64_t r = rows.begin; r < rows.end; ++r)
    for (int64_t c = 0; c < win.kernel_w; ++c) {
      const Offset offset = Offset((r - rows.begin) * win.dilation_h * s.W + c * win.dilation_w);
      if (offset == 0) continue;
      const T* xr = first + offset;
      for (int64_t i = 0; i < n; ++i) {
        const T v = xr[i * stride], b = best[i];
        const bool take = (v > b) | ((v != v) & (b == b));  // bitwise: no branch, so it vectorises
        best[i] = take ? v : b;
        winner[i] = take ? offset : winner[i];
      }
    }
  if (!idx_row) return;
  for (int64_t i = 0; i < n; ++i) idx_row[q0 + i] = base + i * stride + int64_t(winner[i]);
}

}  // namespace

template <typename T>
void max_pool2d_forward(const Pool2dShape& s, const T* x, T* y, int64_t* indices) {
  const Window2d& win = s.win;
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q, planes = s.N * s.C;
  // Interior columns: q with q*sw - pl >= 0 and q*sw - pl + (kw-1)*dw <= W-1.
  const int64_t q0 = std::min(s.Q, (win.pad_left + win.stride_w - 1) / win.stride_w);
  const int64_t last_tap = (win.kernel_w - 1) * win.dilation_w;
  const int64_t q_end_num = s.W - 1 - last_tap + win.pad_left;
  const int64_t q1 = std::max(q0, std::min(s.Q, q_end_num < 0 ? 0 : q_end_num / win.stride_w + 1));
  // Offsets inside a window must fit the integer of T's width (int32 for float): true unless a window
  // spans more than 2^31 cells of the plane.
  const int64_t last_offset = (win.kernel_h - 1) * win.dilation_h * s.W + (win.kernel_w - 1) * win.dilation_w;
  const bool vector_rows = sizeof(T) == 8 || last_offset < (int64_t(1) << 31);
#pragma omp parallel for schedule(static) if (planes > 1 && planes * (HW + PQ) >= kMinParallelWork)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const T* xp = x + plane * HW;
    T* yp = y + plane * PQ;
    int64_t* ip = indices ? indices + plane * PQ : nullptr;
    int64_t unused_index;
    std::vector<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>> winners(vector_rows ? size_t(q1 - q0) : 0);
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t h0 = p * win.stride_h - win.pad_top;
      const Span rows = taps_inside(h0, win.kernel_h, win.dilation_h, s.H);
      T* y_row = yp + p * s.Q;
      int64_t* idx_row = ip ? ip + p * s.Q : nullptr;
      auto scalar = [&](int64_t q) {
        pool_window(s, xp, h0, rows, q * win.stride_w - win.pad_left, y_row + q, idx_row ? idx_row + q : &unused_index);
      };
      if (!vector_rows) {
        for (int64_t q = 0; q < s.Q; ++q) scalar(q);
        continue;
      }
      for (int64_t q = 0; q < q0; ++q) scalar(q);
      if (win.stride_w == 1)
        pool_row_interior<1>(s, xp, h0, rows, q0, q1, y_row, idx_row, winners);
      else if (win.stride_w == 2)
        pool_row_interior<2>(s, xp, h0, rows, q0, q1, y_row, idx_row, winners);
      else
        pool_row_interior<0>(s, xp, h0, rows, q0, q1, y_row, idx_row, winners);
      for (int64_t q = q1; q < s.Q; ++q) scalar(q);
    }
  }
}

template <typename T>
int64_t max_pool2d_backward(const Pool2dShape& s, const T* grad_y, const int64_t* indices, T* grad_x) {
  const Window2d& win = s.win;
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q, planes = s.N * s.C;
  const double inv_W = 1.0 / double(s.W);
  const bool undilated = win.dilation_h == 1 && win.dilation_w == 1;
  // Output columns whose (undilated) window lies wholly inside the image's columns: [q_lo, q_hi), empty
  // for dilated windows.
  const int64_t q_lo = std::min(s.Q, (win.pad_left + win.stride_w - 1) / win.stride_w);
  const int64_t last_start = s.W + win.pad_left - win.kernel_w;  // q * stride_w <= this (may be negative)
  const int64_t q_hi = !undilated || last_start < 0 ? q_lo
                                                    : std::max(q_lo, std::min(s.Q, last_start / win.stride_w + 1));
  std::atomic<int64_t> first_bad{-1};
  // One thread owns a plane and adds its windows' gradients in output order: a fixed order, so the
  // result is bit-for-bit reproducible without atomics. Each index is checked to be a cell of its own
  // window before it is used (they come from the user).
#pragma omp parallel for schedule(static) if (planes > 1 && planes * (HW + PQ) >= kMinParallelWork)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const T* gyp = grad_y + plane * PQ;
    const int64_t* ip = indices + plane * PQ;
    T* gxp = grad_x + plane * HW;
    std::fill(gxp, gxp + HW, T(0));
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t h0 = p * win.stride_h - win.pad_top;
      // Undilated windows: idx is valid when idx - (h0 + r) * W - w0 lies in the window's columns
      // inside the image for one of its rows r inside the image; a few compares, no division.
      const int64_t r_begin = std::max<int64_t>(0, -h0), r_end = std::min<int64_t>(win.kernel_h, s.H - h0);
      auto valid = [&](int64_t q, int64_t idx) {
        if (undilated) {
          const int64_t w0 = q * win.stride_w - win.pad_left;
          const int64_t c_begin = std::max<int64_t>(0, -w0);
          const int64_t c_width = std::max<int64_t>(0, std::min<int64_t>(win.kernel_w, s.W - w0) - c_begin);
          int64_t rel = idx - (h0 + r_begin) * s.W - w0 - c_begin;
          bool ok = false;
          for (int64_t r = r_begin; r < r_end; ++r, rel -= s.W) ok |= uint64_t(rel) < uint64_t(c_width);
          return ok;
        }
        if (idx < 0 || idx >= HW) return false;
        int64_t h = int64_t(double(idx) * inv_W);  // idx / W without a division; corrected below
        h -= h * s.W > idx;
        h += (h + 1) * s.W <= idx;
        const int64_t dh = h - h0, dw = idx - h * s.W - (q * win.stride_w - win.pad_left);
        return dh >= 0 && dw >= 0 && dh < win.kernel_h * win.dilation_h && dw < win.kernel_w * win.dilation_w &&
               (win.dilation_h == 1 || dh % win.dilation_h == 0) && (win.dilation_w == 1 || dw % win.dilation_w == 0);
      };
      // Columns up to `end` through the full check; stops at the first bad index.
      int64_t q = 0;
      auto add_checked = [&](int64_t end) {
        for (; q < end; ++q) {
          const int64_t o = p * s.Q + q, idx = ip[o];
          if (!valid(q, idx)) return;
          gxp[idx] += gyp[o];
        }
      };
      add_checked(q_lo);
      if (q == q_lo) {  // the interior: the window's columns are known to be inside
        const int64_t rows = r_end - r_begin, base = (h0 + r_begin) * s.W - win.pad_left;
        const uint64_t kw = uint64_t(win.kernel_w);
        for (; q < q_hi; ++q) {
          const int64_t o = p * s.Q + q, idx = ip[o], rel = idx - base - q * win.stride_w;
          bool ok = false;
          for (int64_t r = 0; r < rows; ++r) ok |= uint64_t(rel - r * s.W) < kw;
          if (!ok) break;
          gxp[idx] += gyp[o];
        }
      }
      if (q == q_hi) add_checked(s.Q);
      if (q < s.Q) {  // stop this plane at its first bad index
        const int64_t at = plane * PQ + p * s.Q + q;
        int64_t cur = first_bad.load();
        while ((cur < 0 || at < cur) && !first_bad.compare_exchange_weak(cur, at)) {
        }
        break;
      }
    }
  }
  return first_bad.load();
}

#define PYKERNELS_INSTANTIATE(T)                                                               \
  template void max_pool2d_forward<T>(const Pool2dShape&, const T*, T*, int64_t*);             \
  template int64_t max_pool2d_backward<T>(const Pool2dShape&, const T*, const int64_t*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
