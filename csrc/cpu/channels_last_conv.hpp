// The weights of channels_last_conv.cpp's GEMMs, shared by its rules and packing and by the
// instruction-set builds of channels_last_impl.inc that run them.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/gemm.hpp"

namespace pykernels::cpu {

// Each tap's weights as the B (depth x columns) of its GEMMs, in blocks of columns whose taps' B stay in
// L2 together (a 256 -> 256 layer's 9 taps take 2.4 MB): B[d][j] at w + d * d_stride + j * j_stride + t,
// over the input channels and output channels for the forward (d = c, j = k) and the other way round for
// backward-input. Block b's tap t at packed + starts[b] + t * layouts[b].size(); columns [b * width, ...).
struct TapWeights {
  int64_t width = 0;  // columns per block: whole strips
  std::vector<PackedBLayout> layouts;
  std::vector<int64_t> starts;
  int64_t size = 0;
};

}  // namespace pykernels::cpu
