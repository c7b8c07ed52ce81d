"""The Winograd paths against the float64 reference: F(4x4, 3x3) (csrc/cpu/winograd_impl.inc) and, for
layers with few tiles, F(2x2, 3x3) (csrc/cpu/winograd_f2_impl.inc).

3x3 stride-1 layers with enough channels and tiles take F(4x4) for the forward and backward-weight
passes, and for the backward-input pass as the transposed convolution (padding <= 2); layers with 64
channels or more and too few tiles for F(4x4) take F(2x2) for forward and backward-input, and, from 32
tiles (float64: 48) where F(4x4)'s backward-weight does not apply, for backward-weight
(csrc/cpu/winograd_f2_weight_impl.inc); layers with at most 8 tiles of 4x4 and 64 channels or more take F(4x4)'s
backward-weight with its sums in registers (csrc/cpu/winograd_weight_in_registers_impl.inc). Every case
here is checked to take the path it is meant to test, and runs under both algorithms ('auto' and
'gemm') so the two agree.
"""

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _pykernels_cpu
import pykernels as pk
from pykernels import reference as ref


@contextlib.contextmanager
def _gemm_algorithm():
    """Every Winograd path off ('gemm') inside the block, the algorithm before it restored after."""
    previous = _pykernels_cpu.conv_algorithm()
    _pykernels_cpu.set_conv_algorithm("gemm")
    try:
        yield
    finally:
        _pykernels_cpu.set_conv_algorithm(previous)

