// The CUDA kernels and launchers of csrc/cuda, compiled for the CPU emulator (emu.hpp) and checked
// against plain double-precision loops: every op and gradient, in float, double and half, on random
// shapes like tests/test_ops_vs_reference.py's (odd sizes, strides, dilation, asymmetric padding,
// groups, depthwise, both GEMM tile shapes, split-K), with 32- and 64-bit index arithmetic. Also:
// results identical bit for bit under forward / reverse / shuffled thread orders (a missing barrier
// would show), no stream synchronisation except in max-pool backward, no leaked workspace, bad
// indices reported at the first bad position, launch-configuration errors thrown.
//
//   csrc/cuda/emu/run_tests.sh [random cases per dtype [seed]]   (g++ with ASan and UBSan; about a minute)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/shapes.hpp"
#include "cuda/kernels.hpp"

using pykernels::Conv2dShape;
using pykernels::Pool2dShape;
using pykernels::Window2d;
namespace kc = pykernels::cuda;
namespace emu = pykernels_emu;

static int g_failures = 0, g_checks = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    ++g_checks;                                           \
    if (!(cond)) {                                        \
      ++g_failures;                                       \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

// ---- element types ---------------------------------------------------------------------------------

template <typename T>
double to_d(T v) { return double(v); }
template <>
double to_d<__half>(__half v) { return double(__half2float(v)); }
template <typename T>
T from_d(double v) { return T(v); }
template <>
__half from_d<__half>(double v) { return __float2half_rn(float(v)); }

template <typename T>
const char* tname();
template <>
const char* tname<float>() { return "float"; }
template <>
const char* tname<double>() { return "double"; }
template <>
const char* tname<__half>() { return "half"; }

template <typename T>
double base_tol();
template <>
double base_tol<float>() { return 1e-5; }
template <>
double base_tol<double>() { return 1e-12; }
template <>
double base_tol<__half>() { return 2e-3; }

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::mt19937_64 rng(20260101);
int64_t rand_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

template <typename T>
std::vector<T> random_array(int64_t n) {
  std::normal_distribution<double> nd;
  std::vector<T> v(static_cast<size_t>(n));
  for (auto& e : v) e = from_d<T>(nd(rng));
  return v;
}
template <typename T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  for (size_t i = 0; i < v.size(); ++i) d[i] = to_d(v[i]);
  return d;
}

// max |got - want| <= tol * max(1, sqrt(terms / 1000)) * max |want| (NaNs must coincide).
template <typename T>
bool close(const std::vector<T>& got, const std::vector<double>& want, int64_t terms, std::string* why) {
  if (got.size() != want.size()) {
    *why = "size mismatch";
    return false;
  }
  double scale = 0, err = 0;
  for (double w : want)
    if (!std::isnan(w)) scale = std::max(scale, std::fabs(w));
  if (scale == 0) scale = 1;
  size_t worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = to_d(got[i]);
    if (std::isnan(g) != std::isnan(want[i])) {
      *why = "NaN mismatch at " + std::to_string(i) + " got " + std::to_string(g) + " want " + std::to_string(want[i]);
      return false;
    }
    if (std::isnan(g)) continue;
    const double e = std::fabs(g - want[i]);
    if (e > err) err = e, worst = i;
  }
  const double tol = base_tol<T>() * std::max(1.0, std::sqrt(double(terms) / 1000.0)) * scale;
  if (err > tol) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "max err %.3g > tol %.3g at %zu (got %.9g want %.9g)", err, tol, worst,
                  to_d(got[worst]), want[worst]);
    *why = buf;
    return false;
  }
  return true;
}

// ---- conv references (double, plain loops) ---------------------------------------------------------

struct ConvRef {
  const Conv2dShape& s;
  // Calls f(n, k, p, q, c, r, t, h, w) for every in-bounds tap.
  template <class F>
  void taps(F&& f) const {
    const Window2d& win = s.win;
    const int64_t Cg = s.C_per_group(), Kg = s.K_per_group();
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t k = 0; k < s.K; ++k) {
        const int64_t g = k / Kg;
        for (int64_t p = 0; p < s.P; ++p)
          for (int64_t q = 0; q < s.Q; ++q)
            for (int64_t c = 0; c < Cg; ++c)
              for (int64_t r = 0; r < s.R; ++r) {
                const int64_t h = p * win.stride_h - win.pad_top + r * win.dilation_h;
                if (h < 0 || h >= s.H) continue;
                for (int64_t t = 0; t < s.S; ++t) {
                  const int64_t w = q * win.stride_w - win.pad_left + t * win.dilation_w;
                  if (w < 0 || w >= s.W) continue;
                  f(n, k, p, q, g * Cg + c, c, r, t, h, w);
                }
              }
      }
  }
};

