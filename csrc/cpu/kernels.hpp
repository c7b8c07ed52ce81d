// The CPU kernels the bindings call. Pointers are to contiguous NCHW buffers whose sizes match the
// shape struct, which the caller has validated (Conv2dShape::validate / Pool2dShape::validate).
// Every kernel runs without the GIL, keeps no state between calls (thread-safe) and is deterministic.
#pragma once

#include <cstdint>

#include "common/shapes.hpp"

namespace pykernels::cpu {

// conv2d.cpp -- y = x (*) w (+ bias); bias may be null.
template <typename T>
void conv2d_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
// grad_x = transposed convolution of grad_y with w.
template <typename T>
void conv2d_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);
// grad_w = correlation of x with grad_y, summed over the batch in a fixed order.
template <typename T>
void conv2d_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);
// grad_b[k] = sum of grad_y over n, p, q.
template <typename T>
void conv2d_backward_bias(const Conv2dShape& s, const T* grad_y, T* grad_b);

// direct_conv.cpp -- the three passes of layers summed directly (conv_ranges.hpp's sums_directly); same
// contracts, except that a NaN or inf in x (backward-weight) or w (backward-input) may reach sums it does
// not belong to (see direct_conv_impl.inc); conv2d.cpp checks for that.
template <typename T>
void conv2d_forward_direct(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void conv2d_backward_input_direct(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);
template <typename T>
void conv2d_backward_weight_direct(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// depthwise_conv.cpp -- depthwise layers (one input and one output channel per group) on small planes,
// the channels across the vector lanes, for the layers conv2d_depthwise_channels_last_chosen picks (at
// element_bytes per value; before the direct sums). Same contracts as conv2d_forward and
// conv2d_backward_input.
bool conv2d_depthwise_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_depthwise_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void conv2d_depthwise_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);
// Backward-weight likewise, for the layers conv2d_depthwise_weight_channels_last_chosen picks.
bool conv2d_depthwise_weight_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_depthwise_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// small_group_conv.cpp -- grouped layers of one to four vectors of channels a group, a group's channels across
// the lanes: 3x3 stride-1 ones on Winograd F(2x2, 3x3), for the layers conv2d_small_group_winograd_chosen
// picks (at element_bytes per value), backward-weight of any window (..._small_groups_chosen) and forward
// and backward-input of strided ones (..._directly_chosen, ..._backward_input_..._directly_chosen; contracts
// conv2d_forward's and conv2d_backward_input's). Forward's
// contract is conv2d_winograd's (the filters read through `filters`, so that backward-input runs it as the
// transposed forward), backward-weight's conv2d_backward_weight's. A NaN or inf in what a tile reads
// reaches all of that tile's outputs: forward returns false where an output came out NaN or inf, and
// conv2d.cpp then recomputes it; it checks grad_w.
bool conv2d_small_group_winograd_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_input_small_group_winograd_chosen(const Conv2dShape& s, int64_t element_bytes);  // conv2d.cpp
bool conv2d_backward_weight_small_groups_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_small_groups_directly_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_input_small_groups_directly_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
struct WinogradFilters;
template <typename T>
bool conv2d_small_group_winograd(const Conv2dShape& s, const T* x, const WinogradFilters<T>& filters, const T* bias,
                                 T* y);
template <typename T>
void conv2d_backward_weight_small_groups(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);
template <typename T>
void conv2d_forward_small_groups_directly(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void conv2d_backward_input_small_groups_directly(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);

// dilated_phases.cpp -- dilated stride-1 layers as their undilated layer over a batch of x's dilation phases,
// for the layers these pick (where that undilated layer takes Winograd; at element_bytes per value). Same
// contracts as conv2d_forward, conv2d_backward_input and conv2d_backward_weight.
bool conv2d_forward_by_phases_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_input_by_phases_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_weight_by_phases_chosen(const Conv2dShape& s);
template <typename T>
void conv2d_forward_by_phases(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void conv2d_backward_input_by_phases(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);
template <typename T>
void conv2d_backward_weight_by_phases(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// grouped_winograd.cpp -- grouped layers of large groups (48 or more channels) as one layer per group over the
// whole batch, where that layer takes Winograd and small_group_conv.cpp's passes do not take the layer (at
// element_bytes per value). Same contracts as conv2d_forward,
// conv2d_backward_input and conv2d_backward_weight.
bool conv2d_forward_per_group_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_input_per_group_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_weight_per_group_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_forward_per_group(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void conv2d_backward_input_per_group(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);
template <typename T>
void conv2d_backward_weight_per_group(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// conv_rows.cpp -- forward as GEMMs reading x from a padded copy split into its stride phases instead of
// packing im2col columns: one per output row for the layers conv2d_forward_by_rows_applies to (at
// element_bytes per value), one per block of rows for the stride-1 layers conv2d_forward_reads_wide_rows
// picks (which take precedence). Same contract as conv2d_forward.
bool conv2d_forward_by_rows_applies(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_forward_reads_wide_rows(const Conv2dShape& s, int64_t element_bytes);
// The share of its multiply-adds that the im2col-based forward plans (wide rows, per row, packed columns)
// keep on this layer, by their own estimates: lanes past the rows' ends, and packing, counted as lost.
double conv2d_forward_packed_share(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_forward_by_rows(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
// Backward-weight of stride-1 layers as one GEMM per image and block of taps with the copy's rows read
// in place as A (wide rows) and grad_y packed as B, for the layers this picks. A result that is not
// finite is to be recomputed elsewhere: the columns past each output row meet zeros in B, and 0 * inf
// would be NaN where the true sums have no such product.
bool conv2d_backward_weight_reads_wide_rows(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_backward_weight_wide(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// channels_last_conv.cpp -- forward as one GEMM per tap over channels-last copies of the images, the
// output channels across the vector lanes, for the layers conv2d_forward_channels_last_chosen picks (at
// element_bytes per value; before conv_rows.cpp's). Same contract as conv2d_forward.
bool conv2d_forward_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_forward_channels_last(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
// Backward-input likewise, one GEMM per tap (grad_y channels-last times the tap's weights, the input channels
// across the lanes) whose rows are added into grad_x's channels-last rows, for the strided layers this
// picks. Same contract as conv2d_backward_input.
bool conv2d_backward_input_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_backward_input_channels_last(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x);
// Backward-input of a stride-1 layer s as its transposed forward t (the transposed convolution's shape), which
// conv2d_forward_channels_last_chosen picks, over grad_y with w's weights (finite) rotated.
template <typename T>
void conv2d_backward_input_as_forward_channels_last(const Conv2dShape& s, const Conv2dShape& t, const T* grad_y,
                                                    const T* w, T* grad_x);
// Backward-weight likewise for the strided and grouped layers this picks (grouped ones also taken by the
// direct sums' rule, which this one precedes), grad_y packed as A and each tap's rows of the copies read in
// place as B. Same contract as conv2d_backward_weight.
bool conv2d_backward_weight_channels_last_chosen(const Conv2dShape& s, int64_t element_bytes);
template <typename T>
void conv2d_backward_weight_channels_last(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// Which algorithm convolutions use: "auto" (Winograd F(4x4,3x3) or F(2x2,3x3) for the 3x3 stride-1 layers
// they suit, implicit GEMM otherwise) or "gemm" (implicit GEMM always). Tests run both; returns false on an
// unknown name.
bool set_conv_algorithm(const char* name);
const char* conv_algorithm();
// Whether these shapes take the Winograd path under the current algorithm: forward and backward-input (as
// the transposed convolution), at element_bytes per value; backward-weight. A Winograd result holding NaN
// or inf is then recomputed on the GEMM path (conv2d.cpp, all_finite).
bool conv2d_winograd_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_input_winograd_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_weight_winograd_chosen(const Conv2dShape& s, bool sums_in_registers = true);
// Whether backward-weight takes F(2x2, 3x3) (few tiles, at element_bytes per value), before F(4x4).
bool conv2d_backward_weight_winograd_f2_chosen(const Conv2dShape& s, int64_t element_bytes);
// Whether backward-weight takes F(3, 2) along the rows (fewer tiles still), before F(2x2).
bool conv2d_backward_weight_winograd_rows_chosen(const Conv2dShape& s, int64_t element_bytes);
// Whether backward-weight takes F(4x4) with its sums in registers (at most 8 tiles; element_bytes unused).
bool conv2d_backward_weight_winograd_in_registers_chosen(const Conv2dShape& s, int64_t element_bytes);
// Whether backward-input runs as the transposed convolution through conv2d_forward (conv2d.cpp), given
// finite weights, at element_bytes per value; else col2im.
bool conv2d_backward_input_transposed_chosen(const Conv2dShape& s, int64_t element_bytes);
// Whether forward takes conv_rows.cpp's path (at element_bytes per value) where Winograd is not chosen,
// or its result was not finite.
bool conv2d_forward_by_rows_chosen(const Conv2dShape& s, int64_t element_bytes);

// winograd.cpp -- 3x3, stride 1, undilated, groups 1 (winograd_applies); same contract as conv2d_forward,
// with filter (k, c) the 3x3 block at w + k * k_stride + c * c_stride, rotated 180 degrees when `flipped`
// (so backward-input runs as the transposed convolution without copying the weights).
// Whether one of the two Winograd paths applies at element_bytes per value: F(4x4, 3x3) (winograd_impl.inc),
// or F(2x2, 3x3) for few tiles (winograd_f2_impl.inc), which conv2d_winograd takes wherever it applies.
bool winograd_applies(const Conv2dShape& s, int64_t element_bytes);
bool winograd_f4_applies(const Conv2dShape& s);
bool winograd_f2_applies(const Conv2dShape& s, int64_t element_bytes);
// What the path winograd_applies to costs per channel pair (forward), in flops of the GEMM as the rules count
// them; infinity where none applies. The same for backward-weight. Against direct convolution's 2 R S flops
// per output and channel pair (conv2d_direct_cost), in the same units.
double conv2d_direct_cost(const Conv2dShape& s);
double winograd_cost(const Conv2dShape& s, int64_t element_bytes);
// sums_in_registers false: as for x's 3x3 pieces (split_kernel.cpp), whose sums never stay in registers.
double winograd_backward_weight_cost(const Conv2dShape& s, bool sums_in_registers = true);
// Whether the filters are transformed block by block as the GEMMs use them (transformed filters of more
// than 16 MiB at element_bytes per value, or more than 4 MiB with every tile in one chunk), rather than
// all at once before; and that streamed path's chunk of tiles.
bool winograd_streams_filters(const Conv2dShape& s, int64_t element_bytes);
int64_t winograd_streamed_chunk(const Conv2dShape& s, int64_t element_bytes);
// The layer's 4x4 output tiles over the batch (winograd_impl.inc's TileGrid::total).
int64_t winograd_f4_tiles(const Conv2dShape& s);
// The same for conv2d_backward_weight_winograd (sums_in_registers: as winograd_backward_weight_cost).
bool winograd_backward_weight_applies(const Conv2dShape& s, bool sums_in_registers = true);
// Whether backward-weight's F(2x2, 3x3) applies (few tiles, cheaper than the GEMM and F(4x4)'s backward-weight).
bool winograd_backward_weight_f2_applies(const Conv2dShape& s, int64_t element_bytes);
// Whether backward-weight's F(3, 2) along the rows applies (fewer tiles than F(2x2)'s takes).
bool winograd_backward_weight_rows_applies(const Conv2dShape& s, int64_t element_bytes);
// The tiles conv2d_backward_weight_winograd transforms and sums per chunk at most (at element_bytes per
// value), the tiles its chunked path takes per chunk (that many, or up to a quarter more where that spreads
// a small last chunk over the others), and whether it takes its sums D (36 x K x C) to grad_w a block at a
// time through L2 (all tiles in one chunk, D over 4 MiB) rather than all of D through L3 or memory.
int64_t winograd_backward_weight_chunk(const Conv2dShape& s, int64_t element_bytes);
int64_t winograd_backward_weight_chunk_tiles(const Conv2dShape& s, int64_t element_bytes);
// Tiles per chunk for `total` tiles in chunks of `chunk`, except where the last chunk would hold under a
// quarter of that: then one chunk fewer, the tiles spread over them evenly. A chunk of a few tiles costs
// Winograd nearly a whole chunk's pass over the transformed filters (forward) or the sums (backward-weight).
inline int64_t spread_small_last_chunk(int64_t total, int64_t chunk) {
  if (chunk <= 0) return chunk;
  const int64_t chunks = (total + chunk - 1) / chunk, last = total - (chunks - 1) * chunk;
  return chunks > 1 && 4 * last < chunk ? (total + chunks - 2) / (chunks - 1) : chunk;
}
bool winograd_backward_weight_in_blocks(const Conv2dShape& s, int64_t element_bytes);
// Whether conv2d_backward_weight_winograd keeps its sums in registers (at most 8 tiles, 64 channels or more;
// winograd_weight_in_registers_impl.inc), where winograd_backward_weight_applies.
bool winograd_backward_weight_in_registers(const Conv2dShape& s);
template <typename T>
struct WinogradFilters {
  const T* w;
  int64_t k_stride, c_stride;
  bool flipped;
};
// Returns whether y is all finite (checked as it is written; else the caller recomputes it: conv2d.cpp's
// all_finite).
template <typename T>
bool conv2d_winograd(const Conv2dShape& s, const T* x, const WinogradFilters<T>& filters, const T* bias, T* y);
// grad_w of a layer winograd_backward_weight_applies to (F(4x4)); same contract as conv2d_backward_weight.
// Returns whether grad_w is all finite (else the caller recomputes it: conv2d.cpp's all_finite).
template <typename T>
bool conv2d_backward_weight_winograd(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);
// The same on F(2x2, 3x3), for a layer winograd_backward_weight_f2_applies to (winograd_f2_weight_impl.inc).
template <typename T>
bool conv2d_backward_weight_winograd_f2(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);
// The same on F(3, 2) along the rows, for a layer winograd_backward_weight_rows_applies to
// (winograd_rows_weight_impl.inc).
template <typename T>
bool conv2d_backward_weight_winograd_rows(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);
// Where F(4x4)'s input transform reads input channel c of s (whose padding it then ignores): channel c %
// channels of x (`channels` planes of H x W per image), padded by pad_top[p] rows and pad_left[p] columns
// for c's piece p = c / channels. A plain layer is one piece: x, s's channels, size and padding.
// split_kernel.cpp's 3x3 layer of 4 C channels is four pieces of x's C channels, shifted; channels is then
// a multiple of kWinogradInputChannels, the transform's block, so that no block straddles two pieces.
constexpr int64_t kWinogradInputChannels = 16;
template <typename T>
struct WinogradInput {
  const T* x;
  int64_t channels, H, W;
  int64_t pad_top[4], pad_left[4];
};
template <typename T>
WinogradInput<T> plain_winograd_input(const Conv2dShape& s, const T* x) {
  return {x, s.C, s.H, s.W, {s.win.pad_top}, {s.win.pad_left}};
}
// conv2d_winograd and conv2d_backward_weight_winograd reading x so, on F(4x4) (winograd_f2_applies(s) must
// be false for the forward). Both return whether their result is all finite.
template <typename T>
bool conv2d_winograd_f4_of(const Conv2dShape& s, const WinogradInput<T>& x, const WinogradFilters<T>& filters,
                           const T* bias, T* y);
template <typename T>
bool conv2d_backward_weight_winograd_of(const Conv2dShape& s, const T* grad_y, const WinogradInput<T>& x, T* grad_w);

// split_kernel.cpp -- 4x4 to 6x6 kernels, stride 1, undilated, one group, as a 3x3 layer of four times the
// input channels on the Winograd path: whether forward (and backward-input's transposed convolution, a
// forward) and backward-weight take it at element_bytes per value; the passes, which return false where it
// is not chosen, and forward also where its y came out not finite (checked as it is written). A result
// holding NaN or inf is recomputed on the other paths (conv2d.cpp, all_finite).
bool conv2d_split_winograd_chosen(const Conv2dShape& s, int64_t element_bytes);
bool conv2d_backward_weight_split_winograd_chosen(const Conv2dShape& s, int64_t element_bytes);
// Their cost models' share of direct convolution's cost (chosen below 1; infinity where the path does not
// apply), forward and backward-weight.
double split_winograd_share(const Conv2dShape& s, int64_t element_bytes);
double backward_weight_split_winograd_share(const Conv2dShape& s);
template <typename T>
bool conv2d_forward_split_winograd(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);
template <typename T>
bool conv2d_backward_weight_split_winograd(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w);

// subsampled_pointwise.cpp -- 1x1 kernels with a stride or padding as a pointwise layer over x subsampled
// at the positions they read: whether the forward takes that path (not where the layer sums directly); the
// forward, which returns false where the layer is not such a 1x1 one (conv2d.cpp calls it after the direct
// sums).
bool conv2d_reads_subsampled_x(const Conv2dShape& s);
template <typename T>
bool conv2d_forward_subsampled(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y);

// relu.cpp -- elementwise over `count` values.
template <typename T>
void relu_forward(int64_t count, const T* x, T* y);
template <typename T>
void relu_backward(int64_t count, const T* grad_y, const T* y, T* grad_x);

// max_pool2d.cpp -- indices (may be null in forward) are flat offsets into each H*W plane.
template <typename T>
void max_pool2d_forward(const Pool2dShape& s, const T* x, T* y, int64_t* indices);
// Returns the flat position in `indices` of the first entry that is not a cell of its own window
// (then grad_x is unspecified), or -1 when all are valid.
template <typename T>
int64_t max_pool2d_backward(const Pool2dShape& s, const T* grad_y, const int64_t* indices, T* grad_x);

}  // namespace pykernels::cpu
