// Shape and parameter structs shared by the CPU and CUDA kernels, with the output-size maths and the
// invariant checks they rely on. Header-only, no pybind11 or CUDA includes: the bindings fill a struct,
// call validate(), and the kernels only compute (the same split as ATen's Pool.h).
//
// Every size is int64_t: N*C*H*W of a real tensor can pass 2^31 elements, so no index is computed in int.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pykernels {

// Bad shapes or parameters: surfaces in Python as ValueError.
struct ShapeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Largest element count we accept for one tensor: leaves headroom for byte offsets (x8) in int64.
constexpr int64_t kMaxElements = int64_t(1) << 56;

inline std::string join_sizes(int64_t a, int64_t b, int64_t c, int64_t d) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ", " + std::to_string(c) + ", " +
         std::to_string(d) + ")";
}

// a*b*c*d, or ShapeError naming `what` when it passes kMaxElements (all factors must be >= 0).
inline int64_t checked_numel(const char* what, int64_t a, int64_t b, int64_t c, int64_t d) {
  int64_t r = 1;
  for (int64_t f : {a, b, c, d}) {
    if (f < 0) throw ShapeError(std::string(what) + " has a negative size " + join_sizes(a, b, c, d));
    if (f != 0 && r > kMaxElements / f)
      throw ShapeError(std::string(what) + " shape " + join_sizes(a, b, c, d) +
                       " has too many elements (more than 2^56)");
    r *= f;
  }
  return r;
}

// Flat offset of (n, c, h, w) in a contiguous NCHW tensor, in 64 bits.
inline int64_t nchw_offset(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  return ((n * C + c) * H + h) * W + w;
}

// Output length of a sliding window along one axis (floor mode); <= 0 when the window does not fit.
inline int64_t window_output_size(int64_t in, int64_t pad_begin, int64_t pad_end, int64_t kernel,
                                  int64_t stride, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;  // extent of a dilated window
  const int64_t padded = in + pad_begin + pad_end;
  if (padded < span) return 0;
  return (padded - span) / stride + 1;
}

// Pooling output length with PyTorch's ceil_mode rule: round up, then drop a last window that would
// start inside the end padding.
inline int64_t pool_output_size(int64_t in, int64_t pad_begin, int64_t pad_end, int64_t kernel,
                                int64_t stride, int64_t dilation, bool ceil_mode) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t padded = in + pad_begin + pad_end;
  // ceil_mode's windows may run up to stride - 1 cells past the end, the first one too (PyTorch's rule)
  const int64_t reach = padded - span + (ceil_mode ? stride - 1 : 0);
  if (reach < 0) return 0;
  int64_t out = reach / stride + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad_begin) --out;
  return out;
}

// Does window `o` (cells o*stride - pad_begin + j*dilation, j < kernel) touch [0, in)? O(1): the first
// cell at or after 0 is the only candidate worth testing.
inline bool window_overlaps_input(int64_t o, int64_t in, int64_t pad_begin, int64_t kernel,
                                  int64_t stride, int64_t dilation) {
  const int64_t start = o * stride - pad_begin;
  const int64_t j = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
  return j < kernel && start + j * dilation < in;
}

struct Window2d {
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;

  // From the (h, w) pairs and the (top, bottom, left, right) padding the bindings receive.
  static Window2d from(std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride, std::array<int64_t, 4> pad,
                       std::array<int64_t, 2> dilation) {
    Window2d w;
    w.kernel_h = kernel[0], w.kernel_w = kernel[1];
    w.stride_h = stride[0], w.stride_w = stride[1];
    w.pad_top = pad[0], w.pad_bottom = pad[1], w.pad_left = pad[2], w.pad_right = pad[3];
    w.dilation_h = dilation[0], w.dilation_w = dilation[1];
    return w;
  }

  void validate(const char* kernel_name) const {
    // Bounded so that every product below stays far from int64 overflow.
    constexpr int64_t kMaxParam = int64_t(1) << 31;
    auto in_range = [](int64_t v, int64_t lo) { return v >= lo && v < kMaxParam; };
    if (!in_range(kernel_h, 1) || !in_range(kernel_w, 1))
      throw ShapeError(std::string(kernel_name) + " must be positive, got (" + std::to_string(kernel_h) +
                       ", " + std::to_string(kernel_w) + ")");
    if (!in_range(stride_h, 1) || !in_range(stride_w, 1))
      throw ShapeError("stride must be positive, got (" + std::to_string(stride_h) + ", " +
                       std::to_string(stride_w) + ")");
    if (!in_range(dilation_h, 1) || !in_range(dilation_w, 1))
      throw ShapeError("dilation must be positive, got (" + std::to_string(dilation_h) + ", " +
                       std::to_string(dilation_w) + ")");
    if (!in_range(pad_top, 0) || !in_range(pad_bottom, 0) || !in_range(pad_left, 0) || !in_range(pad_right, 0))
      throw ShapeError("padding must be non-negative, got ((" + std::to_string(pad_top) + ", " +
                       std::to_string(pad_bottom) + "), (" + std::to_string(pad_left) + ", " +
                       std::to_string(pad_right) + "))");
  }
};

