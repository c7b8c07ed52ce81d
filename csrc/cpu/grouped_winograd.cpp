// Grouped layers whose groups are large enough for Winograd (3x3 stride 1, 48 or more channels a group, as
// in wide grouped ResNets and RegNets; or 4x4 to 6x6 kernels on split-kernel Winograd, as AlexNet's second
// layer) as one layer per group, each over the whole batch on the usual one-group paths, where Winograd
// takes them: the grouped path's per-group GEMM does 2.25-4x the multiplications.
//
// A group's channels of every image are copied into a batch of their own (x's group g: N x C/g planes),
// the group's layer runs on it, and its outputs are copied back into the group's channels; groups one
// after another, each pass parallel inside. Backward-weight's group g writes grad_w's group g directly (its
// filters are contiguous). The one-group passes keep their own handling of NaN and inf.
#include <algorithm>
#include <cstring>

#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

// Group g's layer alone: one group of C/g input and K/g output channels over the same batch and window.
Conv2dShape group_shape(const Conv2dShape& s) {
  Conv2dShape t = s;
  t.C = s.C_per_group(), t.K = s.K_per_group(), t.groups = 1;
  t.validate();
  return t;
}

// Channels [c0, c0 + channels) of each of N images of `total` channels (planes of `size` values) into a batch
// of their own, or back (`back`).
template <typename T>
void copy_group(int64_t N, int64_t total, int64_t c0, int64_t channels, int64_t size, const T* from, T* to,
                bool back) {
  for_each_index(N, double(N * channels * size) >= kMinParallelWork, [&](int64_t n) {
    const int64_t grouped = (n * total + c0) * size, own = n * channels * size;
    std::memcpy(to + (back ? grouped : own), from + (back ? own : grouped), sizeof(T) * size_t(channels * size));
  });
}

// At least 48 channels a group in and out, at least 128 x 128 channel pairs a group or 28x28 outputs, and the
// group's layer on Winograd. Against the grouped path (float32, batch 8, AVX-512, loop, forward /
// backward-input / backward-weight, ms): 256 channels in 2 groups on 28x28 8.7 / 9.2 / 8.7 -> 4.0 / 4.2 /
// 3.6; 128 in 2 groups on 56x56 8.5 / 8.6 / 9.9 -> 5.2 / 4.7 / 5.0; 512 in 4 groups on 7x7 1.62 / 2.15 /
// 1.25 -> 1.52 / 1.55 / 0.86; RegNet-style groups of 48: 192 channels on 28x28 2.53 / 2.60 / 2.68 -> 1.68 /
// 1.72 / 1.91, 96 on 56x56 4.8 / 4.9 / 5.4 -> 2.8 / 2.8 / 3.5. Not 256 in 4 groups of 64 on 14x14 (1.33 /
// 1.36 / 1.21 -> 1.42 / 1.45 / 1.17), nor 48 a group on 14x14 (level in a first try).
bool large_groups(const Conv2dShape& s) {
  const int64_t Cg = s.C_per_group(), Kg = s.K_per_group();
  return s.groups > 1 && Cg >= 48 && Kg >= 48 && (Cg * Kg >= 128 * 128 || s.P * s.Q >= 28 * 28);
}

// Split-kernel groups (below): at least 48 channels a group in and out, and the group's layer at under half
// the cost of direct convolution by split_kernel.cpp's cost model (`share`). Per group against the grouped
// path (float32, batch 8, timed between torch's calls, ms): 8 groups of 16, 5x5 on 28x28, forward 1.68 ->
// 2.46 and backward-weight 1.61 -> 3.11; 4 groups of 48 on 14x14 (cost share 0.54) forward 2.23 -> 3.03; 2
// groups of 64, 4x4 on 32x32 (0.75) 2.19 -> 3.49; so none of those.
bool split_kernel_groups(const Conv2dShape& s, double share) {
  return s.C_per_group() >= 48 && s.K_per_group() >= 48 && share < 0.5;
}

}  // namespace