std::vector<double> ref_conv_forward(const Conv2dShape& s, const std::vector<double>& x, const std::vector<double>& w,
                                     const std::vector<double>* bias) {
  std::vector<double> y(size_t(s.y_numel()), 0.0);
  const int64_t Cg = s.C_per_group();
  ConvRef{s}.taps([&](int64_t n, int64_t k, int64_t p, int64_t q, int64_t ci, int64_t c, int64_t r, int64_t t,
                      int64_t h, int64_t ww) {
    y[size_t(((n * s.K + k) * s.P + p) * s.Q + q)] +=
        x[size_t(((n * s.C + ci) * s.H + h) * s.W + ww)] * w[size_t(((k * Cg + c) * s.R + r) * s.S + t)];
  });
  if (bias)
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t k = 0; k < s.K; ++k)
        for (int64_t i = 0; i < s.P * s.Q; ++i) y[size_t((n * s.K + k) * s.P * s.Q + i)] += (*bias)[size_t(k)];
  return y;
}

void ref_conv_backward(const Conv2dShape& s, const std::vector<double>& gy, const std::vector<double>& x,
                       const std::vector<double>& w, std::vector<double>& gx, std::vector<double>& gw,
                       std::vector<double>& gb) {
  gx.assign(size_t(s.x_numel()), 0.0);
  gw.assign(size_t(s.w_numel()), 0.0);
  gb.assign(size_t(s.K), 0.0);
  const int64_t Cg = s.C_per_group();
  ConvRef{s}.taps([&](int64_t n, int64_t k, int64_t p, int64_t q, int64_t ci, int64_t c, int64_t r, int64_t t,
                      int64_t h, int64_t ww) {
    const double g = gy[size_t(((n * s.K + k) * s.P + p) * s.Q + q)];
    gx[size_t(((n * s.C + ci) * s.H + h) * s.W + ww)] += g * w[size_t(((k * Cg + c) * s.R + r) * s.S + t)];
    gw[size_t(((k * Cg + c) * s.R + r) * s.S + t)] += g * x[size_t(((n * s.C + ci) * s.H + h) * s.W + ww)];
  });
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t i = 0; i < s.P * s.Q; ++i) gb[size_t(k)] += gy[size_t((n * s.K + k) * s.P * s.Q + i)];
}

// ---- conv tests ------------------------------------------------------------------------------------

std::string conv_desc(const Conv2dShape& s) {
  const Window2d& w = s.win;
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "x(%ld,%ld,%ld,%ld) w(%ld,%ld,%ld,%ld) g=%ld stride(%ld,%ld) dil(%ld,%ld) pad(%ld,%ld,%ld,%ld)",
                long(s.N), long(s.C), long(s.H), long(s.W), long(s.K), long(s.C_per_group()), long(s.R), long(s.S),
                long(s.groups), long(w.stride_h), long(w.stride_w), long(w.dilation_h), long(w.dilation_w),
                long(w.pad_top), long(w.pad_bottom), long(w.pad_left), long(w.pad_right));
  return buf;
}

Conv2dShape make_conv(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t R, int64_t S, int64_t groups,
                      int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Conv2dShape s;
  s.N = N, s.C = C, s.H = H, s.W = W, s.K = K, s.R = R, s.S = S, s.groups = groups;
  s.win.stride_h = sh, s.win.stride_w = sw, s.win.dilation_h = dh, s.win.dilation_w = dw;
  s.win.pad_top = pt, s.win.pad_bottom = pb, s.win.pad_left = pl, s.win.pad_right = pr;
  s.validate();
  return s;
}

