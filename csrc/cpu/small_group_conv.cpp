// Grouped layers of one to four vectors of channels a group (ResNeXt's 16 and 32 channels a group with
// AVX-512), a group's channels across the vector lanes, where the direct sums ran them one plane at a time
// and oneDNN, whose blocked layout holds a group in one vector, ran them 1.2-1.8x faster than we did.
//
// 3x3 stride-1 layers run on Winograd F(2x2, 3x3), all three passes. Each task takes one image's group,
// copied channels-last into a zero-padded copy (a cell: the group's channels side by side). Per 2x2 output
// tile, V = B^T d B of its 4x4 patch, a vector of channels at a time; per block of tiles and per point xi of
// the 16, M[t][xi] (a vector of output channels) = the sum over input channels c of V[t][xi][c] times
// U[xi][c], the group's transformed filters (U = G w G^T, made by each thread for the groups it meets), the
// sums of a block of tiles in registers; then y's 2x2 cells = A^T M A + bias, transposed back. 16 products
// per 2x2 tile and channel pair instead of 36: 2.25x fewer than direct sums, and the transforms run over
// whole vectors of channels. Backward-input runs as the transposed forward (conv2d.cpp); backward-weight's
// task is a group over the whole batch: D[xi][k][c] = the sum over images, then tiles, of E[t][xi][k] *
// V[t][xi][c] (E = A g A^T of grad_y's 2x2 cells g), the sums of a block of output channels in registers,
// then grad_w = G^T D G. Each sum runs in the same order whatever the thread count.
//
// The transforms' coefficients are 0, +-1 and 1/2, so the float32 rounding stays close to direct summation's.
// Like the other Winograd paths, a NaN or inf in what a tile reads spreads over that tile: conv2d.cpp then
// recomputes the pass on the other paths (all_finite).
//
// Forward of strided such layers sums directly: blocks of up to 2 rows x 8 columns of outputs, each a vector
// of output channels in registers, over taps and input channels, the group's x channels-last in a zero-padded
// copy. Backward-input of strided such layers is the reference's scatter (the same products, so a NaN or inf
// reaches exactly the outputs it reaches there; so does the forward's): per output position, each tap's
// vector of input channels summed over the output channels in registers (all 9 taps of a 3x3 window at once),
// then added into the zero-padded channels-last grad_x cell the tap reads, positions and taps in order.
//
// Backward-weight of the other such layers (strided, dilated, any kernel: ResNeXt's downsampling 3x3 layers)
// sums directly, a task per group over the whole batch: per tap and block of output channels, the sums
// (each a vector of input channels) in registers across the tap's output positions, image after image;
// the group's x channels-last in a zero-padded copy, its grad_y channels-last. Its products with the
// padding's zeros may turn an inf of grad_y into NaN where the reference has none: conv2d.cpp recomputes a
// grad_w that is not finite.
//
// Here: which layers take these passes, and which build runs them (small_group_conv_impl.inc, once per
// instruction set).
#include <cstring>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_SMALL_GROUP_WINOGRAD(ns)                                                      \
  namespace ns {                                                                                       \
  template <typename T>                                                                                \
  bool small_group_winograd_forward(const Conv2dShape&, const T*, const WinogradFilters<T>&, const T*, T*); \
  template <typename T>                                                                                \
  void small_group_winograd_backward_weight(const Conv2dShape&, const T*, const T*, T*);              \
  template <typename T>                                                                                \
  void small_group_direct_backward_weight(const Conv2dShape&, const T*, const T*, T*);                 \
  template <typename T>                                                                                \
  void small_group_direct_forward(const Conv2dShape&, const T*, const T*, const T*, T*);             \
  template <typename T>                                                                                \
  void small_group_direct_backward_input(const Conv2dShape&, const T*, const T*, T*);                  \
  template <typename T>                                                                                \
  int64_t small_group_vectors(int64_t);                                                                \
  bool small_group_wide_registers();                                                                   \
  }
PYKERNELS_DECLARE_SMALL_GROUP_WINOGRAD(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_SMALL_GROUP_WINOGRAD(avx2)
PYKERNELS_DECLARE_SMALL_GROUP_WINOGRAD(avx512)
#endif
#undef PYKERNELS_DECLARE_SMALL_GROUP_WINOGRAD

namespace {

template <typename T>
int64_t build_vectors(int64_t channels) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_vectors<T>(channels))
}

bool wide_registers() { PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_wide_registers()) }