// Layers the small-group passes take (small_group_conv.cpp: up to four vectors of channels a group, 64 floats
// with AVX-512) run there instead, but backward-weight of four vectors. Against this file's passes (loop, ms,
// forward / backward-input / backward-weight): 192 channels in 4 groups of 48 on 28x28 1.74 / 1.66 / 1.94 ->
// 1.19 / 1.20 / 1.28, 96 in 2 groups of 48 on 56x56 2.99 / 2.91 / 3.50 -> 2.63 / 2.66 / 2.76; 256 in 4
// groups of 64 on 28x28 2.19 / 2.26 -> 2.07 / 2.09, but backward-weight 2.60 -> 3.33.
//
// Groups whose layer runs as split-kernel Winograd (4x4 to 6x6 kernels, split_kernel.cpp) go one by one too
// (split_kernel_groups): 9 products per output and channel pair for 5x5's 25. Batch 8, float32, timed
// between torch's calls, forward / backward-input / backward-weight, ms: AlexNet's second layer (96 -> 256
// channels in 2 groups, 5x5 on 27x27) 8.93 / 8.83 / 9.03 -> 5.93 / 8.59 / 7.78 (backward-input through its
// transposed forward, whose 48 output channels a group make weaker GEMMs), 128 channels in 2 groups of 64,
// 5x5 on 28x28, 6.34 / 6.18 / 6.44 -> 4.61 / 4.37 / 4.53.
bool conv2d_forward_per_group_chosen(const Conv2dShape& s, int64_t element_bytes) {
  if (s.groups > 1 && split_kernel_groups(s, split_winograd_share(group_shape(s), element_bytes))) return true;
  return large_groups(s) && !conv2d_small_group_winograd_chosen(s, element_bytes) &&
         conv2d_winograd_chosen(group_shape(s), element_bytes);
}

bool conv2d_backward_input_per_group_chosen(const Conv2dShape& s, int64_t element_bytes) {
  return large_groups(s) && !conv2d_backward_input_small_group_winograd_chosen(s, element_bytes) &&
         conv2d_backward_input_winograd_chosen(group_shape(s), element_bytes);
}

bool conv2d_backward_weight_per_group_chosen(const Conv2dShape& s, int64_t element_bytes) {
  if (s.groups > 1 && split_kernel_groups(s, backward_weight_split_winograd_share(group_shape(s)))) return true;
  const bool small_groups = conv2d_backward_weight_small_groups_chosen(s, element_bytes) && s.C_per_group() < 64;
  return large_groups(s) && !small_groups && conv2d_backward_weight_winograd_chosen(group_shape(s));
}

template <typename T>
void conv2d_forward_per_group(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const Conv2dShape t = group_shape(s);
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q;
  T* x_group = reusable_buffer<T, 0>(t.x_numel());
  T* y_group = reusable_buffer<T, 1>(t.y_numel());
  for (int64_t g = 0; g < s.groups; ++g) {
    copy_group(s.N, s.C, g * t.C, t.C, HW, x, x_group, false);
    conv2d_forward(t, x_group, w + g * t.w_numel(), bias ? bias + g * t.K : nullptr, y_group);
    copy_group(s.N, s.K, g * t.K, t.K, PQ, y_group, y, true);
  }
}

template <typename T>
void conv2d_backward_input_per_group(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  const Conv2dShape t = group_shape(s);
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q;
  T* gy_group = reusable_buffer<T, 1>(t.y_numel());
  T* gx_group = reusable_buffer<T, 0>(t.x_numel());
  for (int64_t g = 0; g < s.groups; ++g) {
    copy_group(s.N, s.K, g * t.K, t.K, PQ, grad_y, gy_group, false);
    conv2d_backward_input(t, gy_group, w + g * t.w_numel(), gx_group);
    copy_group(s.N, s.C, g * t.C, t.C, HW, gx_group, grad_x, true);
  }
}

template <typename T>
void conv2d_backward_weight_per_group(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  const Conv2dShape t = group_shape(s);
  const int64_t HW = s.H * s.W, PQ = s.P * s.Q;
  T* x_group = reusable_buffer<T, 0>(t.x_numel());
  T* gy_group = reusable_buffer<T, 1>(t.y_numel());
  for (int64_t g = 0; g < s.groups; ++g) {
    copy_group(s.N, s.C, g * t.C, t.C, HW, x, x_group, false);
    copy_group(s.N, s.K, g * t.K, t.K, PQ, grad_y, gy_group, false);
    conv2d_backward_weight(t, gy_group, x_group, grad_w + g * t.w_numel());
  }
}

#define PYKERNELS_INSTANTIATE(T)                                                                       \
  template void conv2d_forward_per_group<T>(const Conv2dShape&, const T*, const T*, const T*, T*);   \
  template void conv2d_backward_input_per_group<T>(const Conv2dShape&, const T*, const T*, T*);      \
  template void conv2d_backward_weight_per_group<T>(const Conv2dShape&, const T*, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