template <typename T>
void check_conv(const Conv2dShape& s, bool with_bias) {
  const std::string what = std::string(tname<T>()) + " " + conv_desc(s) + (kc::force_int64_indexing() ? " int64" : "");
  auto x = random_array<T>(s.x_numel()), w = random_array<T>(s.w_numel()), b = random_array<T>(s.K);
  auto gy = random_array<T>(s.y_numel());
  const auto xd = as_double(x), wd = as_double(w), bd = as_double(b), gyd = as_double(gy);
  const int64_t syncs0 = emu::state().syncs;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(0x1234);  // any handle: the emulator ignores it

  // forward (output prefilled with garbage: every element must be written)
  std::vector<T> y(size_t(s.y_numel()), from_d<T>(12345.0));
  kc::conv2d_forward<T>(s, x.data(), w.data(), with_bias ? b.data() : nullptr, y.data(), stream);
  std::string why;
  const auto want_y = ref_conv_forward(s, xd, wd, with_bias ? &bd : nullptr);
  CHECK(close(y, want_y, s.C_per_group() * s.R * s.S + 1, &why), "conv2d forward %s: %s", what.c_str(), why.c_str());

  std::vector<double> rgx, rgw, rgb;
  ref_conv_backward(s, gyd, xd, wd, rgx, rgw, rgb);
  std::vector<T> gx(size_t(s.x_numel()), from_d<T>(777.0)), gw(size_t(s.w_numel()), from_d<T>(777.0)),
      gb(size_t(s.K), from_d<T>(777.0));
  kc::conv2d_backward_input<T>(s, gy.data(), w.data(), gx.data(), stream);
  kc::conv2d_backward_weight<T>(s, gy.data(), x.data(), gw.data(), stream);
  kc::conv2d_backward_bias<T>(s, gy.data(), gb.data(), stream);
  CHECK(close(gx, rgx, s.K_per_group() * s.R * s.S, &why), "conv2d grad_x %s: %s", what.c_str(), why.c_str());
  CHECK(close(gw, rgw, s.N * s.P * s.Q, &why), "conv2d grad_w %s: %s", what.c_str(), why.c_str());
  CHECK(close(gb, rgb, s.N * s.P * s.Q, &why), "conv2d grad_b %s: %s", what.c_str(), why.c_str());

  // The same bits under another thread order (races) and on a second run (determinism).
  emu::set_schedule(emu::Schedule::shuffled);
  std::vector<T> y2(y.size()), gx2(gx.size()), gw2(gw.size()), gb2(gb.size());
  kc::conv2d_forward<T>(s, x.data(), w.data(), with_bias ? b.data() : nullptr, y2.data(), stream);
  kc::conv2d_backward_input<T>(s, gy.data(), w.data(), gx2.data(), stream);
  kc::conv2d_backward_weight<T>(s, gy.data(), x.data(), gw2.data(), stream);
  kc::conv2d_backward_bias<T>(s, gy.data(), gb2.data(), stream);
  emu::set_schedule(emu::Schedule::forward);
  CHECK(same_bits(y, y2) && same_bits(gx, gx2) && same_bits(gw, gw2) && same_bits(gb, gb2),
        "conv2d results differ under a shuffled thread order: %s", what.c_str());
  CHECK(emu::state().syncs == syncs0, "conv2d synchronised the stream: %s", what.c_str());
  CHECK(emu::state().live_allocs == 0, "conv2d leaked a workspace: %s", what.c_str());
}

Conv2dShape random_conv() {
  for (;;) {
    const int64_t n = rand_int(1, 3);
    int64_t groups, cg, kg;
    switch (rand_int(0, 2)) {
      case 0: groups = 1, cg = rand_int(1, 5), kg = rand_int(1, 6); break;
      case 1: groups = rand_int(2, 3), cg = rand_int(1, 3), kg = rand_int(1, 3); break;
      default: groups = rand_int(1, 6), cg = 1, kg = rand_int(1, 2); break;
    }
    const int64_t r = rand_int(1, 4), t = rand_int(1, 4), sh = rand_int(1, 3), sw = rand_int(1, 3);
    const int64_t dh = rand_int(1, 3), dw = rand_int(1, 3);
    const int64_t pt = rand_int(0, 3), pb = rand_int(0, 3), pl = rand_int(0, 3), pr = rand_int(0, 3);
    const int64_t hmin = std::max<int64_t>(1, dh * (r - 1) + 1 - pt - pb);
    const int64_t wmin = std::max<int64_t>(1, dw * (t - 1) + 1 - pl - pr);
    const int64_t h = rand_int(hmin, hmin + 9), w = rand_int(wmin, wmin + 9);
    try {
      return make_conv(n, cg * groups, h, w, kg * groups, r, t, groups, sh, sw, dh, dw, pt, pb, pl, pr);
    } catch (const pykernels::ShapeError&) {
    }
  }
}