# (x shape, weight shape, padding): 3x3, stride 1, groups 1, C and K >= 8, >= 96 output tiles of 4x4.
CASES = {
    "same_odd": ((4, 8, 17, 23), (9, 8, 3, 3), 1),
    "valid": ((3, 11, 30, 21), (8, 11, 3, 3), 0),
    "asym_pad": ((4, 9, 19, 18), (12, 9, 3, 3), ((0, 2), (1, 0))),
    "pad2": ((3, 8, 21, 25), (8, 8, 3, 3), 2),
    "tf_same": ((2, 16, 37, 29), (10, 16, 3, 3), "same"),
    "tiles_with_ragged_edge": ((8, 12, 14, 14), (16, 12, 3, 3), 1),
    # More tiles than one chunk holds (V and M within 2 MiB: 896 tiles for C = K = 8, 192 for C = 64,
    # K = 8): several chunks, which threads take whole, each with its own buffers.
    "many_chunks_c8": ((6, 8, 60, 61), (8, 8, 3, 3), 1),
    "many_chunks_c64": ((8, 64, 32, 32), (8, 64, 3, 3), 1),
    "vgg_like_4_chunks": ((8, 64, 56, 56), (8, 64, 3, 3), 1),
    # Backward-weight's 196 tiles in chunks of 96 (float32) or 64 (float64) would leave a last chunk of 4:
    # spread over the others instead (98 + 98, 66 + 66 + 64).
    "weight_tail_spread": ((4, 128, 28, 28), (128, 128, 3, 3), 1),
    # 195 tiles: chunks of 96 + 96 + 3 that two threads take whole; one thread, splitting each phase (as
    # two do with depth_blocks_k13's 96 + 4 -> 100), spreads the last 3 over the others (98 + 97).
    "chunks_by_threads_or_spread": ((3, 48, 17, 49), (8, 48, 3, 3), 1),
    # C = 300: the packed filters span two GEMM depth blocks (256 + 44) and a last pass of 12 channels;
    # K = 13 leaves padding rows in the last register strip on every instruction set.
    "depth_blocks_k13": ((4, 300, 20, 20), (13, 300, 3, 3), 1),
    # 36 tiles: fewer than 64 per thread, so each phase is split among the threads instead of chunks.
    "few_tiles_phase_parallel": ((4, 16, 12, 12), (24, 16, 3, 3), 1),
    # K * C > 116508 (over 16 MiB of transformed filters): the filters are transformed block by block
    # as the GEMMs use them (winograd_streamed_filters), for backward-input too (350 x 340 transposed).
    # 60 tiles make two chunks of 48 and 12; K = 350 leaves a ragged last block of output channels and
    # C = 340 a last block of 20 input channels.
    "streamed_filters": ((3, 340, 17, 16), (350, 340, 3, 3), 1),
    # 9.4 MB of float32 U over 112 tiles (more than the streamed path's chunk of 96), transformed at once;
    # 18.7 MB of float64 U, streamed (the 16 MiB bound is in the layer's own precision): both paths on one
    # layer, with ragged blocks (K = 260, C = 250).
    "streamed_in_float64_only": ((7, 250, 16, 16), (260, 250, 3, 3), 1),
    # 5.5 MB of float32 U (over 4 MiB) with all 32 tiles in the streamed path's one chunk: streamed, in both
    # precisions (no filter transformed twice); K = 190 leaves a ragged last strip. Backward-weight's sums,
    # as large, go by blocks (as sums_in_blocks).
    "streamed_one_chunk": ((2, 200, 14, 14), (190, 200, 3, 3), 1),
    # Backward-weight's 36 x K x C sums over 4 MiB (K * C > 29127) and all 18 tiles in one chunk: they go
    # to grad_w block by block through L2 (backward_weight_in_blocks), with a ragged last block of output
    # channels (K = 341) and of input channels (C = 350).
    "sums_in_blocks": ((2, 350, 12, 11), (341, 350, 3, 3), 1),
}
# Padding 3 on a 3x3 kernel: forward on Winograd, backward-input falls back to GEMM (pad > 2).
FALLBACK_BACKWARD = {"pad3": ((2, 8, 30, 30), (8, 8, 3, 3), 3)}
# F(2x2, 3x3): 64 channels or more in float32 (256 in float64), too few tiles for F(4x4). The output
# channels go in strips of two vectors (float32: 32 on AVX-512, 16 on AVX2 and portable; float64: half),
# shared among the threads in whole vectors, their filters transformed 16 at a time (AVX-512), then 8 (AVX2;
# float64: 4), then one by one; input channels in blocks of 64 (filter transform, input transform).
F2_CASES = {
    # resnet_3x3_512 at batch 1: 16 tiles of 2x2 on 7x7 outputs (the bottom and right ones cut).
    "resnet_512_batch1": ((1, 512, 7, 7), (512, 512, 3, 3), 1),
    # ragged everything: 70 input channels (a block of 6 after 64), 75 output channels (partial strips; with
    # two threads, shares of 48 and 27 = 16 + 8 + 3 filters, backward-input's of 48 and 22 = 16 + 6), odd P
    # and Q from asymmetric padding
    "ragged_channels_asym_pad": ((1, 70, 9, 8), (75, 70, 3, 3), ((0, 2), (1, 0))),
    # no padding, three images: 18 tiles (register strips of 8 + 8 + 2 tile rows)
    "valid_batch3": ((3, 64, 6, 8), (64, 64, 3, 3), 0),
    # padding 2 (backward-input's transposed convolution has padding 0) on a 5x5 image
    "pad2": ((2, 96, 5, 5), (64, 96, 3, 3), 2),
    # enough channels for float64 too: ragged blocks of 4 input channels, a partial strip of output channels
    "ragged_256_float64": ((1, 260, 7, 7), (270, 260, 3, 3), ((0, 2), (1, 0))),
    # 49 tiles of 2x2 where F(4x4) would also pay (16 tiles of 4x4), taken as the cheaper (F(4x4) in float64)
    "chosen_over_f4": ((1, 128, 14, 14), (128, 128, 3, 3), 1),
}
# Backward-weight on F(2x2): 32 to 64 tiles (float64: 48 to 64) where F(4x4)'s backward-weight does not apply (more
# than 8 tiles of 4x4).
# Its sums go in blocks of 48 output channels (float64: 24) x 96 input channels, input channels in the GEMM's
# strips (48 or 16 in float32; the last one padded).
F2_WEIGHT_CASES = {
    # resnet_3x3_512 at batch 3: 48 tiles (at batch 1 and 2 its sums stay in registers)
    "resnet_512_batch3": ((3, 512, 7, 7), (512, 512, 3, 3), 1),
    # 40 tiles, 2 blocks of output channels (48 + 27), 70 input channels in one block (a padded strip), odd P and Q
    "ragged_channels_asym_pad_batch2": ((2, 70, 9, 8), (75, 70, 3, 3), ((0, 2), (1, 0))),
    # 48 tiles and over 16 MiB of F(4x4) sums in float64: F(2x2) in both precisions, ragged blocks both ways
    "ragged_350_float64": ((3, 350, 7, 7), (340, 350, 3, 3), 1),
}
# Backward-weight on F(3, 2) along the rows, float32 only: fewer tiles than F(2x2)'s backward-weight takes, GEMMs
# 40 to 128 tiles of two columns deep (from 18 where grad_w takes 1 MiB at most). Sums in blocks of 64 output x
# 96 input channels, input channels in the GEMM's strips (48 or 16; the last one padded); AVX-512 stores 16
# filters at a time, then one by one.
# Named rows_* apart from F2_CASES' layers, which the tests below look up in one merged dict.
ROWS_WEIGHT_CASES = {
    # 512 channels on 10x10 at batch 1: 10 rows x 5 column pairs, 8 blocks of rows, 512 = 10 strips + 32
    "rows_512_on_10x10": ((1, 512, 10, 10), (512, 512, 3, 3), 1),
    # 70 input channels (a padded strip after 48: 16 filters at a time, then 6), 75 output channels (64 + 11
    # rows), odd P (9) and Q (11) from asymmetric padding: 9 tiles of 4x4 (at most 8 keep their sums in registers)
    "rows_ragged_channels_asym_pad": ((1, 70, 9, 12), (75, 70, 3, 3), ((0, 2), (1, 0))),
    # three images: the tiles of each output row image by image; no padding, even Q
    "rows_valid_batch3": ((3, 64, 4, 14), (96, 64, 3, 3), 0),
}

