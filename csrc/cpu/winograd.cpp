// Winograd F(4x4, 3x3) and, for layers with few tiles, F(2x2, 3x3): when each applies, and which
// instruction-set build of winograd_impl.inc / winograd_f2_impl.inc runs it.
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

#include <algorithm>
#include <limits>

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_WINOGRAD(ns)                                                                        \
  namespace ns {                                                                                              \
  template <typename T>                                                                                       \
  bool conv2d_winograd(const Conv2dShape&, const WinogradInput<T>&, const WinogradFilters<T>&,               \
                       const PackedLayout&, const T*, T*);                                                    \
  template <typename T>                                                                                       \
  bool conv2d_backward_weight_winograd(const Conv2dShape&, const T*, const WinogradInput<T>&, T*);           \
  template <typename T>                                                                                       \
  bool conv2d_winograd_f2(const Conv2dShape&, const T*, const WinogradFilters<T>&, const T*, T*);            \
  template <typename T>                                                                                       \
  bool conv2d_backward_weight_winograd_f2(const Conv2dShape&, const T*, const T*, T*);                       \
  template <typename T>                                                                                       \
  bool conv2d_backward_weight_winograd_rows(const Conv2dShape&, const T*, const T*, T*);                     \
  }
PYKERNELS_DECLARE_WINOGRAD(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_WINOGRAD(avx2)
PYKERNELS_DECLARE_WINOGRAD(avx512)
#endif
#undef PYKERNELS_DECLARE_WINOGRAD

int64_t winograd_f4_tiles(const Conv2dShape& s) { return s.N * ((s.P + 3) / 4) * ((s.Q + 3) / 4); }

double conv2d_direct_cost(const Conv2dShape& s) {
  return 2.0 * double(s.R * s.S) * double(s.N) * double(s.P) * double(s.Q);
}

namespace {

// Bytes of 36 values per channel pair: the transformed filters U, and backward-weight's sums D.
double transformed_bytes(const Conv2dShape& s, int64_t element_bytes) {
  return double(s.K) * double(s.C) * 36.0 * double(element_bytes);
}

// 3x3, stride 1, undilated, one group.
bool is_winograd_shape(const Conv2dShape& s) {
  const Window2d& w = s.win;
  return s.R == 3 && s.S == 3 && w.stride_h == 1 && w.stride_w == 1 && w.dilation_h == 1 && w.dilation_w == 1 &&
         s.groups == 1;
}

// Costs per channel pair, in flops of the GEMM: direct convolution 18 per output (conv2d_direct_cost);
// F(4x4)'s 36 GEMMs 72 per tile, and each of the 36 transformed values per filter about `per_filter_value`
// flops' time on top (see the callers).
double f4_cost(const Conv2dShape& s, double per_filter_value) {
  return 72.0 * double(winograd_f4_tiles(s)) + 36.0 * per_filter_value;
}

// Enough channels and 4x4 tiles, and cheaper than the GEMM.
bool winograd_worth_it(const Conv2dShape& s, double per_filter_value) {
  return is_winograd_shape(s) && s.C >= 8 && s.K >= 8 && s.P >= 4 && s.Q >= 4 &&
         f4_cost(s, per_filter_value) < conv2d_direct_cost(s);
}

}  // namespace

// Over 16 MiB of U, always; over 4 MiB where every tile fits the streamed path's one chunk (V within about
// 4 MiB), so that no filter is transformed twice. resnet_3x3_256 at batch 1 (9.4 MB of U, 16 tiles): with
// the caches flushed before each call, forward 0.65 ms streamed against 0.83 at once, backward-input 0.69
// against 0.78, and in this host's slow phases 0.48-0.72 against 0.65-1.34; with warm caches in a quiet
// phase 0.52 against 0.48 (measured before that layer took F(2x2), which it now does at batch 1; at batch
// 2 it streams). At batch 8 (128 tiles, two chunks) it still transforms U at once.
bool winograd_streams_filters(const Conv2dShape& s, int64_t element_bytes) {
  const double u_bytes = transformed_bytes(s, element_bytes);
  if (u_bytes > 16.0 * (1 << 20)) return true;
  const int64_t tiles = winograd_f4_tiles(s);
  return u_bytes > 4.0 * (1 << 20) && tiles <= winograd_streamed_chunk(s, element_bytes);
}

int64_t winograd_streamed_chunk(const Conv2dShape& s, int64_t element_bytes) {
  return std::max<int64_t>(48, (int64_t(4) << 20) / (36 * s.C * element_bytes) / 48 * 48);
}

// The time of each transformed filter value, in flops of the GEMM. Transformed at once, U stays in L3 between
// its transform and the GEMMs: about 20-25 there (1x256x14x14 takes Winograd in 0.45 ms, the GEMM in
// 0.75-0.87; with the caches flushed before each call both take ~1.0 ms), so 50 leaves a margin. About 60
// when the filters are transformed block by block in L2 (winograd_streams_filters: there resnet_3x3_512 at
// batch 8 runs in 0.75x the time of the GEMM). About 200 when a U larger than L3 is written to memory and
// read back (measured on resnet_3x3_512 before it streamed).
// (The choice is made for float32's U: float64 runs the same layers, streaming from half the size.)
namespace {
double f4_per_filter_value(const Conv2dShape& s) { return winograd_streams_filters(s, 4) ? 60.0 : 50.0; }
}  // namespace

bool winograd_f4_applies(const Conv2dShape& s) { return winograd_worth_it(s, f4_per_filter_value(s)); }

// F(2x2, 3x3) (winograd_f2_impl.inc) where it costs less than both the GEMM and F(4x4): 16 products per 2x2
// tile and channel pair (32 flops), plus the filter's transform, redone on every call: about 20 flops' time
// for each of its 16 values (resnet_3x3_512 at batch 1 took 0.53 ms against the GEMM's 0.59, 0.29 of it in
// the 16 GEMMs). Up to 64 tiles (V, 16 x tiles x C, and each thread's M stay in L2; with 98 to 196 tiles
// it ran as fast as F(4x4), with 128 on 7x7 1.2x slower). Against F(4x4), at batch 1: 256 channels on 14x14
// 0.51 ms against 0.64, 128 on 14x14 0.22 against 0.28, 512 on 7x7 at batch 4 1.90 against 2.00. From 64
// channels in float32; from 256 in float64, where the gather and the transforms weigh twice as much
// against each multiply (64-128 channels on 7x7 to 11x11 ran at 0.7-1.06x the GEMM's speed).
namespace {
double f2_tiles(const Conv2dShape& s) { return double(s.N) * double((s.P + 1) / 2) * double((s.Q + 1) / 2); }
double f2_cost(const Conv2dShape& s) { return 32.0 * f2_tiles(s) + 16.0 * 20.0; }
}  // namespace

bool winograd_f2_applies(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t min_channels = element_bytes > 4 ? 256 : 64;
  if (!(is_winograd_shape(s) && s.C >= min_channels && s.K >= min_channels)) return false;
  const double cost = f2_cost(s);
  return f2_tiles(s) <= 64 && cost < conv2d_direct_cost(s) &&
         (!winograd_f4_applies(s) || cost < f4_cost(s, f4_per_filter_value(s)));
}

bool winograd_applies(const Conv2dShape& s, int64_t element_bytes) {
  return winograd_f4_applies(s) || winograd_f2_applies(s, element_bytes);
}

double winograd_cost(const Conv2dShape& s, int64_t element_bytes) {
  if (winograd_f2_applies(s, element_bytes)) return f2_cost(s);
  if (winograd_f4_applies(s)) return f4_cost(s, f4_per_filter_value(s));
  return std::numeric_limits<double>::infinity();
}

// V and E of a chunk together within about 4 MiB, in whole 48-tile groups, but 64 tiles at least: each
// chunk adds into all of D (36 x K x C sums), so fewer chunks move D fewer times. Against 48 at least
// (batch 8, timed between torch's calls, ms): 256 channels on 14x14 float32 3.10 -> 2.90, float64 6.25 ->
// 5.68; at batch 4 1.54 -> 1.40 and 3.34 -> 2.90; 512 on 14x14 12.7 -> 10.9 and 25.2 -> 20.5; 256 on
// 28x28 float32 7.17 -> 6.87; 128 on 28x28 float64 (96 then) level. (96 or 128 at least: 256 on 14x14
// and 28x28 slower than 64, 2.87-2.96 and 7.17-7.45.)
int64_t winograd_backward_weight_chunk(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t total = winograd_f4_tiles(s);
  const int64_t per_tile = 36 * (s.C + s.K) * element_bytes;
  return std::min(total, std::max<int64_t>(64, (int64_t(4) << 20) / per_tile / 48 * 48));
}

// The chunked path's tiles per chunk: winograd_backward_weight_chunk's, but a last chunk of under a quarter of
// the others is spread over them instead, a few tiles each: every chunk adds into all of D, which a handful
// of tiles on their own moved once more, through 36 GEMMs that shallow. resnet_3x3_128, float32, ms (one
// process switching call by call, torch's call between): at batch 2, 96 + 2 tiles -> 98, 0.90 -> 0.79
// (1.03 -> 0.89 where the cores shared no L3); at batch 4, 2 x 96 + 4 -> 2 x 98, 1.30 -> 1.24; at batch
// 8, 4 x 96 + 8 -> 4 x 98, 2.22 -> 2.16; float64, in chunks of 64: batch 4 2.95 -> 2.85, batch 8 level.
int64_t winograd_backward_weight_chunk_tiles(const Conv2dShape& s, int64_t element_bytes) {
  return spread_small_last_chunk(winograd_f4_tiles(s), winograd_backward_weight_chunk(s, element_bytes));
}

namespace {
bool sums_fit_l3(const Conv2dShape& s, int64_t element_bytes) {
  return transformed_bytes(s, element_bytes) <= 16.0 * (1 << 20);
}
}  // namespace

// By blocks where D passes 4 MiB, more than both cores' L2 hold: resnet_3x3_256 at batch 1 (9.4 MB), timed
// between calls of torch's (which evict L3), 0.438 -> 0.403 ms, at batch 2 0.702 -> 0.648; 2.4 MB of D
// (128 channels on 28x28 at batch 1) 0.238 -> 0.249, so smaller D still go whole.
bool winograd_backward_weight_in_blocks(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t total = winograd_f4_tiles(s);
  return transformed_bytes(s, element_bytes) > 4.0 * (1 << 20) &&
         total <= winograd_backward_weight_chunk(s, element_bytes) && total <= 256;
}

// Backward-weight's cost per value of D, in flops of the GEMM: about 40 while D stays in L3 (since the input
// transform runs over vectors of channels: resnet_3x3_256 at batch 1 0.45 ms against the GEMM's 0.55, 128
// channels on 7x7 at batch 4 0.16 against 0.19, on 12x12 at batch 1 0.12 against 0.18), about 80 where it
// goes through L2 by blocks (with 40, resnet_3x3_512 at batch 3 took 1.70 ms against the GEMM's 1.54),
// about 200 when it goes out to memory and back (resnet_3x3_512 at batch 2 took 2.6 ms that way, the GEMM
// 1.2). 32 tiles and 392 positions take Winograd even at 80 (resnet_3x3_512 at batch 8: 3.3 ms against
// 4.2). Chosen for float32, as forward. Measured with 64 channels or more: below that the transforms of x
// and grad_y, per channel and tile, weigh more per channel pair, and 200 stays.
// With at most 8 tiles (64 channels or more), the sums stay in registers (winograd_weight_in_registers_impl.inc):
// about 14 per value, from 512 channels on 5x5 at batch 1 (4 tiles as on 7x7, against the GEMM's 25 positions:
// 1.76x its time). Float32, this path's time / the one before (two threads, one process): 7x7 at batch 1, 512
// channels 0.83 (the GEMM path), 256 0.83, 128 0.98 and 64 0.69 (F(3, 2) along the rows); 8x8 at batch 1, 512
// 0.87 (the GEMM); at batch 2 (8 tiles) 512 0.89 and 256 0.80 (F(2x2)). Float64: 512 on 7x7 at batch 1 0.86,
// at batch 2 0.75, 256 0.84, 64 0.90. On 14x14 at batch 1 (16 tiles, not taken: a block's V, 36 x tiles x 32
// values, no longer stays in L1), 256 level, 512 1.42.
bool winograd_backward_weight_in_registers(const Conv2dShape& s) {
  return is_winograd_shape(s) && s.C >= 64 && s.K >= 64 && winograd_f4_tiles(s) <= 8;
}

namespace {
double backward_weight_per_value(const Conv2dShape& s, bool sums_in_registers) {
  if (sums_in_registers && winograd_backward_weight_in_registers(s)) return 14.0;
  if (!(s.C >= 64 && s.K >= 64)) return 200.0;
  if (sums_fit_l3(s, 4)) return 40.0;
  return winograd_backward_weight_in_blocks(s, 4) ? 80.0 : 200.0;
}
}  // namespace

bool winograd_backward_weight_applies(const Conv2dShape& s, bool sums_in_registers) {
  return winograd_worth_it(s, backward_weight_per_value(s, sums_in_registers));
}

double winograd_backward_weight_cost(const Conv2dShape& s, bool sums_in_registers) {
  return winograd_backward_weight_applies(s, sums_in_registers)
             ? f4_cost(s, backward_weight_per_value(s, sums_in_registers))
             : std::numeric_limits<double>::infinity();
}

// Backward-weight on F(2x2) (winograd_f2_weight_impl.inc) with forward's channel and tile bounds, where
// F(4x4)'s backward-weight does not apply and there are 32 tiles at least (float64: 48): its GEMMs are as
// deep as the tiles, and at 16 (resnet_3x3_512 at batch 1) they ran at 80 % of the FMA peak, which with
// G'^T D G' on each of the 262,144 filters took 0.60 ms against the GEMM path's 0.53. Timed between torch's
// calls, float32, ms: 512 channels on 7x7 at batch 2 1.07 -> 0.87, at batch 3 1.59 -> 1.24, at batch 4
// 2.09 -> 1.62; on 10x10 at batch 2 2.08 -> 1.28; on 14x14 at batch 1 2.06 -> 1.47; 256 on 7x7 at batch 2
// 0.279 -> 0.254; 64 and 128 on 7x7 at batch 2 level. float64: 512 on 14x14 at batch 1 4.12 -> 3.02, on 7x7
// at batch 4 4.21 -> 3.80, but at batch 2 (32 tiles) 2.09 -> 2.23.
bool winograd_backward_weight_f2_applies(const Conv2dShape& s, int64_t element_bytes) {
  const int64_t min_channels = element_bytes > 4 ? 256 : 64, min_tiles = element_bytes > 4 ? 48 : 32;
  if (!(is_winograd_shape(s) && s.C >= min_channels && s.K >= min_channels)) return false;
  const double tiles = f2_tiles(s);
  return tiles >= double(min_tiles) && tiles <= 64 && f2_cost(s) < conv2d_direct_cost(s) &&
         !winograd_backward_weight_applies(s);
}

template <typename T>
bool conv2d_backward_weight_winograd_f2(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_backward_weight_winograd_f2<T>(s, grad_y, x, grad_w))
}

