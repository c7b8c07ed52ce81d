// 2-D cross-correlation on the CPU: forward, backward-input, backward-weight and backward-bias.
//
// Every pass is im2col + our GEMM (gemm.hpp), one image and group at a time:
//   forward        y_g  (K/g x PQ)  = w_g (K/g x CRS)      * col (CRS x PQ)
//   backward-input col  (CRS x PQ)  = w_g^T (CRS x K/g)    * gy_g (K/g x PQ), then col2im adds into gx
//   backward-weight gw_g (K/g x CRS) = sum_n gy_g (K/g x PQ) * col^T (PQ x CRS), n in order 0..N-1
// where CRS = C/groups * R * S. A 1x1 kernel with stride 1 and no padding needs no im2col: col is x.
// Forward and backward-input run one image per thread (each writes its own output); backward-weight
// splits the rows of col among threads, so every gradient element is summed over n in the same order
// whatever the thread count: results are bit-for-bit reproducible.
#include <algorithm>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

bool is_pointwise(const Conv2dShape& s) {
  const Window2d& w = s.win;
  return s.R == 1 && s.S == 1 && w.stride_h == 1 && w.stride_w == 1 && w.pad_top == 0 && w.pad_bottom == 0 &&
         w.pad_left == 0 && w.pad_right == 0;
}

// Output positions o in [0, count) whose input coordinate o*stride + offset lies in [0, limit).
struct Range {
  int64_t begin, end;
};
Range valid_outputs(int64_t offset, int64_t stride, int64_t limit, int64_t count) {
  // o*stride + offset >= 0  <=>  o >= ceil(-offset / stride)
  int64_t begin = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  // o*stride + offset <= limit - 1  <=>  o <= floor((limit - 1 - offset) / stride)
  int64_t end = limit - 1 - offset < 0 ? 0 : (limit - 1 - offset) / stride + 1;
  begin = std::min(begin, count);
  end = std::clamp(end, begin, count);
  return {begin, end};
}

// Visits every (row of col, output row p) pair of one image and group, with the input row it reads
// and the range of q whose input column is inside x; `visit` gets (row, p, h, q_range, w_offset).
template <typename Visit>
void for_each_col_segment(const Conv2dShape& s, int64_t row0, int64_t row1, Visit&& visit) {
  const Window2d& win = s.win;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t c = row / (s.R * s.S), r = (row / s.S) % s.R, kw = row % s.S;
    const int64_t h_offset = r * win.dilation_h - win.pad_top;
    const int64_t w_offset = kw * win.dilation_w - win.pad_left;
    const Range ps = valid_outputs(h_offset, win.stride_h, s.H, s.P);
    const Range qs = valid_outputs(w_offset, win.stride_w, s.W, s.Q);
    visit(row, c, ps, qs, h_offset, w_offset);
  }
}

// col[(row - row0) * PQ + p * Q + q] = x_g[c, p*sh + r*dh - pt, q*sw + kw*dw - pl], zero outside x.
template <typename T>
void im2col(const Conv2dShape& s, const T* x_g, int64_t row0, int64_t row1, T* col) {
  const int64_t PQ = s.P * s.Q, HW = s.H * s.W, sh = s.win.stride_h, sw = s.win.stride_w;
  for_each_col_segment(s, row0, row1, [&](int64_t row, int64_t c, Range ps, Range qs, int64_t h_off, int64_t w_off) {
    T* out = col + (row - row0) * PQ;
    std::fill(out, out + ps.begin * s.Q, T(0));
    for (int64_t p = ps.begin; p < ps.end; ++p) {
      T* o = out + p * s.Q;
      const T* xr = x_g + c * HW + (p * sh + h_off) * s.W + w_off;
      std::fill(o, o + qs.begin, T(0));
      if (sw == 1)
        std::copy(xr + qs.begin, xr + qs.end, o + qs.begin);
      else
        for (int64_t q = qs.begin; q < qs.end; ++q) o[q] = xr[q * sw];
      std::fill(o + qs.end, o + s.Q, T(0));
    }
    std::fill(out + ps.end * s.Q, out + PQ, T(0));
  });
}