// Convolution: x (N, C, H, W), weight (K, C/groups, R, S), y (N, K, P, Q). Cross-correlation.
struct Conv2dShape {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input
  int64_t K = 0, R = 0, S = 0;         // output channels, kernel height, kernel width
  int64_t groups = 1;
  Window2d win;      // kernel sizes mirror R, S
  int64_t P = 0, Q = 0;  // output height, width (set by validate)

  int64_t C_per_group() const { return C / groups; }
  int64_t K_per_group() const { return K / groups; }
  int64_t x_numel() const { return N * C * H * W; }
  int64_t y_numel() const { return N * K * P * Q; }
  int64_t w_numel() const { return K * C_per_group() * R * S; }

  // Checks every invariant the kernels rely on and computes P, Q. Throws ShapeError.
  void validate() {
    win.kernel_h = R;
    win.kernel_w = S;
    win.validate("kernel size");
    if (groups < 1) throw ShapeError("groups must be positive, got " + std::to_string(groups));
    if (C < 1 || H < 1 || W < 1)
      throw ShapeError("x must have at least one channel, row and column, got shape " + join_sizes(N, C, H, W));
    if (K < 1) throw ShapeError("weight must have at least one output channel, got K = " + std::to_string(K));
    if (C % groups != 0 || K % groups != 0)
      throw ShapeError("groups = " + std::to_string(groups) + " must divide x's channels (" + std::to_string(C) +
                       ") and weight's output channels (" + std::to_string(K) + ")");
    checked_numel("x", N, C, H, W);
    checked_numel("weight", K, C / groups, R, S);
    P = window_output_size(H, win.pad_top, win.pad_bottom, R, win.stride_h, win.dilation_h);
    Q = window_output_size(W, win.pad_left, win.pad_right, S, win.stride_w, win.dilation_w);
    if (P < 1 || Q < 1)
      throw ShapeError("weight: kernel " + std::to_string(R) + "x" + std::to_string(S) + " with dilation (" +
                       std::to_string(win.dilation_h) + ", " + std::to_string(win.dilation_w) +
                       ") is larger than the padded input " + std::to_string(H + win.pad_top + win.pad_bottom) +
                       "x" + std::to_string(W + win.pad_left + win.pad_right) + " of x " + join_sizes(N, C, H, W));
    checked_numel("output", N, K, P, Q);
    // im2col workspace of one image and group: (C/groups * R * S) x (P * Q).
    checked_numel("im2col workspace", C / groups, R * S, P, Q);
  }
};

// Max pooling: x (N, C, H, W) -> y (N, C, P, Q); padded cells act as -inf.
struct Pool2dShape {
  int64_t N = 0, C = 0, H = 0, W = 0;
  Window2d win;
  bool ceil_mode = false;
  int64_t P = 0, Q = 0;

  int64_t x_numel() const { return N * C * H * W; }
  int64_t y_numel() const { return N * C * P * Q; }

  void validate() {
    win.validate("kernel_size");
    if (C < 1 || H < 1 || W < 1)
      throw ShapeError("x must have at least one channel, row and column, got shape " + join_sizes(N, C, H, W));
    checked_numel("x", N, C, H, W);
    P = pool_output_size(H, win.pad_top, win.pad_bottom, win.kernel_h, win.stride_h, win.dilation_h, ceil_mode);
    Q = pool_output_size(W, win.pad_left, win.pad_right, win.kernel_w, win.stride_w, win.dilation_w, ceil_mode);
    if (P < 1 || Q < 1)
      throw ShapeError("kernel_size " + std::to_string(win.kernel_h) + "x" + std::to_string(win.kernel_w) +
                       " is larger than the padded input " + std::to_string(H + win.pad_top + win.pad_bottom) +
                       "x" + std::to_string(W + win.pad_left + win.pad_right) + " of x " + join_sizes(N, C, H, W));
    checked_numel("output", N, C, P, Q);
    // Every window must see at least one real cell, so its max and index are defined.
    for (int64_t p = 0; p < P; ++p)
      if (!window_overlaps_input(p, H, win.pad_top, win.kernel_h, win.stride_h, win.dilation_h))
        throw ShapeError("padding: pooling window " + std::to_string(p) + " along H lies wholly in the padding (H = " +
                         std::to_string(H) + ", padding (" + std::to_string(win.pad_top) + ", " +
                         std::to_string(win.pad_bottom) + "))");
    for (int64_t q = 0; q < Q; ++q)
      if (!window_overlaps_input(q, W, win.pad_left, win.kernel_w, win.stride_w, win.dilation_w))
        throw ShapeError("padding: pooling window " + std::to_string(q) + " along W lies wholly in the padding (W = " +
                         std::to_string(W) + ", padding (" + std::to_string(win.pad_left) + ", " +
                         std::to_string(win.pad_right) + "))");
  }
};

}  // namespace pykernels
