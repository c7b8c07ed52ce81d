// Dilated layers as undilated ones over the dilation phases of x (DeepLab's and dilated ResNets' 3x3 layers).
//
// At stride 1, output row h reads x's rows h - pad_top + r * dh. Where dh divides pad_top, pad_bottom and H,
// output row dh * i + a reads only x's rows of phase a (rows dh * i' + a, i' = i + r - pad_top / dh): on
// each of x's dh * dw phases (every dh-th row from row a, every dw-th column from column b) the layer is the
// same convolution undilated, padded by pad / dilation, and its outputs are y's phase (a, b). So x's phases
// go into a batch of dh * dw * N images (phase-major), the undilated layer runs on that batch through the
// usual paths, where a 3x3 layer takes Winograd (4x fewer multiplications than the dilated layer's GEMM),
// and its outputs are interleaved back into y. Backward-input likewise (grad_y split, grad_x interleaved);
// backward-weight is the undilated layer's over the phase batch: the same sums, over images and phases.
// The products are exactly the dilated layer's, padding zeros included (the phases' padding is x's); the
// undilated passes keep their own handling of NaN and inf.
#include <algorithm>
#include <cstring>
#include <optional>

#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

// The undilated layer over the phase batch, or nothing where the layer is not dilated at stride 1 with
// every padding and the input's size multiples of the dilation.
std::optional<Conv2dShape> phase_shape(const Conv2dShape& s) {
  const Window2d& win = s.win;
  const int64_t dh = win.dilation_h, dw = win.dilation_w;
  if (win.stride_h != 1 || win.stride_w != 1 || (dh == 1 && dw == 1)) return std::nullopt;
  if (win.pad_top % dh || win.pad_bottom % dh || s.H % dh || win.pad_left % dw || win.pad_right % dw || s.W % dw)
    return std::nullopt;
  Conv2dShape t = s;
  t.N = s.N * dh * dw, t.H = s.H / dh, t.W = s.W / dw;
  t.win.dilation_h = t.win.dilation_w = 1;
  t.win.pad_top = win.pad_top / dh, t.win.pad_bottom = win.pad_bottom / dh;
  t.win.pad_left = win.pad_left / dw, t.win.pad_right = win.pad_right / dw;
  t.validate();
  if (t.P * dh != s.P || t.Q * dw != s.Q) return std::nullopt;  // cannot happen given the above
  return t;
}

// Each row of planes (N x channels planes of rows x cols) and the rows of the phases it holds: row dh * i + a
// of plane (n, c) holds row i of phase (a, b)'s plane (n, c) at columns dw * j + b, that phase row at
// phases + (((a * dw + b) * N + n) * channels + c) * (rows / dh) * (cols / dw) + i * (cols / dw).
// move(row, phase (a, 0)'s row, the distance between phases (b, b + 1)'s) for each.
template <typename PlaneT, typename PhaseT, typename Move>
void each_phase_row(const Conv2dShape& s, int64_t channels, int64_t rows, int64_t cols, PlaneT* planes,
                    PhaseT* phases, Move&& move) {
  const int64_t dh = s.win.dilation_h, dw = s.win.dilation_w, pr = rows / dh, pc = cols / dw;
  const int64_t count = s.N * channels, phase_size = count * pr * pc;
  for_each_index(count, double(count * rows * cols) >= kMinParallelWork, [&](int64_t plane) {
    for (int64_t a = 0; a < dh; ++a)
      for (int64_t i = 0; i < pr; ++i)
        move(planes + plane * rows * cols + (dh * i + a) * cols, phases + a * dw * phase_size + (plane * pr + i) * pc,
             phase_size);
  });
}

