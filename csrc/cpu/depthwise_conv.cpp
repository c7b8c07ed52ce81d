// Depthwise convolution (one input and one output channel per group) with the channels across the vector
// lanes, for small planes: direct_conv_impl.inc runs a plane at a time along its rows, which on a 7x7 or
// 14x14 plane leaves most lanes empty and spends its time copying rows of a few values.
//
// Each task takes one image's block of L channels (a vector's lanes), transposed channels-last into a
// zero-padded copy, so that tap (r, t) of output (p, q) reads the L channels of cell (p * sh + r * dh,
// q * sw + t * dw) as one vector; the outputs are summed a run of up to 8 of a row at a time in registers,
// and transposed back. The products are exactly the reference's, the padding's zeros included.
// Backward-input at stride 1 with finite weights runs as the transposed forward (conv2d.cpp); otherwise as
// the reference's scatter: each grad_y cell times each tap's weights, added into the padded grad_x cell
// that tap reads, in order.
//
// Here: which layers take these passes, and which build runs them (depthwise_impl.inc, once per
// instruction set).
#include <algorithm>

#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_DEPTHWISE(ns)                                               \
  namespace ns {                                                                     \
  template <typename T>                                                              \
  void depthwise_forward(const Conv2dShape&, const T*, const T*, const T*, T*);      \
  template <typename T>                                                              \
  void depthwise_backward_input(const Conv2dShape&, const T*, const T*, T*);         \
  template <typename T>                                                              \
  void depthwise_backward_weight(const Conv2dShape&, const T*, const T*, T*);        \
  template <typename T>                                                              \
  int64_t depthwise_block_channels();                                                \
  }
PYKERNELS_DECLARE_DEPTHWISE(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_DEPTHWISE(avx2)
PYKERNELS_DECLARE_DEPTHWISE(avx512)
#endif
#undef PYKERNELS_DECLARE_DEPTHWISE

namespace {

bool is_depthwise(const Conv2dShape& s) { return s.groups > 1 && s.C_per_group() == 1 && s.K_per_group() == 1; }

template <typename T>
int64_t block_channels() {
  PYKERNELS_RETURN_ON_BUILD(active_build(), depthwise_block_channels<T>())
}
// The active build's vector lanes, the channels of a block.
int64_t vector_lanes(int64_t element_bytes) {
  return element_bytes == int64_t(sizeof(float)) ? block_channels<float>() : block_channels<double>();
}

// Bytes of a task's zero-padded copy of a block of channels.
double padded_copy_bytes(const Conv2dShape& s, int64_t element_bytes) {
  const double cells = double(s.H + s.win.pad_top + s.win.pad_bottom) * double(s.W + s.win.pad_left + s.win.pad_right);
  return cells * double(vector_lanes(element_bytes) * element_bytes);
}

}  // namespace

// Depthwise layers with channels enough to fill two blocks (8 or 4 channels of 56x56 and 28x28 ran 2-3x
// slower than the direct sums, lanes left empty; 24 at batch 1 1.2x slower) and a padded copy within 1 MiB
// (L2). A/B against the direct sums, float32, AVX-512, batch 8, ms:
//   3x3 stride 1: 960 channels on 7x7 forward 0.25 -> 0.09, backward-input 0.28 -> 0.10, backward-weight
//     0.21 -> 0.08; 384 on 14x14 0.19 -> 0.10 all three; 192 on 28x28 0.27 -> 0.19, 0.27 -> 0.18, 0.27 ->
//     0.20; 144 on 56x56 0.96 -> 0.75, 1.03 -> 0.70, 1.21 -> 0.89; 32 on 112x112 0.86 -> 0.78, 0.73 ->
//     0.73, backward-weight 0.75 -> 0.89 (so not there, below);
//   3x3 stride 2: 576 channels from 14x14 0.34 -> 0.08, 0.41 -> 0.09, 0.34 -> 0.08; 144 from 56x56 0.60
//     -> 0.28, 0.56 -> 0.35, 0.63 -> 0.33; 96 from 112x112 2.6 -> 1.4, 2.2 -> 1.4, 2.7 -> 1.5;
//   5x5: 240 channels on 14x14 0.15 -> 0.09, 0.12 -> 0.09, 0.20 -> 0.11; stride 2 from 56x56 0.78 -> 0.33,
//     0.75 -> 0.44, 0.76 -> 0.47.
// 224x224 planes (3.3 MB copies) ran 1.6x slower at stride 1. Under AVX2 (copies half the size) and in
// float64 the same layers gained as much or were level.
bool conv2d_depthwise_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t lanes = vector_lanes(element_bytes);
  return is_depthwise(s) && s.C >= std::max<int64_t>(32, 2 * lanes) &&
         padded_copy_bytes(s, element_bytes) <= double(1 << 20);
}

// Backward-weight at stride 1 only up to 512 KiB copies: 32 channels on 112x112 (832 KB) ran 0.75 -> 0.89
// ms under AVX-512 (level in float64; under AVX2, 416 KB, 1.08 -> 0.76).
bool conv2d_depthwise_weight_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes) {
  const bool strided = s.win.stride_h > 1 || s.win.stride_w > 1;
  return conv2d_depthwise_channels_last_chosen(s, element_bytes) &&
         (strided || padded_copy_bytes(s, element_bytes) <= double(512 << 10));
}

template <typename T>
void conv2d_depthwise_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), depthwise_forward<T>(s, x, w, bias, y))
}

template <typename T>
void conv2d_depthwise_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), depthwise_backward_input<T>(s, grad_y, w, grad_x))
}

template <typename T>
void conv2d_depthwise_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), depthwise_backward_weight<T>(s, grad_y, x, grad_w))
}

#define PYKERNELS_INSTANTIATE(T)                                                                     \
  template void conv2d_depthwise_forward<T>(const Conv2dShape&, const T*, const T*, const T*, T*); \
  template void conv2d_depthwise_backward_input<T>(const Conv2dShape&, const T*, const T*, T*);   \
  template void conv2d_depthwise_backward_weight<T>(const Conv2dShape&, const T*, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