template bool conv2d_backward_weight_winograd_f2<float>(const Conv2dShape&, const float*, const float*, float*);
template bool conv2d_backward_weight_winograd_f2<double>(const Conv2dShape&, const double*, const double*, double*);

// Backward-weight on F(3, 2) along the rows (winograd_rows_weight_impl.inc) for 3x3 float32 layers of 64
// channels or more that neither F(2x2)'s nor F(4x4)'s backward-weight takes, with GEMMs 40 tiles deep at least
// (P x N x the column pairs), or 18 where grad_w fits in L2 (1 MiB). Batch 1, ms, this path / the GEMM path's,
// one process, with 64 MB written between calls (cold) / torch's bias gradient between / back to back (warm):
// 512 channels on 10x10 (50 deep) 1.06 / 1.16, 1.12 / 1.19, 0.97 / 1.13 (torch's weight gradient between:
// 0.86 / 1.11); on 9x9 (45) 1.01 / 0.98, 0.86 / 0.97, 0.82 / 0.88; 128 on 7x7 (28) 0.099 / 0.096, 0.044 /
// 0.051, 0.042 / 0.049; 64 on 7x7 0.080 / 0.080, 0.028 / 0.032; on 6x6 (18) 0.075 / 0.078, 0.021 / 0.029.
// Not on resnet_3x3_512 at batch 1 (28 deep, 9.4 MB of grad_w): 3-5 % faster back to back (0.51 / 0.53) but
// 16-23 % slower cold (0.76-0.79 / 0.65), when the stores of each block's gradients, in bursts after its
// GEMMs, fetch grad_w's lines (the GEMM path's stores go out between its multiplications; prefetching the
// lines during the GEMMs, or blocks of 16 to 32 rows, brought it to 0.73 only), and no faster in the bench
// (0.57-0.67 against 0.60-0.64; torch's weight gradient between: 0.56-0.73 against 0.58-0.62); 256 on 7x7
// (2.4 MB) 0.229-0.235 / 0.205 cold. Not on 5x5 (15 deep: 512 channels 0.341 against 0.302 back to back),
// nor where F(2x2) applies (512 on 7x7 at batch 2 0.885 against 0.827; on 14x14 at batch 1 1.46 against 1.19)
// or F(4x4) (256 on 14x14 0.407 against 0.361). Not float64: 512 on 7x7 1.86 against 1.12 (its blocks of D
// twice the bytes; its gradients stored one by one).
bool winograd_backward_weight_rows_applies(const Conv2dShape& s, int64_t element_bytes) {
  if (!(element_bytes == 4 && is_winograd_shape(s) && s.C >= 64 && s.K >= 64)) return false;
  const double depth = double(s.P) * double(s.N) * double((s.Q + 1) / 2);
  const bool gradients_in_l2 = double(s.K) * double(s.C) * 9.0 * double(element_bytes) <= double(1 << 20);
  return (depth >= 40 || (depth >= 18 && gradients_in_l2)) && depth <= 128 &&
         !winograd_backward_weight_f2_applies(s, element_bytes) && !winograd_backward_weight_applies(s);
}