// The vectors of the active build that hold a group's channels: grouped, as many output as input channels a
// group, one to four vectors of them; 0 for other layers, and where Winograd is turned off
// (set_conv_algorithm("gemm")).
int64_t group_vectors(const Conv2dShape& s, int64_t element_bytes) {
  if (!(s.groups > 1 && s.C_per_group() == s.K_per_group() && std::strcmp(conv_algorithm(), "auto") == 0)) return 0;
  const int64_t G = s.C_per_group();
  return element_bytes == int64_t(sizeof(float)) ? build_vectors<float>(G) : build_vectors<double>(G);
}

bool winograd_window(const Conv2dShape& s) {
  const Window2d& win = s.win;
  return s.R == 3 && s.S == 3 && win.stride_h == 1 && win.stride_w == 1 && win.dilation_h == 1 &&
         win.dilation_w == 1;
}

bool strided(const Conv2dShape& s) { return s.win.stride_h > 1 || s.win.stride_w > 1; }

// Forward and backward-input sum over a group's input channels between the loads and transforms of a cell:
// one vector of float64 (8 channels with AVX-512, 4 with AVX2) is too few (below).
bool fills_lanes(int64_t vectors, int64_t element_bytes) {
  return vectors >= 2 || (vectors == 1 && element_bytes == int64_t(sizeof(float)));
}

}  // namespace

// Against the direct sums (loop, 2 threads, batch 8, forward / backward-input / backward-weight, ms):
// - AVX-512, float32: ResNeXt-50's third stage (512 channels in 32 groups of 16 on 14x14) 0.85 / 1.13 / 1.10
//   -> 0.53 / 0.52 / 0.45, its fourth (1024 in 32 groups of 32 on 7x7) 0.66 / 0.75 / 0.76 -> 0.46 / 0.46 /
//   0.50; 512 in groups of 16 on 28x28 2.82 / 2.88 / 3.44 -> 2.03 / 2.04 / 1.94, 1024 in groups of 32 on
//   14x14 2.33 / 2.72 / 3.00 -> 1.55 / 1.48 / 1.76, 256 in groups of 16 on 56x56 5.1 / 5.1 / 5.8 -> 4.0 /
//   4.1 / 3.9, at batch 1 (512 on 14x14) 0.092 / 0.120 / 0.263 -> 0.075 / 0.075 / 0.074; three and four
//   vectors, against the Winograd F(4x4) and direct paths taken before: 432 in 9 groups of 48 on 14x14 1.55
//   / 1.60 / 1.94 -> 0.66 / 0.67 / 0.81, 256 in 4 groups of 64 1.18 / 1.23 / 1.16 -> 0.51 / 0.52 / 0.86;
// - AVX2, float32: 256 in groups of 8 on 28x28 (ResNeXt-50's second stage) 1.39 / 1.39 / 2.09 -> 0.93 /
//   0.91 / 0.81, groups of 16 on 14x14 1.11 / 1.39 / 2.26 -> 0.68 / 0.67 / 0.66, of 32 (four vectors) on
//   7x7 1.09 / 1.14 -> 0.73 / 0.72, but backward-weight 1.17 -> 1.19 (AVX2's 16 registers hold the sums of
//   2 output channels of 4 vectors: each load serves 2 products), so not there; SSE2 (portable), groups of
//   8 on 28x28 3.31 / 3.30 / 2.80 -> 1.81 / 1.81 / 1.65, of 4 on 56x56 3.01 / 3.21 / 3.79 -> 2.70 / 2.89 /
//   2.48;
// - float64: two vectors a group, AVX-512 (16 on 14x14) 1.25 / 1.32 / 1.63 -> 1.05 / 1.04 / 0.93, AVX2
//   (8 on 28x28) 2.66 / 2.73 / 3.83 -> 2.00 / 2.01 / 1.84; four, AVX-512 (32 on 7x7) 1.61 / 1.62 / 1.46 ->
//   0.95 / 0.88 / 1.23. One vector a group, whose sums run over only 8 (AVX-512) or 4 (AVX2) input
//   channels between the transforms, slower forward: 8 on 28x28 1.49 -> 1.67, 4 on 56x56 3.26 -> 3.67
//   (backward-weight 1.63 -> 1.36 and 4.49 -> 3.00): forward and backward-input stay with the direct sums
//   there.
bool conv2d_small_group_winograd_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return winograd_window(s) && fills_lanes(group_vectors(s, element_bytes), element_bytes);
}