template <typename T>
void conv_suite(int random_cases) {
  // Named shapes: both tile shapes (rows <= 32 and > 32), partial tiles, split-K, strided phases.
  const Conv2dShape named[] = {
      make_conv(2, 3, 11, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),
      make_conv(1, 4, 13, 10, 6, 3, 2, 2, 2, 2, 2, 2, 1, 2, 0, 1),
      make_conv(3, 37, 13, 13, 70, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),    // K, C > 32: 128x128 tiles
      make_conv(2, 37, 15, 17, 70, 3, 3, 1, 2, 2, 1, 1, 1, 0, 0, 2),    // strided: 4 phases
      make_conv(2, 40, 9, 11, 36, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0),     // pointwise
      make_conv(1, 3, 40, 40, 8, 7, 7, 1, 2, 2, 1, 1, 3, 3, 3, 3),      // stem-like, split-K
      make_conv(4, 2, 30, 30, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),      // long reduction: many splits
      make_conv(2, 7, 9, 11, 7, 3, 3, 7, 2, 2, 1, 1, 1, 1, 1, 1),       // depthwise
      make_conv(1, 5, 8, 8, 10, 3, 3, 5, 1, 1, 1, 1, 1, 1, 1, 1),       // depthwise multiplier 2
      make_conv(2, 6, 7, 7, 9, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),        // groups 3
      make_conv(1, 2, 13, 13, 3, 3, 3, 1, 1, 1, 3, 3, 3, 3, 3, 3),      // dilation 3
      make_conv(1, 4, 11, 10, 3, 2, 3, 1, 3, 2, 2, 3, 2, 0, 1, 3),      // asymmetric, strided, dilated
      make_conv(1, 2, 4, 4, 3, 2, 2, 1, 1, 1, 1, 1, 3, 3, 3, 3),        // padding > kernel
      make_conv(1, 2, 9, 9, 3, 1, 1, 1, 4, 4, 1, 1, 0, 0, 0, 0),        // stride > kernel: phases with no tap
      make_conv(2, 3, 5, 5, 4, 5, 5, 1, 1, 1, 1, 1, 0, 0, 0, 0),        // kernel == input
      make_conv(2, 3, 9, 1, 4, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0),        // width 1
      make_conv(1, 3, 5, 67, 17, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),
      make_conv(0, 3, 5, 5, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),        // empty batch
  };
  for (const auto& s : named) {
    check_conv<T>(s, true);
    check_conv<T>(s, false);
  }
  for (int i = 0; i < random_cases; ++i) check_conv<T>(random_conv(), i % 2 == 0);
}

// ---- relu --------------------------------------------------------------------------------------------

template <typename T>
void relu_suite() {
  const int64_t sizes[] = {1, 3, 8, 17, 1000, 4099};
  for (int64_t n : sizes)
    for (int offset = 0; offset < 2; ++offset) {  // offset 1: misaligned, the scalar path
      auto xs = random_array<T>(n + 1);
      for (int64_t i = 0; i < n + 1; i += 5) xs[size_t(i)] = from_d<T>(i % 3 == 0 ? NAN : (i % 3 == 1 ? 0.0 : -0.0));
      const T* x = xs.data() + offset;
      std::vector<T> ys(size_t(n + 1)), gxs(size_t(n + 1));
      auto gys = random_array<T>(n + 1);
      kc::relu_forward<T>(n, x, ys.data() + offset, nullptr);
      kc::relu_backward<T>(n, gys.data() + offset, x, gxs.data() + offset, nullptr);
      bool ok = true;
      for (int64_t i = 0; i < n; ++i) {
        const double v = to_d(x[i]), got = to_d(ys[size_t(i + offset)]);
        const double want = (v > 0 || std::isnan(v)) ? v : 0.0;
        if (!(got == want || (std::isnan(got) && std::isnan(want))) || std::signbit(got) != std::signbit(want))
          ok = false;
        const double g = to_d(gxs[size_t(i + offset)]), wg = v > 0 ? to_d(gys[size_t(i + offset)]) : 0.0;
        if (g != wg) ok = false;
      }
      CHECK(ok, "relu %s n=%ld offset=%d", tname<T>(), long(n), offset);
      // in place
      std::vector<T> inplace(xs.begin() + offset, xs.begin() + offset + n);
      kc::relu_forward<T>(n, inplace.data(), inplace.data(), nullptr);
      CHECK(std::memcmp(inplace.data(), ys.data() + offset, size_t(n) * sizeof(T)) == 0, "relu in place %s n=%ld",
            tname<T>(), long(n));
    }
}