// The adjoint of im2col: gx_g[c, h, w] += col[...] for every col entry that came from x.
template <typename T>
void col2im_add(const Conv2dShape& s, const T* col, T* gx_g) {
  const int64_t PQ = s.P * s.Q, HW = s.H * s.W, sh = s.win.stride_h, sw = s.win.stride_w;
  for_each_col_segment(s, 0, s.C_per_group() * s.R * s.S,
                       [&](int64_t row, int64_t c, Range ps, Range qs, int64_t h_off, int64_t w_off) {
                         const T* in = col + row * PQ;
                         for (int64_t p = ps.begin; p < ps.end; ++p) {
                           const T* i = in + p * s.Q;
                           T* xr = gx_g + c * HW + (p * sh + h_off) * s.W + w_off;
                           for (int64_t q = qs.begin; q < qs.end; ++q) xr[q * sw] += i[q];
                         }
                       });
}

}  // namespace

template <typename T>
void conv2d_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group();
  const int64_t CRS = Cg * s.R * s.S, PQ = s.P * s.Q, HW = s.H * s.W, items = s.N * G;
  const bool pointwise = is_pointwise(s);
  const int threads = available_threads();
  const bool per_item_threads = items >= threads;  // else the GEMM itself goes parallel
  const bool worth_threads = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;  // double: no overflow
  Workspace<T> col(per_item_threads ? threads : 1, pointwise ? 0 : CRS * PQ);
  ParallelErrors errors;
#pragma omp parallel for schedule(static) if (per_item_threads && items > 1 && worth_threads)
  for (int64_t item = 0; item < items; ++item) {
    errors.run([&] {
      const int64_t n = item / G, g = item % G;
      const T* x_g = x + (n * s.C + g * Cg) * HW;
      T* y_g = y + (n * s.K + g * Kg) * PQ;
      T* my_col = col.for_this_thread();
      if (!pointwise) im2col(s, x_g, 0, CRS, my_col);
      const T* B = pointwise ? x_g : my_col;
      const T* A = w + g * Kg * CRS;
      if (per_item_threads)
        gemm<T>(Kg, PQ, CRS, A, {CRS, 1}, B, {PQ, 1}, y_g, PQ, false);
      else
        gemm_parallel<T>(Kg, PQ, CRS, A, {CRS, 1}, B, {PQ, 1}, y_g, PQ, false);
      if (bias)
        for (int64_t k = 0; k < Kg; ++k) {
          const T b = bias[g * Kg + k];
          for (T *v = y_g + k * PQ, *e = v + PQ; v < e; ++v) *v += b;
        }
    });
  }
  errors.rethrow();
}

template <typename T>
void conv2d_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group();
  const int64_t CRS = Cg * s.R * s.S, PQ = s.P * s.Q, HW = s.H * s.W, items = s.N * G;
  const bool pointwise = is_pointwise(s);
  const int threads = available_threads();
  const bool per_item_threads = items >= threads;
  const bool worth_threads = double(items) * double(Kg * CRS) * double(PQ) >= kMinParallelWork;  // double: no overflow
  Workspace<T> col(per_item_threads ? threads : 1, pointwise ? 0 : CRS * PQ);
  ParallelErrors errors;