// planes into their phases (see each_phase_row), in loops the compiler vectorises.
template <typename T>
void split_phases(const Conv2dShape& s, int64_t channels, int64_t rows, int64_t cols, const T* planes, T* phases) {
  const int64_t dw = s.win.dilation_w, pc = cols / dw;
  each_phase_row(s, channels, rows, cols, planes, phases, [&](const T* row, T* to, int64_t apart) {
    if (dw == 1) return static_cast<void>(std::memcpy(to, row, sizeof(T) * size_t(pc)));
    if (dw == 2) {
      for (int64_t j = 0; j < pc; ++j) to[j] = row[2 * j], to[apart + j] = row[2 * j + 1];
      return;
    }
    for (int64_t b = 0; b < dw; ++b)
      for (int64_t j = 0; j < pc; ++j) to[b * apart + j] = row[dw * j + b];
  });
}

// The inverse: phases back into planes.
template <typename T>
void join_phases(const Conv2dShape& s, int64_t channels, int64_t rows, int64_t cols, const T* phases, T* planes) {
  const int64_t dw = s.win.dilation_w, pc = cols / dw;
  each_phase_row(s, channels, rows, cols, planes, phases, [&](T* row, const T* from, int64_t apart) {
    if (dw == 1) return static_cast<void>(std::memcpy(row, from, sizeof(T) * size_t(pc)));
    if (dw == 2) {
      for (int64_t j = 0; j < pc; ++j) row[2 * j] = from[j], row[2 * j + 1] = from[apart + j];
      return;
    }
    for (int64_t b = 0; b < dw; ++b)
      for (int64_t j = 0; j < pc; ++j) row[dw * j + b] = from[b * apart + j];
  });
}

}  // namespace

bool conv2d_forward_by_phases_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const std::optional<Conv2dShape> t = phase_shape(s);
  return t && conv2d_winograd_chosen(*t, element_bytes);
}

bool conv2d_backward_input_by_phases_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const std::optional<Conv2dShape> t = phase_shape(s);
  return t && conv2d_backward_input_winograd_chosen(*t, element_bytes);
}

bool conv2d_backward_weight_by_phases_chosen(const Conv2dShape& s) {
  const std::optional<Conv2dShape> t = phase_shape(s);
  return t && conv2d_backward_weight_winograd_chosen(*t);
}

template <typename T>
void conv2d_forward_by_phases(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const Conv2dShape t = *phase_shape(s);
  T* x_phases = reusable_buffer<T, 0>(s.x_numel());
  T* y_phases = reusable_buffer<T, 1>(s.y_numel());
  split_phases(s, s.C, s.H, s.W, x, x_phases);
  conv2d_forward(t, x_phases, w, bias, y_phases);
  join_phases(s, s.K, s.P, s.Q, y_phases, y);
}

template <typename T>
void conv2d_backward_input_by_phases(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const Conv2dShape t = *phase_shape(s);
  T* gy_phases = reusable_buffer<T, 1>(s.y_numel());
  T* gx_phases = reusable_buffer<T, 0>(s.x_numel());
  split_phases(s, s.K, s.P, s.Q, grad_y, gy_phases);
  conv2d_backward_input(t, gy_phases, w, gx_phases);
  join_phases(s, s.C, s.H, s.W, gx_phases, grad_x);
}

template <typename T>
void conv2d_backward_weight_by_phases(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  const Conv2dShape t = *phase_shape(s);
  T* x_phases = reusable_buffer<T, 0>(s.x_numel());
  T* gy_phases = reusable_buffer<T, 1>(s.y_numel());
  split_phases(s, s.C, s.H, s.W, x, x_phases);
  split_phases(s, s.K, s.P, s.Q, grad_y, gy_phases);
  conv2d_backward_weight(t, gy_phases, x_phases, grad_w);
}

#define PYKERNELS_INSTANTIATE(T)                                                                      \
  template void conv2d_forward_by_phases<T>(const Conv2dShape&, const T*, const T*, const T*, T*);  \
  template void conv2d_backward_input_by_phases<T>(const Conv2dShape&, const T*, const T*, T*);     \
  template void conv2d_backward_weight_by_phases<T>(const Conv2dShape&, const T*, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