// ---- max pool ----------------------------------------------------------------------------------------

Pool2dShape make_pool(int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                      int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, bool ceil_mode) {
  Pool2dShape s;
  s.N = N, s.C = C, s.H = H, s.W = W, s.ceil_mode = ceil_mode;
  s.win.kernel_h = kh, s.win.kernel_w = kw, s.win.stride_h = sh, s.win.stride_w = sw;
  s.win.dilation_h = dh, s.win.dilation_w = dw;
  s.win.pad_top = pt, s.win.pad_bottom = pb, s.win.pad_left = pl, s.win.pad_right = pr;
  s.validate();
  return s;
}

std::string pool_desc(const Pool2dShape& s) {
  const Window2d& w = s.win;
  char buf[300];
  std::snprintf(buf, sizeof buf, "x(%ld,%ld,%ld,%ld) k(%ld,%ld) s(%ld,%ld) d(%ld,%ld) pad(%ld,%ld,%ld,%ld) ceil=%d",
                long(s.N), long(s.C), long(s.H), long(s.W), long(w.kernel_h), long(w.kernel_w), long(w.stride_h),
                long(w.stride_w), long(w.dilation_h), long(w.dilation_w), long(w.pad_top), long(w.pad_bottom),
                long(w.pad_left), long(w.pad_right), int(s.ceil_mode));
  return buf;
}

// The CPU rules: in-bounds cells in row-major order; strictly greater or the first NaN wins.
void ref_pool(const Pool2dShape& s, const std::vector<double>& x, std::vector<double>& y, std::vector<int64_t>& idx) {
  const Window2d& w = s.win;
  y.assign(size_t(s.y_numel()), 0.0);
  idx.assign(size_t(s.y_numel()), -1);
  for (int64_t plane = 0; plane < s.N * s.C; ++plane)
    for (int64_t p = 0; p < s.P; ++p)
      for (int64_t q = 0; q < s.Q; ++q) {
        double best = 0;
        int64_t at = -1;
        for (int64_t r = 0; r < w.kernel_h; ++r)
          for (int64_t c = 0; c < w.kernel_w; ++c) {
            const int64_t h = p * w.stride_h - w.pad_top + r * w.dilation_h;
            const int64_t ww = q * w.stride_w - w.pad_left + c * w.dilation_w;
            if (h < 0 || h >= s.H || ww < 0 || ww >= s.W) continue;
            const double v = x[size_t(plane * s.H * s.W + h * s.W + ww)];
            if (at < 0 || (!std::isnan(best) && (v > best || std::isnan(v)))) best = v, at = h * s.W + ww;
          }
        y[size_t((plane * s.P + p) * s.Q + q)] = best;
        idx[size_t((plane * s.P + p) * s.Q + q)] = at;
      }
}