// Backward-weight: on Winograd for 3x3 stride-1 layers, as above; directly for any other window. Against the
// direct sums (loop, ms): ResNeXt-50's stride-2 layers, 512 channels in groups of 16 from 28x28 1.81 -> 0.65,
// 1024 in groups of 32 from 14x14 1.02 -> 0.63, from 7x7 0.391 -> 0.074; groups of 16 on 28x28, 5x5 3.86 ->
// 2.85, 3x3 dilated 2 1.48 -> 1.10; 1x1 in groups of 32 on 14x14 0.223 -> 0.171; groups of 64 from 28x28
// 3.20 -> 2.56; AVX2, groups of 8 from 56x56 at stride 2 3.17 -> 1.80 (of 32, four vectors: 1.25 -> 1.33);
// float64, groups of 16 from 28x28 3.19 -> 1.96, of 8 from 56x56 4.53 -> 2.99. (Direct on 3x3 stride-1
// layers, against Winograd: ResNeXt's stage 3 0.445 -> 0.550.) Three or four vectors only with AVX-512's
// 32 registers (above).
bool conv2d_backward_weight_small_groups_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t vectors = group_vectors(s, element_bytes);
  return vectors > 0 && (vectors <= 2 || wide_registers());
}

// Forward of strided layers summed directly over a group's vectors, by blocks of up to 2 x 8 outputs; backward-
// input as the reference's scatter, all taps of an output's position in registers (at stride 1 it runs as
// the transposed forward). Against the paths taken before (loop, ms; forward / backward-input): ResNeXt-50's
// stride-2 layers, 512 channels in groups of 16 from 28x28 1.07 / 1.30 -> 0.74 / 0.90, 1024 in groups of 32
// from 14x14 0.86 / 1.00 -> 0.64 / 0.85, and at batch 1 from 28x28 0.179 -> 0.120 (forward); groups of 16,
// 5x5 from 28x28 1.31 / 1.24 -> 0.84 / 1.06, 3x3 from 56x56 2.06 / 2.59 -> 1.46 / 2.01; 1x1 in groups of 32
// from 14x14 0.37 / 0.33 -> 0.10 / 0.16; groups of 48 from 28x28 1.81 -> 1.38 and of 64 2.49 -> 2.18
// (forward; backward-input 2.79 -> 3.59 and 3.66 -> 5.95, its taps' sums then too many for the registers:
// not there); AVX2, groups of 8 from 56x56 2.11 -> 1.62 (forward), of 16 from 28x28 1.23 / 1.98 -> 1.18 /
// 1.52; SSE2, groups of 8 1.22 / 1.22 -> 0.75 / 0.82; float64, groups of 16 (two vectors) 2.14 / 2.72 ->
// 1.50 / 2.33, but of 8 (one) backward-input 3.48 -> 3.77. (Forward by blocks of one row had left 14
// outputs to blocks of 4 and 1: slower than before.)
bool conv2d_small_groups_directly_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return strided(s) && fills_lanes(group_vectors(s, element_bytes), element_bytes);
}

bool conv2d_backward_input_small_groups_directly_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t vectors = group_vectors(s, element_bytes);
  return strided(s) && vectors <= 2 && fills_lanes(vectors, element_bytes);
}

template <typename T>
bool conv2d_small_group_winograd(const Conv2dShape& s, const T* x, const WinogradFilters<T>& filters, const T* bias,
                                 T* y) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_winograd_forward<T>(s, x, filters, bias, y))
}

template <typename T>
void conv2d_backward_weight_small_groups(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  if (winograd_window(s)) {
    PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_winograd_backward_weight<T>(s, grad_y, x, grad_w))
  }
  PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_direct_backward_weight<T>(s, grad_y, x, grad_w))
}

template <typename T>
void conv2d_backward_input_small_groups_directly(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_direct_backward_input<T>(s, grad_y, w, grad_x))
}

template <typename T>
void conv2d_forward_small_groups_directly(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), small_group_direct_forward<T>(s, x, w, bias, y))
}

#define PYKERNELS_INSTANTIATE(T)                                                                                 \
  template bool conv2d_small_group_winograd<T>(const Conv2dShape&, const T*, const WinogradFilters<T>&, const T*, \
                                               T*);                                                              \
  template void conv2d_backward_input_small_groups_directly<T>(const Conv2dShape&, const T*, const T*, T*);  \
  template void conv2d_forward_small_groups_directly<T>(const Conv2dShape&, const T*, const T*, const T*, T*);  \
  template void conv2d_backward_weight_small_groups<T>(const Conv2dShape&, const T*, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