#pragma omp parallel for schedule(static) if (per_item_threads && items > 1 && worth_threads)
  for (int64_t item = 0; item < items; ++item) {
    errors.run([&] {
      const int64_t n = item / G, g = item % G;
      const T* gy_g = grad_y + (n * s.K + g * Kg) * PQ;
      T* gx_g = grad_x + (n * s.C + g * Cg) * HW;
      T* out = pointwise ? gx_g : col.for_this_thread();  // pointwise: col has x's layout, write in place
      const T* A = w + g * Kg * CRS;                      // read transposed: (crs, k) at k*CRS + crs
      if (per_item_threads)
        gemm<T>(CRS, PQ, Kg, A, {1, CRS}, gy_g, {PQ, 1}, out, PQ, false);
      else
        gemm_parallel<T>(CRS, PQ, Kg, A, {1, CRS}, gy_g, {PQ, 1}, out, PQ, false);
      if (!pointwise) {
        std::fill(gx_g, gx_g + Cg * HW, T(0));
        col2im_add(s, out, gx_g);
      }
    });
  }
  errors.rethrow();
}

template <typename T>
void conv2d_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  const int64_t G = s.groups, Cg = s.C_per_group(), Kg = s.K_per_group();
  const int64_t CRS = Cg * s.R * s.S, PQ = s.P * s.Q, HW = s.H * s.W;
  if (s.N == 0) {
    std::fill(grad_w, grad_w + s.w_numel(), T(0));
    return;
  }
  // Work unit = (group, block of col rows): each owns a disjoint block of columns of grad_w.
  const int threads = available_threads();
  const int64_t blocks_per_group = std::max<int64_t>(1, std::min<int64_t>(CRS, (2 * threads + G - 1) / G));
  const int64_t rows_per_block = (CRS + blocks_per_group - 1) / blocks_per_group;
  const int64_t units = G * blocks_per_group;
  Workspace<T> col(threads, rows_per_block * PQ);
  ParallelErrors errors;
#pragma omp parallel for schedule(static) if (units > 1 && double(s.N * G) * double(Kg * CRS) * double(PQ) >= kMinParallelWork)
  for (int64_t unit = 0; unit < units; ++unit) {
    errors.run([&] {
      const int64_t g = unit / blocks_per_group, row0 = (unit % blocks_per_group) * rows_per_block;
      const int64_t row1 = std::min(CRS, row0 + rows_per_block);
      if (row1 <= row0) return;
      T* gw = grad_w + g * Kg * CRS + row0;
      T* my_col = col.for_this_thread();
      for (int64_t n = 0; n < s.N; ++n) {
        const T* x_g = x + (n * s.C + g * Cg) * HW;
        const T* gy_g = grad_y + (n * s.K + g * Kg) * PQ;
        im2col(s, x_g, row0, row1, my_col);
        // gw[:, row0:row1] (+)= gy_g (Kg x PQ) * col_block^T (PQ x rows)
        gemm<T>(Kg, row1 - row0, PQ, gy_g, {PQ, 1}, my_col, {1, PQ}, gw, CRS, n > 0);
      }
    });
  }
  errors.rethrow();
}

template <typename T>
void conv2d_backward_bias(const Conv2dShape& s, const T* grad_y, T* grad_b) {
  const int64_t PQ = s.P * s.Q;
#pragma omp parallel for schedule(static) if (s.K > 1 && s.y_numel() >= kMinParallelWork)
  for (int64_t k = 0; k < s.K; ++k) {
    double sum = 0;  // wide accumulator: N*P*Q terms, fixed order
    for (int64_t n = 0; n < s.N; ++n) {
      const T* v = grad_y + (n * s.K + k) * PQ;
      for (int64_t i = 0; i < PQ; ++i) sum += double(v[i]);
    }
    grad_b[k] = T(sum);
  }
}

#define PYKERNELS_INSTANTIATE(T)                                                             \
  template void conv2d_forward<T>(const Conv2dShape&, const T*, const T*, const T*, T*);     \
  template void conv2d_backward_input<T>(const Conv2dShape&, const T*, const T*, T*);        \
  template void conv2d_backward_weight<T>(const Conv2dShape&, const T*, const T*, T*);       \
  template void conv2d_backward_bias<T>(const Conv2dShape&, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