template <typename T>
void check_pool(const Pool2dShape& s, int kind) {
  const std::string what = std::string(tname<T>()) + " " + pool_desc(s) + " kind " + std::to_string(kind) +
                           (kc::force_int64_indexing() ? " int64" : "");
  std::vector<T> x(size_t(s.x_numel()));
  for (auto& v : x) {
    double d = kind == 0 ? std::normal_distribution<double>()(rng) : double(rand_int(-2, 2));
    if (kind == 2 && rand_int(0, 5) == 0) {
      const int64_t pick = rand_int(0, 3);
      d = pick == 0 ? NAN : (pick == 1 ? INFINITY : -INFINITY);
    }
    v = from_d<T>(d);
  }
  std::vector<double> want_y;
  std::vector<int64_t> want_i;
  ref_pool(s, as_double(x), want_y, want_i);
  std::vector<T> y(size_t(s.y_numel()), from_d<T>(5.0));
  std::vector<int64_t> idx(size_t(s.y_numel()), -7);
  const int64_t syncs0 = emu::state().syncs;
  kc::max_pool2d_forward<T>(s, x.data(), y.data(), idx.data(), nullptr);
  CHECK(emu::state().syncs == syncs0, "max_pool2d forward synchronised: %s", what.c_str());
  bool exact = idx == want_i;
  for (size_t i = 0; exact && i < y.size(); ++i) {
    const double g = to_d(y[i]);
    exact = g == want_y[i] || (std::isnan(g) && std::isnan(want_y[i]));
  }
  CHECK(exact, "max_pool2d forward %s", what.c_str());
  std::vector<T> y2(y.size());
  kc::max_pool2d_forward<T>(s, x.data(), y2.data(), nullptr, nullptr);
  CHECK(same_bits(y, y2), "max_pool2d forward without indices %s", what.c_str());

  auto gy = random_array<T>(s.y_numel());
  std::vector<double> want_gx(size_t(s.x_numel()), 0.0);
  for (int64_t plane = 0; plane < s.N * s.C; ++plane)
    for (int64_t o = 0; o < s.P * s.Q; ++o)
      want_gx[size_t(plane * s.H * s.W + want_i[size_t(plane * s.P * s.Q + o)])] += to_d(gy[size_t(plane * s.P * s.Q + o)]);
  std::vector<T> gx(size_t(s.x_numel()), from_d<T>(3.0));
  const kc::BadIndex bad = kc::max_pool2d_backward<T>(s, gy.data(), want_i.data(), gx.data(), nullptr);
  std::string why;
  CHECK(bad.position == -1, "max_pool2d backward flagged valid indices %s at %ld", what.c_str(), long(bad.position));
  CHECK(close(gx, want_gx, s.win.kernel_h * s.win.kernel_w, &why), "max_pool2d backward %s: %s", what.c_str(),
        why.c_str());
  emu::set_schedule(emu::Schedule::reverse);
  std::vector<T> gx2(gx.size());
  kc::max_pool2d_backward<T>(s, gy.data(), want_i.data(), gx2.data(), nullptr);
  emu::set_schedule(emu::Schedule::forward);
  CHECK(same_bits(gx, gx2), "max_pool2d backward not deterministic %s", what.c_str());

  // Bad indices: every kind of wrong value is caught, and the first bad position is reported.
  if (s.y_numel() > 0) {
    const int64_t HW = s.H * s.W;
    const int64_t wrong_values[] = {-1, HW, HW + 5, int64_t(1) << 40};
    for (int64_t v : wrong_values) {
      auto bad_i = want_i;
      const int64_t at = rand_int(0, s.y_numel() - 1);
      bad_i[size_t(at)] = v;
      const kc::BadIndex got = kc::max_pool2d_backward<T>(s, gy.data(), bad_i.data(), gx2.data(), nullptr);
      CHECK(got.position == at && got.value == v, "bad index %ld at %ld: got position %ld value %ld (%s)", long(v),
            long(at), long(got.position), long(got.value), what.c_str());
    }
    // A valid cell of the plane that is outside this window (when the window is not the whole plane).
    auto bad_i = want_i;
    const int64_t at = s.y_numel() - 1, plane_at = at % (s.P * s.Q);
    int64_t outside = -1;
    for (int64_t cell = 0; cell < HW && outside < 0; ++cell) {
      const int64_t p = plane_at / s.Q, q = plane_at % s.Q;
      const int64_t dh = cell / s.W - (p * s.win.stride_h - s.win.pad_top);
      const int64_t dw = cell % s.W - (q * s.win.stride_w - s.win.pad_left);
      const bool inside = dh >= 0 && dw >= 0 && dh % s.win.dilation_h == 0 && dw % s.win.dilation_w == 0 &&
                          dh / s.win.dilation_h < s.win.kernel_h && dw / s.win.dilation_w < s.win.kernel_w;
      if (!inside) outside = cell;
    }
    if (outside >= 0) {
      bad_i[size_t(at)] = outside;
      if (s.y_numel() > 1) bad_i[0] = -3;  // two bad entries: the first is reported
      const kc::BadIndex got = kc::max_pool2d_backward<T>(s, gy.data(), bad_i.data(), gx2.data(), nullptr);
      const int64_t want_at = s.y_numel() > 1 ? 0 : at;
      CHECK(got.position == want_at, "out-of-window index: got position %ld, want %ld (%s)", long(got.position),
            long(want_at), what.c_str());
    }
  }
  CHECK(emu::state().live_allocs == 0, "max_pool2d leaked its flag: %s", what.c_str());
}