template <typename T>
bool conv2d_backward_weight_winograd_rows(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_backward_weight_winograd_rows<T>(s, grad_y, x, grad_w))
}

template bool conv2d_backward_weight_winograd_rows<float>(const Conv2dShape&, const float*, const float*, float*);
template bool conv2d_backward_weight_winograd_rows<double>(const Conv2dShape&, const double*, const double*,
                                                           double*);

template <typename T>
bool conv2d_winograd_f4_of(const Conv2dShape& s, const WinogradInput<T>& x, const WinogradFilters<T>& filters,
                           const T* bias, T* y) {
  // The transformed filters are packed for the active GEMM build; the transforms run on the same one.
  const PackedLayout layout = packed_layout<T>(s.K, s.C);
  PYKERNELS_RETURN_ON_BUILD(layout.isa, conv2d_winograd<T>(s, x, filters, layout, bias, y))
}

template <typename T>
bool conv2d_winograd(const Conv2dShape& s, const T* x, const WinogradFilters<T>& filters, const T* bias, T* y) {
  if (winograd_f2_applies(s, sizeof(T))) {
    PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_winograd_f2<T>(s, x, filters, bias, y))
  }
  return conv2d_winograd_f4_of(s, plain_winograd_input(s, x), filters, bias, y);
}