# Backward-weight on F(4x4) with its sums in registers: at most 8 tiles of 4x4, 64 channels or more, both
# precisions. Input channels in blocks of two vectors (float32: 32 on AVX-512, 16 on AVX2, 8 portable; float64
# half), output channels in groups of 4 (AVX-512) or 2; AVX-512 float32 stores 16 filters at a time, then the
# rest through a transpose. F2_CASES' layers with at most 8 tiles take it too.
IN_REGISTERS_WEIGHT_CASES = {
    # resnet_3x3_512 at batch 1: 4 tiles, 16 blocks of 32 input channels
    "regs_resnet_512_batch1": F2_CASES["resnet_512_batch1"],
    # 6 tiles (P = 9, Q = 7 from asymmetric padding), 70 input channels (a last block of 6), 75 output channels
    # (a last group of 3 on AVX-512, of 1 on the others)
    "regs_ragged_channels_asym_pad": F2_CASES["ragged_channels_asym_pad"],
    # 8 tiles over two images, padding 2, 67 output channels (a last group of 3, or of 1)
    "regs_eight_tiles_pad2": ((2, 96, 5, 5), (67, 96, 3, 3), 2),
    # three images without padding, 2 tiles each
    "regs_valid_batch3": F2_CASES["valid_batch3"],
}


def _pads(x_shape, padding):
    (pt, pb), (pl, pr) = ref.normalize_padding(padding, x_shape[2:], (3, 3), (1, 1), (1, 1))
    return pt, pb, pl, pr


@pytest.mark.parametrize("name", list(CASES) + list(FALLBACK_BACKWARD))
def test_cases_take_the_winograd_path(name):
    x_shape, w_shape, padding = {**CASES, **FALLBACK_BACKWARD}[name]
    pads = _pads(x_shape, padding)
    assert _pykernels_cpu.conv2d_uses_winograd(x_shape, w_shape, (1, 1), pads, (1, 1), 1)
    backward_input = _pykernels_cpu.conv2d_backward_input_uses_winograd(x_shape, w_shape, (1, 1), pads, (1, 1), 1)
    assert backward_input == (name not in FALLBACK_BACKWARD)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd(x_shape, w_shape, (1, 1), pads, (1, 1), 1)


@pytest.mark.parametrize("itemsize", [4, 8], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(F2_CASES))
def test_f2_cases_take_the_f2_path(name, itemsize):
    x_shape, w_shape, padding = F2_CASES[name]
    pads = _pads(x_shape, padding)
    layer = (w_shape, (1, 1), pads, (1, 1), 1, itemsize)
    f2 = itemsize == 4 or min(w_shape[:2]) >= 256  # else, in float64, the GEMM or F(4x4)
    assert _pykernels_cpu.conv2d_winograd_is_f2(x_shape, *layer) == f2
    if f2:
        assert _pykernels_cpu.conv2d_uses_winograd(x_shape, *layer)
        assert _pykernels_cpu.conv2d_backward_input_uses_winograd(x_shape, *layer)
    # the transposed convolution (input and output channels swapped, padding 2 - pad) takes F(2x2) as well
    pt, pb, pl, pr = pads
    transposed_x = (x_shape[0], w_shape[0], x_shape[2] + pt + pb - 2, x_shape[3] + pl + pr - 2)
    transposed_pads = tuple(2 - p for p in pads)
    assert _pykernels_cpu.conv2d_winograd_is_f2(transposed_x, (w_shape[1], w_shape[0], 3, 3), (1, 1), transposed_pads,
                                                (1, 1), 1, itemsize) == f2
    # backward-weight: F(4x4) with its sums in registers (at most 8 tiles of 4x4), but chosen_over_f4's 16 tiles
    # of 4x4 take F(4x4) with its sums in memory, and ragged_256_float64's 42 outputs the GEMM (4 tiles of 4x4
    # cost more); F(2x2)'s from 32 tiles of 2x2 only over 8 tiles of 4x4
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2(x_shape, *layer)
    in_registers = _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers(x_shape, *layer)
    assert in_registers == (name not in ("chosen_over_f4", "ragged_256_float64"))
    f4 = _pykernels_cpu.conv2d_backward_weight_uses_winograd(x_shape, *layer[:-1])
    assert f4 == (name != "ragged_256_float64")


@pytest.mark.parametrize("itemsize", [4, 8], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(F2_WEIGHT_CASES))
def test_f2_weight_cases_take_the_f2_backward_weight_path(name, itemsize):
    x_shape, w_shape, padding = F2_WEIGHT_CASES[name]
    layer = (w_shape, (1, 1), _pads(x_shape, padding), (1, 1), 1)
    f2 = itemsize == 4 or min(w_shape[:2]) >= 256  # float64: 256 channels and 48 tiles
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2(x_shape, *layer, itemsize) == f2
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd(x_shape, *layer)