Pool2dShape random_pool() {
  for (;;) {
    const int64_t n = rand_int(1, 2), c = rand_int(1, 3), kh = rand_int(1, 4), kw = rand_int(1, 4);
    const int64_t sh = rand_int(1, 3), sw = rand_int(1, 3), dh = rand_int(1, 3), dw = rand_int(1, 3);
    const int64_t span_h = dh * (kh - 1) + 1, span_w = dw * (kw - 1) + 1;
    const int64_t pt = rand_int(0, span_h - 1), pb = rand_int(0, span_h), pl = rand_int(0, span_w - 1),
                  pr = rand_int(0, span_w);
    const int64_t hmin = std::max<int64_t>(1, span_h - pt - pb), wmin = std::max<int64_t>(1, span_w - pl - pr);
    try {
      return make_pool(n, c, rand_int(hmin, hmin + 8), rand_int(wmin, wmin + 8), kh, kw, sh, sw, dh, dw, pt, pb, pl,
                       pr, rand_int(0, 1) == 1);
    } catch (const pykernels::ShapeError&) {
    }
  }
}

template <typename T>
void pool_suite(int random_cases) {
  const Pool2dShape named[] = {
      make_pool(2, 8, 56, 56, 2, 2, 2, 2, 1, 1, 0, 0, 0, 0, false),
      make_pool(2, 4, 36, 36, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, false),
      make_pool(1, 2, 5, 5, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, true),
      make_pool(1, 1, 8, 7, 3, 3, 2, 2, 2, 2, 0, 0, 0, 0, true),
      make_pool(1, 2, 7, 6, 2, 3, 2, 2, 1, 1, 1, 0, 0, 2, true),
      make_pool(1, 2, 9, 9, 3, 3, 2, 2, 2, 2, 4, 4, 4, 4, false),
      make_pool(2, 2, 5, 6, 5, 6, 5, 6, 1, 1, 0, 0, 0, 0, false),   // window == input
      make_pool(2, 3, 14, 4, 5, 5, 3, 3, 1, 1, 0, 0, 0, 0, true),   // ceil_mode: windows past the input's end
      make_pool(1, 1, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false),
      make_pool(0, 3, 5, 5, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, false),   // empty batch
  };
  for (const auto& s : named)
    for (int kind = 0; kind < 3; ++kind) check_pool<T>(s, kind);
  for (int i = 0; i < random_cases; ++i) check_pool<T>(random_pool(), i % 3);
}

// ---- launch errors -----------------------------------------------------------------------------------

void launch_error_test() {
  // A launch the (emulated) runtime rejects must come back as CudaError from the launcher.
  bool thrown = false;
  ::pykernels_emu::launch(dim3(1, 70000, 1), dim3(32), [] {});
  std::vector<float> buf(4, 1.0f);
  try {
    kc::relu_forward<float>(4, buf.data(), buf.data(), nullptr);  // its own launch is fine; the earlier error surfaces
  } catch (const kc::CudaError& e) {
    thrown = std::string(e.what()).find("invalid configuration") != std::string::npos;
  }
  CHECK(thrown, "a failed launch is reported as CudaError");
}

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 40;
  if (argc > 2) rng.seed(std::strtoull(argv[2], nullptr, 10));
  launch_error_test();
  relu_suite<float>();
  relu_suite<double>();
  relu_suite<__half>();
  for (int pass = 0; pass < 2; ++pass) {
    kc::set_force_int64_indexing(pass == 1);
    const int n = pass == 0 ? random_cases : random_cases / 4;
    pool_suite<float>(n * 2);
    pool_suite<double>(n);
    pool_suite<__half>(n);
    conv_suite<float>(n);
    conv_suite<double>(n / 2);
    conv_suite<__half>(n / 2);
  }
  std::printf("%d checks, %d failures, %ld launches\n", g_checks, g_failures, long(emu::state().launches));
  return g_failures ? 1 : 0;
}