template <typename T>
bool conv2d_backward_weight_winograd_of(const Conv2dShape& s, const T* grad_y, const WinogradInput<T>& x, T* grad_w) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_backward_weight_winograd<T>(s, grad_y, x, grad_w))
}

template <typename T>
bool conv2d_backward_weight_winograd(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  return conv2d_backward_weight_winograd_of(s, grad_y, plain_winograd_input(s, x), grad_w);
}

template bool conv2d_backward_weight_winograd<float>(const Conv2dShape&, const float*, const float*, float*);
template bool conv2d_backward_weight_winograd<double>(const Conv2dShape&, const double*, const double*, double*);
template bool conv2d_winograd<float>(const Conv2dShape&, const float*, const WinogradFilters<float>&, const float*,
                                     float*);
template bool conv2d_winograd<double>(const Conv2dShape&, const double*, const WinogradFilters<double>&,
                                      const double*, double*);
template bool conv2d_winograd_f4_of<float>(const Conv2dShape&, const WinogradInput<float>&,
                                           const WinogradFilters<float>&, const float*, float*);
template bool conv2d_winograd_f4_of<double>(const Conv2dShape&, const WinogradInput<double>&,
                                            const WinogradFilters<double>&, const double*, double*);
template bool conv2d_backward_weight_winograd_of<float>(const Conv2dShape&, const float*, const WinogradInput<float>&,
                                                        float*);
template bool conv2d_backward_weight_winograd_of<double>(const Conv2dShape&, const double*,
                                                         const WinogradInput<double>&, double*);

}  // namespace pykernels::cpu