@pytest.mark.parametrize("name", list(ROWS_WEIGHT_CASES))
def test_rows_weight_cases_take_the_rows_backward_weight_path(name):
    x_shape, w_shape, padding = ROWS_WEIGHT_CASES[name]
    layer = (x_shape, w_shape, (1, 1), _pads(x_shape, padding), (1, 1), 1)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_rows(*layer, 4)
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_rows(*layer, 8)  # float64: the GEMM
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2(*layer, 4)
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd(*layer)


@pytest.mark.parametrize("itemsize", [4, 8], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(IN_REGISTERS_WEIGHT_CASES))
def test_in_registers_cases_take_the_in_registers_backward_weight_path(name, itemsize):
    x_shape, w_shape, padding = IN_REGISTERS_WEIGHT_CASES[name]
    layer = (x_shape, w_shape, (1, 1), _pads(x_shape, padding), (1, 1), 1)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers(*layer, itemsize)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd(*layer)
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2(*layer, itemsize)
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_rows(*layer, itemsize)


def test_in_registers_backward_weight_rule():
    def in_registers(batch, channels, size):
        layer = ((channels, channels, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
        return _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers((batch, channels, size, size), *layer)
    # 4 and 8 tiles of 4x4, from 64 channels
    assert in_registers(1, 512, 7) and in_registers(2, 512, 7) and in_registers(1, 512, 8) and in_registers(1, 64, 7)
    assert not in_registers(3, 512, 7)  # 12 tiles: F(2x2)'s backward-weight
    assert not in_registers(1, 512, 14)  # 16 tiles: F(2x2)'s
    assert not in_registers(1, 512, 5) and not in_registers(1, 512, 6)  # 4 tiles, but the GEMM has 25 or 36 positions
    assert not in_registers(1, 32, 7)  # fewer than 64 channels
    with _gemm_algorithm():
        assert not in_registers(1, 512, 7)


def test_backward_weight_spreads_a_small_last_chunk_over_the_others():
    # 49 tiles of 4x4 per image (28x28 outputs), 128 channels: chunks of at most 96 tiles in float32, 64
    # in float64 (V and E within 4 MiB); a last chunk under a quarter of that joins the others, evenly.
    def tiles_per_chunk(batch, itemsize):
        layer = ((batch, 128, 28, 28), (128, 128, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
        return _pykernels_cpu.conv2d_backward_weight_winograd_chunk(*layer, itemsize)

    assert tiles_per_chunk(1, 4) == 49  # one chunk
    assert tiles_per_chunk(2, 4) == 98  # 96 + 2 -> 98
    assert tiles_per_chunk(4, 4) == 98 and tiles_per_chunk(8, 4) == 98  # 2 x 96 + 4, 4 x 96 + 8
    assert tiles_per_chunk(4, 8) == 66  # 3 x 64 + 4 -> 66 + 66 + 64
    assert tiles_per_chunk(2, 8) == 64  # 64 + 34: over a quarter, kept
    assert tiles_per_chunk(16, 8) == 64  # 12 x 64 + 16: a quarter exactly, kept
    assert tiles_per_chunk(0, 4) == 0  # an empty batch: no tiles, no chunk
    x_shape, w_shape, padding = CASES["weight_tail_spread"]
    layer = (x_shape, w_shape, (1, 1), _pads(x_shape, padding), (1, 1), 1)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd(*layer)
    for itemsize in (4, 8):  # the chunked path: not F(2x2), not F(3, 2) along the rows
        assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2(*layer, itemsize)
        assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_rows(*layer, itemsize)
        assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers(*layer, itemsize)
    assert [_pykernels_cpu.conv2d_backward_weight_winograd_chunk(*layer, b) for b in (4, 8)] == [98, 66]


def test_rows_backward_weight_rule():
    def rows(batch, channels, size, itemsize=4):
        layer = ((channels, channels, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, itemsize)
        return _pykernels_cpu.conv2d_backward_weight_uses_winograd_rows((batch, channels, size, size), *layer)
    assert rows(1, 512, 10) and rows(1, 512, 9) and rows(1, 64, 6)
    # at most 8 tiles of 4x4 (7x7 at batch 1 and 2): F(4x4)'s backward-weight with its sums in registers
    assert not rows(1, 128, 7) and not rows(1, 512, 7) and not rows(1, 256, 7) and not rows(2, 512, 7)
    # 18 tiles deep with grad_w over 1 MiB (the GEMM path); 15 deep
    assert not rows(1, 512, 6) and not rows(1, 64, 5)
    assert not rows(3, 512, 7)  # F(2x2)'s backward-weight, from 32 tiles
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2((3, 512, 7, 7), (512, 512, 3, 3), (1, 1),
                                                                  (1, 1, 1, 1), (1, 1), 1, 4)
    assert not rows(1, 256, 14)  # F(4x4)'s backward-weight
    assert not rows(1, 32, 7) and not rows(1, 512, 7, itemsize=8)
    with _gemm_algorithm():
        assert not rows(1, 512, 10)


def test_f2_backward_weight_rule():
    layer_512 = ((512, 512, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    # batch 1 and 2: at most 8 tiles of 4x4, F(4x4)'s sums in registers; batch 5: 80 tiles of 2x2
    for batch, f32, f64 in ((1, False, False), (2, False, False), (3, True, True), (4, True, True), (5, False, False)):
        assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2((batch, 512, 7, 7), *layer_512, 4) == f32
        assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2((batch, 512, 7, 7), *layer_512, 8) == f64
    # not where F(4x4)'s backward-weight applies (256 channels on 14x14 at batch 1), nor under 'gemm'
    layer_256 = ((256, 256, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd((1, 256, 14, 14), *layer_256)
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2((1, 256, 14, 14), *layer_256, 4)
    with _gemm_algorithm():
        assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2((3, 512, 7, 7), *layer_512, 4)


def test_small_or_strided_layers_do_not():
    pads = (1, 1, 1, 1)
    assert not _pykernels_cpu.conv2d_uses_winograd((8, 4, 28, 28), (8, 4, 3, 3), (1, 1), pads, (1, 1), 1)  # C < 8
    assert not _pykernels_cpu.conv2d_uses_winograd((8, 8, 28, 28), (8, 8, 3, 3), (2, 2), pads, (1, 1), 1)  # stride
    assert not _pykernels_cpu.conv2d_uses_winograd((8, 8, 28, 28), (8, 8, 3, 3), (1, 1), pads, (2, 2), 1)  # dilated
    assert not _pykernels_cpu.conv2d_uses_winograd((1, 16, 8, 8), (16, 16, 3, 3), (1, 1), pads, (1, 1), 1)  # 4 tiles
    assert not _pykernels_cpu.conv2d_uses_winograd((8, 16, 28, 28), (16, 8, 3, 3), (1, 1), pads, (1, 1), 2)  # groups
    # Fewer than 64 channels: no F(2x2) either.
    assert not _pykernels_cpu.conv2d_uses_winograd((1, 32, 8, 8), (32, 32, 3, 3), (1, 1), pads, (1, 1), 1)
    # resnet_3x3_512: at batch 8 its 32 tiles pay for transforming 512 x 512 filters block by block, and
    # backward-weight for its 36 x 512 x 512 sums, also made block by block; at batch 1 (4 tiles of 4x4)
    # forward and backward-input take F(2x2) on 16 tiles of 2x2, backward-weight F(4x4) with its sums in
    # registers.
    layer_512 = ((512, 512, 3, 3), (1, 1), pads, (1, 1), 1)
    assert _pykernels_cpu.conv2d_uses_winograd((8, 512, 7, 7), *layer_512)
    assert not _pykernels_cpu.conv2d_winograd_is_f2((8, 512, 7, 7), *layer_512)
    assert _pykernels_cpu.conv2d_backward_input_uses_winograd((8, 512, 7, 7), *layer_512)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd((8, 512, 7, 7), *layer_512)
    assert _pykernels_cpu.conv2d_uses_winograd((1, 512, 7, 7), *layer_512)
    assert _pykernels_cpu.conv2d_winograd_is_f2((1, 512, 7, 7), *layer_512)
    assert _pykernels_cpu.conv2d_backward_input_uses_winograd((1, 512, 7, 7), *layer_512)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers((1, 512, 7, 7), *layer_512)
    # At batch 2 (8 tiles) in registers too; at batch 4 (16) F(4x4)'s sums would go through memory (F(2x2)'s
    # backward-weight instead).
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers((2, 512, 7, 7), *layer_512)
    assert not _pykernels_cpu.conv2d_backward_weight_uses_winograd((4, 512, 7, 7), *layer_512)
    # resnet_3x3_256 at batch 1: 49 tiles of 2x2 (forward and backward-input take F(2x2) in 0.51 ms against
    # F(4x4)'s 0.64 and the GEMM's 0.75-0.87); backward-weight F(4x4), its sums by blocks through L2.
    layer_256 = ((256, 256, 3, 3), (1, 1), pads, (1, 1), 1)
    assert _pykernels_cpu.conv2d_uses_winograd((1, 256, 14, 14), *layer_256)
    assert _pykernels_cpu.conv2d_winograd_is_f2((1, 256, 14, 14), *layer_256)
    assert _pykernels_cpu.conv2d_backward_input_uses_winograd((1, 256, 14, 14), *layer_256)
    # at batch 2 (98 tiles of 2x2) F(4x4)
    assert _pykernels_cpu.conv2d_uses_winograd((2, 256, 14, 14), *layer_256)
    assert not _pykernels_cpu.conv2d_winograd_is_f2((2, 256, 14, 14), *layer_256)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd((1, 256, 14, 14), *layer_256)
    # 32 tiles of a 64-channel layer pay for backward-weight's transforms (0.16 ms against 0.20).
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd((2, 64, 14, 14), (64, 64, 3, 3), (1, 1), pads,
                                                               (1, 1), 1)


def _relative_error(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


# float32 Winograd rounds a few more times than direct convolution; 3e-5 of max |ref| is still 10x
# tighter than the suite's general float32 bound (1e-4).
TOLERANCE = {np.float32: 3e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES) + list(FALLBACK_BACKWARD) + list(F2_CASES) + list(F2_WEIGHT_CASES) +
                         list(ROWS_WEIGHT_CASES) + ["regs_eight_tiles_pad2"])  # (the others are F2_CASES')
def test_forward_and_backward_input_match_reference(algorithm, name, dtype):
    x_shape, w_shape, padding = {**CASES, **FALLBACK_BACKWARD, **F2_CASES, **F2_WEIGHT_CASES,
                                 **ROWS_WEIGHT_CASES, **IN_REGISTERS_WEIGHT_CASES}[name]
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    want = ref.conv2d(x, w, b, padding=padding)
    g = rng.standard_normal(want.shape)
    want_gx, want_gw, _ = ref.conv2d_backward(g, x, w, padding=padding)
    y = pk.conv2d(x.astype(dtype), w.astype(dtype), b.astype(dtype), padding=padding)
    gx, gw, _ = pk.conv2d_backward(g.astype(dtype), x.astype(dtype), w.astype(dtype), padding=padding,
                                   need_bias=False)
    assert y.dtype == dtype and gx.dtype == dtype
    assert _relative_error(y, want) < TOLERANCE[dtype]
    assert _relative_error(gx, want_gx) < TOLERANCE[dtype]
    assert _relative_error(gw, want_gw) < TOLERANCE[dtype]


def test_winograd_is_deterministic_and_thread_count_independent():
    x_shape, w_shape, padding = CASES["asym_pad"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    first = pk.conv2d(x, w, padding=padding)
    assert np.array_equal(first, pk.conv2d(x, w, padding=padding))
    g = rng.standard_normal(first.shape).astype(np.float32)
    gx1 = pk.conv2d_backward(g, x, w, padding=padding, need_weight=False, need_bias=False)[0]
    gx2 = pk.conv2d_backward(g, x, w, padding=padding, need_weight=False, need_bias=False)[0]
    assert np.array_equal(gx1, gx2)


def _on_one_thread(tmp_path, x, w, g, padding):
    """conv2d's output, grad_x and grad_weight for (x, w, g), computed in a process with one OpenMP thread."""
    np.savez(tmp_path / "inputs.npz", x=x, g=g, w=w)
    script = textwrap.dedent(f"""
        import sys, numpy as np, _pykernels_cpu, pykernels as pk
        assert _pykernels_cpu.openmp_threads() == 1
        d = np.load(sys.argv[1])
        y = pk.conv2d(d["x"], d["w"], padding={padding!r})
        gx, gw, _ = pk.conv2d_backward(d["g"], d["x"], d["w"], padding={padding!r}, need_bias=False)
        np.savez(sys.argv[2], y=y, gx=gx, gw=gw)
    """)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.npz"), str(tmp_path / "single.npz")],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return np.load(tmp_path / "single.npz")


@pytest.mark.parametrize("name", ["chunks_by_threads_or_spread", "depth_blocks_k13"])
def test_forward_and_backward_input_do_not_depend_on_thread_count(tmp_path, name):
    # Two threads take chunks_by_threads_or_spread's 195 tiles as whole chunks of 96 + 96 + 3; one thread
    # spreads the last 3 over the others (98 + 97); depth_blocks_k13's 100 go as one chunk either way.
    # Chunks only group tiles: each output's sum runs the same, so the bits match.
    x_shape, w_shape, padding = CASES[name]
    rng = np.random.default_rng(9)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    g = rng.standard_normal(pk.conv2d(x, w, padding=padding).shape).astype(np.float32)
    single = _on_one_thread(tmp_path, x, w, g, padding)
    assert np.array_equal(pk.conv2d(x, w, padding=padding), single["y"])
    gx = pk.conv2d_backward(g, x, w, padding=padding, need_weight=False, need_bias=False)[0]
    assert np.array_equal(gx, single["gx"])


@pytest.mark.parametrize("name", ["sums_in_blocks", "weight_tail_spread", "ragged_channels_asym_pad_batch2",
                                  "rows_ragged_channels_asym_pad", "regs_resnet_512_batch1",
                                  "regs_ragged_channels_asym_pad"])
def test_backward_weight_by_blocks_does_not_depend_on_thread_count(tmp_path, name):
    # The blocks of D (F(4x4) through L2, F(2x2), F(3, 2) along the rows) are fixed by the layer, each summed
    # by one thread; F(4x4)'s sums in registers are shared out by a thread count's items, each gradient
    # summed whole by one: the same bits on one thread.
    x_shape, w_shape, padding = {**CASES, **F2_WEIGHT_CASES, **ROWS_WEIGHT_CASES, **IN_REGISTERS_WEIGHT_CASES}[name]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    g = rng.standard_normal(pk.conv2d(x, w, padding=padding).shape).astype(np.float32)
    single = _on_one_thread(tmp_path, x, w, g, padding)
    gw = pk.conv2d_backward(g, x, w, padding=padding, need_input=False, need_bias=False)[1]
    assert np.array_equal(gw, single["gw"])


# Forward and backward-input run Winograd and check its output: a NaN or inf in what a tile reads leaves
# one in the tile (the transforms would smear it over all 16 outputs, and inf - inf makes NaN), and then
# the GEMM path recomputes the pass, so exactly the outputs whose windows see the value change. Cases:
# a plain layer, one whose last tiles are cut by the image edge, and one with streamed filters (K * C >
# 116508). Positions: inside, and the last element (in a cut tile).
NON_FINITE_CASES = {
    "same_odd": CASES["same_odd"],
    "tiles_with_ragged_edge": CASES["tiles_with_ragged_edge"],
    "streamed_filters_small": ((2, 342, 12, 12), (342, 342, 3, 3), 1),
    "f2_ragged": F2_CASES["ragged_256_float64"],  # F(2x2) in float64 too
}


# (case, value): -inf only on the small cases, the streamed one being slow to check.
NON_FINITE_VALUES = [(name, bad) for name in NON_FINITE_CASES for bad in (np.nan, np.inf, -np.inf)
                     if not (name.startswith("streamed") and bad == -np.inf)]


@pytest.mark.parametrize("where", ["data_inside", "data_last", "weight_inside", "weight_last"])
@pytest.mark.parametrize("pass_", ["forward", "backward_input"])
@pytest.mark.parametrize("name, bad", NON_FINITE_VALUES)
def test_non_finite_values_reach_exactly_the_outputs_direct_convolution_reaches(name, bad, pass_, where):
    x_shape, w_shape, padding = NON_FINITE_CASES[name]
    pads = _pads(x_shape, padding)
    assert _pykernels_cpu.conv2d_uses_winograd(x_shape, w_shape, (1, 1), pads, (1, 1), 1, itemsize=8)
    assert _pykernels_cpu.conv2d_backward_input_uses_winograd(x_shape, w_shape, (1, 1), pads, (1, 1), 1, itemsize=8)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    g = rng.standard_normal(ref.conv2d(x, w, padding=padding).shape)
    data = x if pass_ == "forward" else g  # what the pass transforms besides the weights
    target = data if where.startswith("data") else w
    inside = (0, 0, 5, 2) if where.startswith("data") else (2, 1, 0, 1)
    target[inside if where.endswith("inside") else (-1, -1, -1, -1)] = bad
    with np.errstate(invalid="ignore", over="ignore"):
        if pass_ == "forward":
            got, want = pk.conv2d(x, w, padding=padding), ref.conv2d(x, w, padding=padding)
        else:
            got = pk.conv2d_backward(g, x, w, padding=padding, need_weight=False, need_bias=False)[0]
            want = ref.conv2d_backward(g, x, w, padding=padding)[0]
    assert np.isfinite(want).any() and not np.isfinite(want).all()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert _relative_error(np.where(finite, got, 0), np.where(finite, want, 0)) < 1e-12


@pytest.mark.parametrize("name", ["depth_blocks_k13", "tiles_with_ragged_edge", "few_tiles_phase_parallel",
                                  "streamed_filters", "sums_in_blocks", "ragged_channels_asym_pad", "valid_batch3",
                                  "ragged_256_float64", "ragged_channels_asym_pad_batch2", "ragged_350_float64",
                                  "rows_valid_batch3", "regs_eight_tiles_pad2"])
def test_every_instruction_set_packs_the_filters_its_own_way(isa, name):
    # The transformed filters are written in the packed layout of the active GEMM build (F(4x4): register
    # strips of 8 rows on AVX-512, 6 on AVX2 and the portable build; F(2x2): strips of 32 output channels
    # on AVX-512 (backward-weight: 48 input channels), 16 on the others, and tiles read 8 or 6 at a time).
    x_shape, w_shape, padding = {**CASES, **F2_CASES, **F2_WEIGHT_CASES, **ROWS_WEIGHT_CASES,
                                 **IN_REGISTERS_WEIGHT_CASES}[name]
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    want = ref.conv2d(x, w, padding=padding)
    g = rng.standard_normal(want.shape)
    want_gx, want_gw, _ = ref.conv2d_backward(g, x, w, padding=padding)
    for dtype in (np.float32, np.float64):
        y = pk.conv2d(x.astype(dtype), w.astype(dtype), padding=padding)
        gx, gw, _ = pk.conv2d_backward(g.astype(dtype), x.astype(dtype), w.astype(dtype), padding=padding,
                                       need_bias=False)
        assert _relative_error(y, want) < TOLERANCE[dtype], (isa, dtype)
        assert _relative_error(gx, want_gx) < TOLERANCE[dtype], (isa, dtype)
        assert _relative_error(gw, want_gw) < TOLERANCE[dtype], (isa, dtype)


@pytest.mark.parametrize("name", ["same_odd", "ragged_channels_asym_pad_batch2", "rows_valid_batch3",
                                  "regs_eight_tiles_pad2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_grad_out_reaches_only_the_weights_direct_summation_reaches(bad, name):
    # Backward-weight sums grad_out against x over every tile; a non-finite grad_out leaves non-finite
    # values in Winograd's gradient (F(4x4), its sums in memory or in registers, F(2x2), F(3, 2) along the
    # rows), so the pass is recomputed on the GEMM path and only the weights whose sums include that value
    # become non-finite.
    x_shape, w_shape, padding = {**CASES, **F2_WEIGHT_CASES, **ROWS_WEIGHT_CASES, **IN_REGISTERS_WEIGHT_CASES}[name]
    dtype = np.float64 if name == "same_odd" else np.float32  # F(2x2) and F(3, 2) take theirs in float32 only
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    g = rng.standard_normal(ref.conv2d(x, w, padding=padding).shape)
    g[1, 3, 0, 0] = bad  # a corner: only some taps of output channel 3 see it
    gw = pk.conv2d_backward(g.astype(dtype), x.astype(dtype), w.astype(dtype), padding=padding, need_input=False,
                            need_bias=False)[1]
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref.conv2d_backward(g, x, w, padding=padding)[1]
    assert np.array_equal(np.isfinite(gw), np.isfinite(want))
    assert not np.isfinite(gw[3]).all() and np.isfinite(np.delete(gw, 3, axis=0)).all()


# Backward-weight's four ways to its sums D on F(4x4) (winograd_impl.inc), each checking grad_w as it
# writes it: by parts of the tiles (K * C <= 64 * 64, 96 tiles or more), whole (here 1.5 MB of float64
# sums), by blocks through L2 (over 4 MiB of sums, every tile in one chunk) and in registers (at most 8
# tiles); and F(2x2)'s and F(3, 2)'s.
WEIGHT_SUM_CASES = {
    "by_tile_parts": CASES["tiles_with_ragged_edge"],
    "whole_sums": ((2, 72, 12, 13), (73, 72, 3, 3), 1),
    "sums_in_blocks": CASES["sums_in_blocks"],
    "f2": F2_WEIGHT_CASES["ragged_channels_asym_pad_batch2"],
    "rows": ROWS_WEIGHT_CASES["rows_ragged_channels_asym_pad"],
    "in_registers": IN_REGISTERS_WEIGHT_CASES["regs_ragged_channels_asym_pad"],
}
# (case, value, position): the position inside the image, in a corner and in the last (cut) tile; on the
# slow case to check (sums_in_blocks) only inside.
NON_FINITE_X = [(name, bad, at) for name in WEIGHT_SUM_CASES for bad in (np.nan, np.inf, -np.inf)
                for at in ((0, 0, 5, 2), (0, 0, 0, 0), (-1, -1, -1, -1))
                if name != "sums_in_blocks" or (at == (0, 0, 5, 2) and bad != -np.inf)]


@pytest.mark.parametrize("name, bad, at", NON_FINITE_X)
def test_non_finite_x_reaches_exactly_the_weight_gradients_direct_summation_reaches(name, bad, at):
    # The same for a NaN or inf in x, on each of backward-weight's ways to its sums.
    x_shape, w_shape, padding = WEIGHT_SUM_CASES[name]
    layer = (x_shape, w_shape, (1, 1), _pads(x_shape, padding), (1, 1), 1)
    dtype = np.float32 if name in ("f2", "rows") else np.float64  # F(2x2), F(3, 2): 70 channels in float32 only
    if name == "f2":
        assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_f2(*layer, 4)
    elif name == "rows":
        assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_rows(*layer, 4)
    elif name == "in_registers":
        assert _pykernels_cpu.conv2d_backward_weight_uses_winograd_in_registers(*layer, 8)
    else:
        assert _pykernels_cpu.conv2d_backward_weight_uses_winograd(*layer)
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    g = rng.standard_normal(ref.conv2d(x, w, padding=padding).shape)
    x[at] = bad
    gw = pk.conv2d_backward(g.astype(dtype), x.astype(dtype), w.astype(dtype), padding=padding, need_input=False,
                            need_bias=False)[1]
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref.conv2d_backward(g, x, w, padding=padding)[1]
    assert not np.isfinite(want).all()
    assert np.array_equal(np.isnan(gw), np.isnan(want))
    assert np.array_equal(np.isinf(gw), np.isinf(want))
    finite = np.isfinite(want)
    assert _relative_error(np.where(finite, gw, 0), np.where(finite, want, 0)) < TOLERANCE[dtype]
