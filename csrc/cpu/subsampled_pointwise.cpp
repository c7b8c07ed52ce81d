// 1x1 kernels with a stride (ResNet's downsampling shortcuts, 256 -> 512 channels at stride 2) or padding:
// output (p, q) reads the one input position (p * stride_h - pad_top, q * stride_w - pad_left), so the layer
// is a pointwise one (stride 1, unpadded) over x subsampled at those positions, zeros where they fall in
// the padding. That copy, N x C x P x Q (a quarter of x at stride 2), is made first by all threads; then
// the pointwise layer runs as conv2d.cpp runs any other, a GEMM per image reading w and the copy in place.
// Forward only: the GEMM's im2col packer took those positions a strip at a time, value by value where an
// output row is shorter than a strip (28 against 48), and resnet's downsampling (256 -> 512 channels, 56x56
// at stride 2, batch 8) went 5.7 -> 4.0 ms (torch 5.2). Backward-weight ran as fast from the copy as from
// x (4.7 ms), and backward-input's col2im costs little here (5x torch's speed).
#include <algorithm>
#include <optional>

#include "cpu/conv_ranges.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

// The pointwise layer over the subsampled x, or nothing where the layer is not a strided or padded 1x1.
std::optional<Conv2dShape> subsampled_shape(const Conv2dShape& s) {
  if (s.R != 1 || s.S != 1 || is_pointwise(s)) return std::nullopt;
  Conv2dShape t = s;
  t.H = s.P, t.W = s.Q, t.win = Window2d{};  // stride 1, no padding (dilation means nothing for one tap)
  t.validate();
  return t;
}

// x at the layer's positions: plane (n, c) of P x Q, in the calling thread's buffer.
template <typename T>
const T* subsample(const Conv2dShape& s, const T* x) {
  const int64_t planes = s.N * s.C, PQ = s.P * s.Q;
  T* out = reusable_buffer<T, 0>(planes * PQ);
  const Window2d& win = s.win;
  // Output rows ps and columns qs land inside the image; the others are padding.
  const Range ps = valid_outputs(-win.pad_top, win.stride_h, s.H, s.P);
  const Range qs = valid_outputs(-win.pad_left, win.stride_w, s.W, s.Q);
  for_each_index(planes, double(planes) * double(PQ) >= double(kMinParallelWork), [&](int64_t plane) {
    const T* from = x + plane * s.H * s.W;
    T* to = out + plane * PQ;
    for (int64_t p = 0; p < s.P; ++p, to += s.Q) {
      if (p < ps.begin || p >= ps.end) {
        std::fill(to, to + s.Q, T(0));
        continue;
      }
      const T* row = from + (p * win.stride_h - win.pad_top) * s.W - win.pad_left;
      std::fill(to, to + qs.begin, T(0));
      for (int64_t q = qs.begin; q < qs.end; ++q) to[q] = row[q * win.stride_w];
      std::fill(to + qs.end, to + s.Q, T(0));
    }
  });
  return out;
}

}  // namespace

bool conv2d_reads_subsampled_x(const Conv2dShape& s) { return subsampled_shape(s) && !sums_directly(s); }

template <typename T>
bool conv2d_forward_subsampled(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  const std::optional<Conv2dShape> t = subsampled_shape(s);
  if (!t) return false;
  conv2d_forward(*t, subsample(s, x), w, bias, y);
  return true;
}

template bool conv2d_forward_subsampled<float>(const Conv2dShape&, const float*, const float*, const float*, float*);
template bool conv2d_forward_subsampled<double>(const Conv2dShape&, const double*, const double*, const double*,
                                                double*);

}  // namespace pykernels::cpu
