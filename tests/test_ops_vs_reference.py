"""Every op and every gradient of pykernels against pykernels.reference (the float64 NumPy truth).

Random configurations come from Hypothesis (derandomized, so every run sees the same examples) and
from a list of named cases for the shapes that matter: the design.md benchmark shapes at small batch,
GEMM sizes that cross register/cache block edges, odd channel and width counts (SIMD tails), 'same'
padding with an odd total and stride > 1, asymmetric padding, dilation, groups and depthwise.

Tolerances: float64 results agree with the reference to ~1e-10 of max|ref|, float32 to ~1e-4 of
max|ref|, both widened by sqrt(number of summed terms / 1000) for long sums. Max-pool forward values
and indices must match exactly (a max picks an element, it does not round).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import _pykernels_cpu
import pykernels as pk
from pykernels import reference as ref

DTYPES = [np.float32, np.float64]

SETTINGS = settings(
    deadline=None,
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


# ---- helpers -------------------------------------------------------------------------------------------

def rel_tol(dtype, terms: int) -> float:
    base = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    return base * max(1.0, math.sqrt(terms / 1000.0))


def assert_close(got, want, dtype, terms: int, what: str = "") -> None:
    """got (dtype) agrees with the float64 reference to rel_tol(dtype, terms) * max|want|."""
    assert isinstance(got, np.ndarray), f"{what}: expected a NumPy array, got {type(got)}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if want.size == 0:
        return
    scale = float(np.abs(want).max()) or 1.0
    tol = rel_tol(dtype, terms) * scale
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} (max|ref| {scale:.3g}, {terms} terms)"


def conv_kwargs(cfg) -> dict:
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])


def conv_out_hw(cfg):
    """(P, Q) computed independently of pykernels, via the reference's padding rule."""
    _, _, h, w = cfg["x_shape"]
    _, _, r, s = cfg["w_shape"]
    sh, sw = ref._pair(cfg["stride"])
    dh, dw = ref._pair(cfg["dilation"])
    (pt, pb), (pl, pr) = ref.normalize_padding(cfg["padding"], (h, w), (r, s), (sh, sw), (dh, dw))
    p = (h + pt + pb - dh * (r - 1) - 1) // sh + 1
    q = (w + pl + pr - dw * (s - 1) - 1) // sw + 1
    return p, q


def make_conv_inputs(cfg, dtype, use_bias: bool, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["x_shape"]).astype(dtype)
    w = rng.standard_normal(cfg["w_shape"]).astype(dtype)
    b = rng.standard_normal(cfg["w_shape"][0]).astype(dtype) if use_bias else None
    return x, w, b


def check_conv_forward(cfg, dtype, use_bias: bool, seed: int) -> None:
    x, w, b = make_conv_inputs(cfg, dtype, use_bias, seed)
    y = pk.conv2d(x, w, b, **conv_kwargs(cfg))
    want = ref.conv2d(x, w, b, **conv_kwargs(cfg))
    _, cg, r, s = cfg["w_shape"]
    assert_close(y, want, dtype, cg * r * s + 1, f"conv2d {cfg}")


def check_conv_backward(cfg, dtype, seed: int) -> None:
    x, w, _ = make_conv_inputs(cfg, dtype, False, seed)
    n, k = cfg["x_shape"][0], cfg["w_shape"][0]
    p, q = conv_out_hw(cfg)
    go = np.random.default_rng(seed + 1).standard_normal((n, k, p, q)).astype(dtype)
    gx, gw, gb = pk.conv2d_backward(go, x, w, **conv_kwargs(cfg))
    want_gx, want_gw, want_gb = ref.conv2d_backward(go, x, w, **conv_kwargs(cfg))
    _, cg, r, s = cfg["w_shape"]
    kg = k // cfg["groups"]
    assert_close(gx, want_gx, dtype, kg * r * s, f"grad_x {cfg}")
    assert_close(gw, want_gw, dtype, n * p * q, f"grad_weight {cfg}")
    assert_close(gb, want_gb, dtype, n * p * q, f"grad_bias {cfg}")


def conv_case(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1):
    return dict(x_shape=tuple(x_shape), w_shape=tuple(w_shape), stride=stride, padding=padding, dilation=dilation,
                groups=groups)


# ---- conv2d: random configurations ---------------------------------------------------------------------

@st.composite
def conv_configs(draw, max_extra=9):
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, cg, kg = 1, draw(st.integers(1, 5)), draw(st.integers(1, 6))
    elif kind == "grouped":
        groups, cg, kg = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:  # depthwise, with channel multiplier 1 or 2
        groups, cg, kg = draw(st.integers(1, 6)), 1, draw(st.integers(1, 2))
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad_kind = draw(st.sampled_from(["int", "pair", "asym", "same", "valid"]))
    if pad_kind == "int":
        p = draw(st.integers(0, 3))
        padding, pads = p, (p, p, p, p)
    elif pad_kind == "pair":
        ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        padding, pads = (ph, pw), (ph, ph, pw, pw)
    elif pad_kind == "asym":
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    else:
        padding, pads = pad_kind, (0, 0, 0, 0)
    # Sizes chosen so the padded input holds at least one window ('same' always does).
    h_min = 1 if pad_kind == "same" else max(1, dilation[0] * (r - 1) + 1 - pads[0] - pads[1])
    w_min = 1 if pad_kind == "same" else max(1, dilation[1] * (s - 1) + 1 - pads[2] - pads[3])
    h = draw(st.integers(h_min, h_min + max_extra))
    w = draw(st.integers(w_min, w_min + max_extra))
    # Stride and dilation also as plain ints sometimes.
    if stride[0] == stride[1] and draw(st.booleans()):
        stride = stride[0]
    if dilation[0] == dilation[1] and draw(st.booleans()):
        dilation = dilation[0]
    return conv_case((n, cg * groups, h, w), (kg * groups, cg, r, s), stride, padding, dilation, groups)


@SETTINGS
@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), use_bias=st.booleans(), seed=st.integers(0, 2**31))
def test_conv2d_forward_random(cfg, dtype, use_bias, seed):
    check_conv_forward(cfg, dtype, use_bias, seed)


@SETTINGS
@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_conv2d_backward_random(cfg, dtype, seed):
    check_conv_backward(cfg, dtype, seed)


@settings(SETTINGS, max_examples=25)
@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), use_bias=st.booleans(), seed=st.integers(0, 2**31))
def test_conv2d_forward_and_backward_random_portable_isa(portable_isa, cfg, dtype, use_bias, seed):
    assert _pykernels_cpu.active_isa() == "portable"
    check_conv_forward(cfg, dtype, use_bias, seed)
    check_conv_backward(cfg, dtype, seed)


# ---- conv2d: named cases -------------------------------------------------------------------------------

CONV_CASES = {
    # design.md benchmark shapes, small batch
    "lenet_5x5": conv_case((3, 1, 28, 28), (6, 1, 5, 5)),
    "resnet_stem_n2": conv_case((2, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3),
    "resnet_stem_same_n1": conv_case((1, 3, 224, 224), (64, 3, 7, 7), stride=2, padding="same"),
    "vgg_3x3_64_small": conv_case((1, 64, 14, 14), (64, 64, 3, 3), padding=1),
    "resnet_1x1_256_64_small": conv_case((2, 256, 7, 7), (64, 256, 1, 1)),
    # GEMM block edges: K=70, C=37 (CRS = 333), both the per-image path (N >= threads) and the
    # parallel-GEMM path (N = 1)
    "gemm_k70_c37_n1": conv_case((1, 37, 13, 13), (70, 37, 3, 3), padding=1),
    "gemm_k70_c37_n3": conv_case((3, 37, 13, 13), (70, 37, 3, 3), padding=1),
    "gemm_k70_c37_n1_wide": conv_case((1, 37, 9, 150), (70, 37, 3, 3), padding=(0, 1)),
    "gemm_k70_c37_strided": conv_case((2, 37, 15, 17), (70, 37, 3, 3), stride=2, padding=((1, 0), (0, 2))),
    # backward-weight summed in two batch halves (N * P * Q >= 8 * C*R*S), here of 1 and 2 images
    "batch_halves_odd_n": conv_case((3, 4, 20, 22), (10, 4, 3, 3), stride=2, padding=1),
    # 1x1: the im2col-free path (stride 1, no padding) and the paths that need im2col
    "pointwise_odd": conv_case((2, 37, 9, 11), (70, 37, 1, 1)),
    "pointwise_n1_big": conv_case((1, 19, 23, 29), (33, 19, 1, 1)),
    "one_by_one_stride2": conv_case((2, 5, 9, 11), (7, 5, 1, 1), stride=2),
    "one_by_one_padded": conv_case((2, 5, 6, 7), (3, 5, 1, 1), padding=1),
    # 9000 weights for 2 positions: backward-input as one GEMM over the batch (conv2d.cpp: at least 4096
    # weights per position for a pointwise layer), col added back into grad_x
    "pointwise_batch_gemm": conv_case((3, 100, 1, 2), (90, 100, 1, 1)),
    # backward-weight summed directly for its few taps per output channel (9 and 18), not its weights
    # backward-input's col2im at stride 2 across (each kernel row's taps summed into even and odd half rows):
    # an odd width, 4 taps 2 apart, padding 3 (taps starting left of the image)
    "col2im_pairs_dilated": conv_case((2, 5, 9, 13), (7, 5, 3, 4), stride=(1, 2), padding=(1, 3), dilation=(1, 2)),
    "few_taps_c1": conv_case((3, 1, 13, 15), (30, 1, 3, 3), padding=1),
    "few_taps_c2_dilated": conv_case((2, 2, 11, 9), (28, 2, 3, 3), padding=2, dilation=(2, 1)),
    # ... and 27 (CIFAR's first layer), by parts of the batch: 5 images in 4 parts (1, 1, 1, 2), 70 output
    # channels (17 register blocks of 4, then one of 2), the taps in blocks of 6 and 5; 16 channels at batch
    # 2 (2 parts); 25 taps of a 5x5 at batch 1 (one part, the channels split among the threads); 12
    # channels on rows wide enough that an image's grad_y of all of them would overflow L2 (tasks of 4)
    "few_taps_27_k70": conv_case((5, 3, 11, 13), (70, 3, 3, 3), padding=1),
    "few_taps_27_k16_n2": conv_case((2, 3, 9, 8), (16, 3, 3, 3), padding=1),
    "few_taps_5x5_n1": conv_case((1, 1, 12, 10), (20, 1, 5, 5), padding=2),
    "few_taps_wide_planes": conv_case((2, 3, 130, 128), (12, 3, 3, 3), padding=1),
    # 27 taps at stride 2 (MobileNet's first layer in small; odd sizes: the phases' last columns differ)
    "few_taps_strided": conv_case((3, 3, 29, 27), (24, 3, 3, 3), stride=2, padding=1),
    # stride-2 3x3 on output rows shorter than 32: forward and backward-weight on wide rows of the copy split
    # into row and column phases; at batch 1 (no wide rows on short ones) the forward's im2col columns
    # gathered from that copy, each output row a run copied whole (15 columns) or value by value (6: runs
    # too short); with 300 output channels, where packing pays, both passes gathered those two ways
    "wide_rows_stride2": conv_case((3, 12, 32, 30), (20, 12, 3, 3), stride=2, padding=1),
    "gathered_runs_n1": conv_case((1, 12, 32, 30), (20, 12, 3, 3), stride=2, padding=1),
    "gathered_short_rows": conv_case((1, 12, 11, 11), (20, 12, 3, 3), stride=2, padding=1),
    "gathered_runs_k300": conv_case((2, 8, 17, 17), (300, 8, 3, 3), stride=2, padding=1),
    "gathered_short_rows_k300": conv_case((2, 8, 11, 11), (300, 8, 3, 3), stride=2, padding=1),
    # 1x1 strided or padded with more weights than the direct sums take: a pointwise layer over x subsampled
    "subsampled_stride2": conv_case((3, 20, 13, 11), (24, 20, 1, 1), stride=2),
    "subsampled_asym_n1": conv_case((1, 17, 9, 10), (19, 17, 1, 1), stride=(2, 3), padding=((1, 0), (2, 1))),
    "subsampled_padding_rows": conv_case((2, 16, 5, 4), (20, 16, 1, 1), stride=3, padding=4),
    "subsampled_grouped": conv_case((2, 20, 9, 9), (80, 10, 1, 1), stride=2, groups=2),
    # 'same' with an odd total padding and stride > 1 (extra row/column at the bottom/right)
    "same_odd_total_stride3": conv_case((1, 2, 10, 9), (3, 2, 4, 3), stride=(3, 2), padding="same"),
    "same_k2_s2_odd_input": conv_case((2, 3, 7, 7), (4, 3, 2, 2), stride=2, padding="same"),
    "same_dilated": conv_case((1, 2, 9, 8), (2, 2, 3, 2), stride=(1, 2), dilation=(3, 2), padding="same"),
    "valid": conv_case((2, 3, 8, 9), (4, 3, 3, 2), stride=(2, 3), padding="valid"),
    # asymmetric padding, non-square kernels, dilation up to 3, stride up to 3
    "asym_padding": conv_case((2, 3, 7, 8), (5, 3, 3, 4), padding=((0, 2), (3, 1))),
    "asym_padding_strided_dilated": conv_case((1, 4, 11, 10), (3, 4, 2, 3), stride=(3, 2), dilation=(2, 3),
                                              padding=((2, 0), (1, 3))),
    "non_square_1x5": conv_case((2, 3, 6, 12), (4, 3, 1, 5), padding=(0, 2)),
    "non_square_5x1": conv_case((2, 3, 12, 6), (4, 3, 5, 1), stride=(2, 1)),
    "dilation3": conv_case((1, 2, 13, 13), (3, 2, 3, 3), dilation=3, padding=3),
    "padding_exceeds_kernel": conv_case((1, 2, 4, 4), (3, 2, 2, 2), padding=3),
    "kernel_equals_input": conv_case((2, 3, 5, 5), (4, 3, 5, 5)),
    # batch 1, one channel, odd widths not a multiple of 8/16
    "one_channel_batch1": conv_case((1, 1, 5, 7), (1, 1, 3, 3), padding=1),
    "width_67": conv_case((1, 3, 5, 67), (17, 3, 3, 3), padding=1),
    "width_1": conv_case((2, 3, 9, 1), (4, 3, 3, 1), padding=(1, 0)),
    # rows of many whole packed strips (up to 48 columns): the packer's constant-width copies, stride 2
    # (even lanes of vector pairs, which read one value past the strip: cut off at each row's end) and 1,
    # with strips that start in one output row or image and end in the next
    "wide_strided_strips": conv_case((2, 3, 9, 203), (8, 3, 3, 3), stride=2, padding=((1, 1), (2, 3))),
    "wide_strided_strips_unpadded": conv_case((2, 2, 7, 196), (5, 2, 3, 4), stride=2),
    "wide_stride1_strips": conv_case((2, 5, 4, 150), (9, 5, 3, 3), padding=(1, 0)),
    # forward from the padded, stride-phase-split copy of x (conv_rows.cpp): the per-image path (P*Q >=
    # 1024), the batch-1 path (threads share the copy and split the rows), stride 3 with dilation and
    # asymmetric padding, groups (more output channels per group than the direct sums take), and a depth
    # past one GEMM block (C/g*R*S = 279 > 256) with 37 output channels (a part-empty register strip), on 32
    # columns (whole vectors: deep strided layers on rows that leave lanes empty go wide, as the next case)
    "rows_per_image_deep": conv_case((3, 31, 66, 63), (37, 31, 3, 3), stride=2, padding=1),
    # 288 taps, stride 2, 38 columns (a fifth of the per-row plan's lanes empty): wide rows of the copy's phases
    "wide_rows_strided_deep": conv_case((2, 32, 30, 75), (24, 32, 3, 3), stride=2, padding=1),
    # 3x3 stride 2 onto 14 x 13 with 200 output channels: packed columns would be gathered a 13-value run at a
    # time, so wide rows (conv_rows.cpp, gathers_short_strided_rows); 195 columns, a last strip of 3
    "wide_rows_short_strided": conv_case((2, 6, 27, 25), (200, 6, 3, 3), stride=2, padding=1),
    # backward-input on the batch GEMM with col in blocks of whole channels, each added into grad_x right after
    # (conv2d.cpp, backward_input_as_batch_gemm): 50 channels in blocks of 24 (float32; float64 8) and a
    # ragged last one; 5x5 taps, 48 channels in two blocks of 24 (float32)
    "batch_gemm_col_blocks": conv_case((2, 50, 31, 32), (40, 50, 3, 3), stride=2, padding=1),
    "batch_gemm_col_blocks_5x5": conv_case((2, 48, 20, 19), (10, 48, 5, 5), stride=2, padding=2),
    "rows_batch1_strided_dilated": conv_case((1, 5, 17, 150), (7, 5, 3, 4), stride=(2, 3), dilation=(2, 1),
                                             padding=((1, 2), (3, 0))),
    "rows_grouped": conv_case((3, 6, 36, 66), (80, 3, 3, 3), padding=1, groups=2),  # 40 > 32 per group
    # stride 1, per row: 32 columns, whole vectors, where wide rows would drop 8 of every 40 computed
    "rows_stride1_dilated": conv_case((2, 5, 40, 32), (24, 5, 3, 3), padding=(1, 4), dilation=4),
    # stride 1, wide rows (a block of output rows as one GEMM over the copy's rows, the columns past each
    # output row computed and dropped): an image per thread; batch 1, threads sharing the copy in blocks
    # of rows (backward-input too, as the transposed forward); 60 rows of 98 columns in 2 blocks (float32)
    # or 4 (float64) per image; groups of 36 output channels (more than the direct sums take)
    "wide_rows_batch2": conv_case((2, 9, 13, 11), (21, 9, 5, 5), padding=2),
    "wide_rows_batch1": conv_case((1, 16, 20, 38), (10, 16, 3, 5), padding=2, dilation=(2, 1)),
    "wide_rows_blocks": conv_case((2, 18, 60, 96), (8, 18, 5, 3), padding=(2, 1)),
    "wide_rows_grouped": conv_case((2, 24, 10, 14), (108, 8, 3, 5), padding=(1, 2), groups=3),
    # 70 output channels: backward-weight's packed grad_y in two strips, the second part empty
    "wide_rows_two_strips": conv_case((2, 12, 18, 23), (70, 12, 5, 5), padding=2),
    "transposed_wide_batch1": conv_case((1, 6, 12, 38), (9, 6, 5, 5), padding=2),
    # 49 output columns: a last register strip of 1 column on every build (strips of 4 to 48), which
    # narrow_columns in gemm_impl.inc takes, as it takes 2 and 3 (50, 51 columns); over two depth blocks
    # (300 channels) and 70 rows (strips of 6 or 8 in groups of 4, then one at a time); batch 1 splits
    # the rows among threads, batch 2 gives each thread its images
    "narrow_columns_1": conv_case((1, 300, 7, 7), (70, 300, 1, 1)),
    "narrow_columns_2": conv_case((1, 300, 5, 10), (70, 300, 1, 1)),
    "narrow_columns_3": conv_case((2, 300, 3, 17), (70, 300, 1, 1)),
    "rows_narrow_tail": conv_case((2, 4, 70, 100), (10, 4, 5, 5), stride=2, padding=1),
    # batch 1 with more output channels than positions: threads split the rows of the GEMM and share one
    # packing of the im2col columns (1152 x 81, in 5 depth blocks packed side by side)
    "shared_columns_batch1": conv_case((1, 128, 9, 9), (100, 128, 3, 3), padding=2, dilation=2),
    # batch 1 with 49 positions: backward-input's col2im split between threads by bands of channels (37:
    # uneven bands), too few positions for bands of input rows
    "col2im_channel_bands": conv_case((1, 37, 7, 7), (100, 37, 3, 3), padding=1),
    # groups and depthwise
    "grouped_3": conv_case((2, 6, 7, 7), (9, 2, 3, 3), padding=1, groups=3),
    "depthwise": conv_case((2, 7, 9, 11), (7, 1, 3, 3), stride=2, padding=1, groups=7),
    "depthwise_multiplier2": conv_case((1, 5, 8, 8), (10, 1, 3, 3), padding="same", groups=5),
    # (31 channels: from 32 on such planes the channels go across the lanes, depthwise_lanes_* below)
    "depthwise_many_channels": conv_case((1, 31, 10, 10), (31, 1, 5, 5), padding=2, groups=31),
    "grouped_pointwise": conv_case((2, 8, 5, 5), (12, 2, 1, 1), groups=4),
    # few weights per group (direct_conv_impl.inc): x split into stride phases, sums over "wide" rows
    "depthwise_stride2_dilated": conv_case((2, 6, 13, 12), (6, 1, 3, 3), stride=2, padding=2, dilation=2, groups=6),
    "depthwise_stride3_2_asym": conv_case((1, 4, 11, 14), (8, 1, 3, 3), stride=(3, 2), padding=((1, 2), (0, 1)),
                                          groups=4),
    # planes of a page or more (33x35): backward-weight goes image by image through each thread's run of
    # groups, their sums kept between images (3 images, 5 groups over the threads' runs); grouped, with
    # 8 output channels per group in register blocks
    "depthwise_page_planes": conv_case((3, 5, 33, 35), (5, 1, 3, 3), stride=2, padding=1, groups=5),
    "grouped_page_planes": conv_case((2, 8, 20, 30), (16, 4, 3, 3), padding=1, groups=2),
    # stride 3 past a 1x1 kernel: phases that no tap reads (backward-input leaves them zero)
    "few_weights_stride_past_kernel": conv_case((2, 3, 10, 11), (3, 1, 1, 1), stride=3, groups=3),
    # padding wider than the kernel, stride 4 (a phase of padding only), 2x2 kernel
    "few_weights_wide_padding": conv_case((1, 2, 6, 7), (4, 1, 2, 2), stride=(4, 1), padding=3, groups=2),
    # 12 input channels per group (backward-input as the transposed forward: 12 output channels in blocks
    # of 8 + 4; strided, the direct backward-input's blocks of 8 + 4 input channels), 9 output channels
    # per group (forward in blocks of 8 + 1), 108 and 81 weights per group
    "few_weights_channel_blocks": conv_case((2, 24, 9, 10), (2, 12, 3, 3), padding=1, groups=2),
    "few_weights_channel_blocks_strided": conv_case((2, 24, 9, 10), (2, 12, 3, 3), stride=2, padding=1,
                                                    groups=2),
    "few_weights_nine_outputs": conv_case((1, 2, 8, 9), (18, 1, 3, 3), stride=(1, 2), padding="same", groups=2),
    # a LeNet-like 5x5 with stride and dilation: 25 taps in blocks 6 + 6 + 6 + 7 (backward-weight)
    "few_weights_lenet_strided": conv_case((3, 1, 17, 19), (6, 1, 5, 5), stride=(2, 3), dilation=(1, 2)),
    # grouped layers with few output channels per group, summed directly (up to 32 per group, in register
    # blocks of 4 channels from 8 on; backward-weight on the GEMM for 17-32 on fewer than 100 positions)
    "grouped_direct_8": conv_case((2, 32, 9, 10), (32, 8, 3, 3), padding=1, groups=4),
    "grouped_direct_24_batch1": conv_case((1, 32, 7, 9), (48, 16, 3, 3), padding=(1, 0), groups=2),
    "grouped_direct_strided": conv_case((2, 40, 11, 12), (40, 10, 3, 3), stride=2, padding=1, groups=4),
    "grouped_direct_20": conv_case((2, 40, 8, 9), (40, 20, 3, 3), padding=1, groups=2),
    "grouped_direct_18_wide": conv_case((2, 36, 11, 10), (54, 18, 3, 3), padding=1, groups=2),
    "grouped_direct_dilated_5x3": conv_case((2, 18, 12, 9), (27, 6, 5, 3), padding="same", dilation=(2, 1),
                                            groups=3),
    # backward-input as the transposed convolution through the forward's paths (conv2d.cpp): 25+ taps or
    # dilated, 'same'-like padding, at least two images or groups
    "transposed_5x5_same": conv_case((2, 5, 9, 8), (12, 5, 5, 5), padding=2),
    # 15 taps (3x5, from 10 taps on), padding one short of 'same' along the rows
    "transposed_3x5": conv_case((2, 10, 9, 12), (14, 10, 3, 5), padding=((1, 0), (2, 2))),
    # 7 taps with 16 channels or more: 7x1; 1x7 with 64 channels, whose forward and transposed forward run
    # channels-last in float32
    "transposed_7x1": conv_case((2, 16, 9, 10), (20, 16, 7, 1), padding=(3, 0)),
    "transposed_1x7_channels_last": conv_case((2, 64, 5, 9), (64, 64, 1, 7), padding=(0, 3)),
    "transposed_dilated": conv_case((2, 12, 10, 9), (20, 12, 3, 3), padding=2, dilation=2),
    "transposed_grouped_even_kernel": conv_case((1, 8, 9, 11), (68, 4, 6, 5), padding="same", groups=2),
    "transposed_asym_dilated_wide": conv_case((3, 9, 6, 40), (10, 9, 3, 5), padding=((2, 1), (4, 3)),
                                              dilation=(1, 2)),
    # depthwise with stride_h 1 and R = 5, 7: blocks of output rows sharing each input row's loads
    # (rows not a multiple of the block; narrow planes: one vector per row, 8 rows)
    "depthwise_rows_7x3_dilated": conv_case((2, 3, 23, 20), (3, 1, 7, 3), padding=(5, 2), dilation=(1, 2),
                                            groups=3),
    "depthwise_rows_5x5_wide": conv_case((1, 2, 9, 70), (2, 1, 5, 5), padding=2, groups=2),
    # vertical dilation: not those blocks (their output rows and tap rows must both be one plane row apart)
    "depthwise_dilated_rows": conv_case((1, 2, 12, 11), (2, 1, 3, 3), padding=2, dilation=2, groups=2),
    # wider than a span of any build (128 floats on AVX-512), one channel
    "depthwise_wide_rows": conv_case((1, 3, 5, 150), (3, 1, 3, 5), stride=(1, 2), padding=(1, 2), groups=3),
    # depthwise with 32 or more channels on small planes (depthwise_conv.cpp): the channels across the lanes,
    # a part-empty last block (37 = 16 + 16 + 5 on AVX-512), runs of 8, 4, 2, 1 outputs; kernel rows of 3,
    # 5, 7 at stride 1 and 2 with their loads shared, any other row (4 wide, dilated) the general way
    "depthwise_lanes_3x3": conv_case((2, 37, 7, 15), (37, 1, 3, 3), padding=1, groups=37),
    "depthwise_lanes_strided": conv_case((3, 40, 14, 13), (40, 1, 3, 3), stride=2, padding=((1, 0), (1, 1)),
                                         groups=40),
    "depthwise_lanes_5x5_s2": conv_case((2, 32, 11, 12), (32, 1, 5, 5), stride=2, padding=2, groups=32),
    "depthwise_lanes_7x7_n1": conv_case((1, 48, 9, 10), (48, 1, 7, 7), padding=3, groups=48),
    "depthwise_lanes_general": conv_case((2, 33, 12, 11), (33, 1, 3, 4), stride=(2, 3), padding=((2, 1), (3, 0)),
                                         dilation=(1, 2), groups=33),
    # padding past the kernel at stride 1 (no transposed forward: backward-input scatters); 5 images in 4
    # fixed parts for backward-weight's sums (2 blocks of channels on AVX-512)
    "depthwise_lanes_wide_padding": conv_case((2, 32, 6, 5), (32, 1, 3, 3), padding=3, groups=32),
    "depthwise_lanes_parts": conv_case((5, 32, 8, 8), (32, 1, 3, 3), padding="same", groups=32),
    # dilated at stride 1 with padding and size multiples of the dilation (dilated_phases.cpp): the undilated
    # layer on Winograd over a batch of x's dilation phases (2 x 2 phases; 3 x 2 with asymmetric padding,
    # one side none; 4 x 4 with 'same' padding, whose phases are 4x4), all three passes where chosen
    "dilated_phases_2": conv_case((2, 8, 16, 24), (12, 8, 3, 3), padding=2, dilation=2),
    "dilated_phases_3x2": conv_case((3, 9, 24, 20), (10, 9, 3, 3), padding=((3, 6), (2, 0)), dilation=(3, 2)),
    "dilated_phases_4_same": conv_case((1, 16, 16, 16), (16, 16, 3, 3), padding="same", dilation=4),
    # grouped with large groups (grouped_winograd.cpp): one Winograd layer per group over the batch (2 groups
    # of 128 x 128 channels), all three passes; 3 groups of 64 on 28x28 with asymmetric padding
    "grouped_winograd_128": conv_case((2, 256, 12, 12), (256, 128, 3, 3), padding=1, groups=2),
    "grouped_winograd_64_28": conv_case((1, 192, 28, 28), (192, 64, 3, 3), padding=((0, 2), (1, 1)), groups=3),
    # 5x5 in 2 groups of 48 in and 64 out (AlexNet's second layer in small): one split-kernel Winograd layer
    # per group (split_kernel.cpp), forward and backward-weight; backward-input's transposed forward likewise
    "grouped_split_kernel": conv_case((4, 96, 20, 19), (128, 48, 5, 5), padding=2, groups=2),
    # grouped 3x3 stride-1 layers of one or two vectors of channels a group on F(2x2, 3x3) (small_group_conv.cpp;
    # which take it depends on the build's vector and the type: test_small_groups_run_across_lanes_where_meant_to):
    # 16 a group (AVX-512 float32, AVX2 float32, AVX-512 float64), 2x2 tiles past odd outputs; 32 a group with
    # asymmetric padding, one side none; 8 a group at batch 1 with padding 2 across; 4 a group (SSE2); padding
    # past the kernel (no transposed forward)
    "small_groups_16": conv_case((2, 64, 9, 11), (64, 16, 3, 3), padding=1, groups=4),
    "small_groups_32_asym": conv_case((3, 96, 7, 6), (96, 32, 3, 3), padding=((0, 2), (1, 1)), groups=3),
    "small_groups_8_n1": conv_case((1, 24, 13, 10), (24, 8, 3, 3), padding=(2, 0), groups=3),
    "small_groups_4": conv_case((2, 8, 5, 7), (8, 4, 3, 3), padding=1, groups=2),
    "small_groups_wide_padding": conv_case((2, 32, 4, 5), (32, 16, 3, 3), padding=3, groups=2),
    # and backward-weight, strided forward and backward-input summed directly over the group's vectors: strided,
    # asymmetric padding; 5x3 with dilation across and strides (1, 2); 1x1 at stride 2 of 32 a group
    "small_groups_strided": conv_case((3, 64, 13, 12), (64, 16, 3, 3), stride=2, padding=(1, 0), groups=4),
    "small_groups_dilated_5x3": conv_case((2, 64, 11, 14), (64, 16, 5, 3), stride=(1, 2), padding=(2, 1),
                                          dilation=(1, 2), groups=4),
    "small_groups_32_1x1": conv_case((2, 96, 5, 7), (96, 32, 1, 1), stride=2, groups=3),
    # three and four vectors (AVX-512 float32): 48 a group at stride 1, 64 at stride 2
    "small_groups_48": conv_case((2, 96, 8, 9), (96, 48, 3, 3), padding=1, groups=2),
    "small_groups_64_strided": conv_case((2, 128, 11, 10), (128, 64, 3, 3), stride=2, padding=1, groups=2),
    # pointwise with 600 weights per group: the GEMM, whose backward-weight transposes x's rows in place
    "grouped_pointwise_gemm": conv_case((3, 40, 9, 11), (60, 20, 1, 1), groups=2),
    # many weights per group for few output positions: forward and backward-input as one GEMM per group
    # over the whole batch (1440 weights per group, 9 positions per image; 40 output channels per group,
    # more than the direct sums take)
    "grouped_batch_gemm": conv_case((3, 8, 6, 6), (80, 4, 3, 3), stride=2, padding=1, groups=2),
    # forward as one GEMM per tap over channels-last copies (channels_last_conv.cpp; float32), 64 output
    # channels (whole strips on every build): few images, the threads splitting them into blocks of
    # positions (3 images of 4 x 5 positions, 17 channels, asymmetric padding, dilation across; 2 images of
    # 6 x 6, a 2x3 kernel); 8 images, a task each on 2 threads, of 22 x 6 positions in blocks of 128 and 4
    # across output rows; 128 output channels of 64
    # channels' 9 taps, the weights in blocks of 64 output channels (AVX-512) or 112 and 16 (AVX2, portable)
    "channels_last_strided": conv_case((3, 17, 9, 11), (64, 17, 3, 3), stride=2, padding=((1, 0), (2, 1)),
                                       dilation=(1, 2)),
    "channels_last_few_images": conv_case((2, 16, 11, 12), (64, 16, 2, 3), stride=2, padding=1),
    "channels_last_blocks": conv_case((8, 16, 44, 13), (64, 16, 3, 3), stride=2, padding=1, dilation=(1, 2)),
    "channels_last_weight_blocks": conv_case((2, 64, 8, 8), (128, 64, 3, 3), stride=2, padding=1),
    # backward-input likewise, the input channels across the lanes (strided layers, float32): 3 images,
    # dilation across, asymmetric padding, 20 output channels; 2 images of 128 channels, the threads taking
    # blocks of channels (2 of 64 on AVX-512, 4 of 32 on AVX2)
    "channels_last_backward_strided": conv_case((3, 64, 9, 13), (20, 64, 3, 3), stride=2,
                                                padding=((1, 0), (0, 1)), dilation=(1, 2)),
    "channels_last_backward_blocks": conv_case((2, 128, 5, 7), (24, 128, 3, 2), stride=(2, 1), padding=1),
    # backward-weight of grouped layers, 32 input channels a group, in place of the direct sums (100 output
    # positions or more): 2 groups of 24 output channels at stride 1; 3 groups of 20, strided and dilated
    "channels_last_grouped": conv_case((3, 64, 10, 11), (48, 32, 3, 3), padding=1, groups=2),
    "channels_last_grouped_strided": conv_case((2, 96, 21, 19), (60, 32, 3, 3), stride=2, padding=(1, 2),
                                               dilation=(1, 2), groups=3),
    # all three passes channels-last, a group at a time, in place of the direct sums: 2 groups of 32 on 7x9 (a
    # 3x2 kernel: 3x3 ones take small_group_conv.cpp's Winograd on AVX-512, where its backward-weight takes
    # that file's direct sums; AVX2 and SSE2 run all three channels-last)
    "channels_last_grouped_32": conv_case((2, 64, 7, 9), (64, 32, 3, 2), padding=1, groups=2),
}

CONV_CASE_IDS = list(CONV_CASES)

# A subset run on every instruction set (AVX-512, AVX2 and portable): channels-last (each build's own
# copies, transposes and row adds), GEMM (each build's own im2col packers, wide rows' packed grad_y among
# them; _wide spans two B panels), pointwise, and direct (few weights per group: stride 1 on the wide-row
# path, strided or dilated) layers.
ISA_CASE_IDS = ["channels_last_strided", "channels_last_few_images", "channels_last_blocks",
                "channels_last_weight_blocks", "transposed_1x7_channels_last", "channels_last_backward_strided",
                "channels_last_backward_blocks", "channels_last_grouped", "channels_last_grouped_strided",
                "channels_last_grouped_32", "depthwise_lanes_3x3", "depthwise_lanes_strided", "depthwise_lanes_5x5_s2",
                "depthwise_lanes_7x7_n1", "depthwise_lanes_general", "depthwise_lanes_wide_padding",
                "depthwise_lanes_parts", "dilated_phases_2", "dilated_phases_3x2", "dilated_phases_4_same",
                "grouped_winograd_128", "grouped_winograd_64_28", "grouped_split_kernel", "small_groups_16",
                "small_groups_32_asym", "small_groups_8_n1", "small_groups_4", "small_groups_wide_padding",
                "small_groups_strided",
                "small_groups_dilated_5x3", "small_groups_32_1x1", "small_groups_48", "small_groups_64_strided",
                "gemm_k70_c37_n1", "gemm_k70_c37_n3", "gemm_k70_c37_n1_wide", "gemm_k70_c37_strided",
                "batch_halves_odd_n", "pointwise_odd", "width_67", "same_odd_total_stride3",
                "asym_padding_strided_dilated", "depthwise", "grouped_3", "one_channel_batch1", "lenet_5x5",
                "dilation3", "depthwise_many_channels", "grouped_batch_gemm", "wide_strided_strips",
                "wide_strided_strips_unpadded", "wide_stride1_strips", "rows_per_image_deep",
                "rows_batch1_strided_dilated", "rows_grouped", "narrow_columns_1", "narrow_columns_2",
                "narrow_columns_3", "rows_narrow_tail", "shared_columns_batch1", "grouped_pointwise_gemm",
                "col2im_channel_bands", "depthwise_stride2_dilated", "depthwise_stride3_2_asym",
                "few_weights_stride_past_kernel", "few_weights_wide_padding", "few_weights_channel_blocks",
                "few_weights_nine_outputs", "few_weights_lenet_strided", "depthwise_wide_rows",
                "transposed_5x5_same", "transposed_dilated", "transposed_grouped_even_kernel",
                "transposed_asym_dilated_wide", "grouped_direct_8", "grouped_direct_24_batch1",
                "grouped_direct_strided", "grouped_direct_dilated_5x3", "grouped_direct_20",
                "grouped_direct_18_wide", "depthwise_rows_7x3_dilated", "depthwise_rows_5x5_wide",
                "depthwise_dilated_rows", "few_weights_channel_blocks_strided", "rows_stride1_dilated",
                "wide_rows_batch2", "wide_rows_batch1", "wide_rows_grouped", "wide_rows_two_strips",
                "wide_rows_stride2", "wide_rows_strided_deep", "wide_rows_short_strided", "batch_gemm_col_blocks",
                "batch_gemm_col_blocks_5x5", "gathered_runs_n1",
                "gathered_short_rows", "gathered_runs_k300", "gathered_short_rows_k300", "few_taps_c1",
                "few_taps_27_k70", "few_taps_5x5_n1", "few_taps_strided", "col2im_pairs_dilated"]

ROWS_CASE_IDS = ["rows_per_image_deep", "rows_batch1_strided_dilated", "rows_narrow_tail", "resnet_stem_n2",
                 "resnet_stem_same_n1", "rows_stride1_dilated"]
WIDE_ROWS_CASE_IDS = ["wide_rows_batch2", "wide_rows_batch1", "wide_rows_blocks", "wide_rows_grouped",
                      "transposed_wide_batch1", "rows_grouped"]


def reads_rows_in_place(cfg, dtype):
    """'per_row', 'wide', or None (im2col columns packed)."""
    x_shape, w_shape = cfg["x_shape"], cfg["w_shape"]
    sh, sw = ref._pair(cfg["stride"])
    dh, dw = ref._pair(cfg["dilation"])
    (pt, pb), (pl, pr) = ref.normalize_padding(cfg["padding"], x_shape[2:], w_shape[2:], (sh, sw), (dh, dw))
    return _pykernels_cpu.conv2d_forward_reads_rows_in_place(x_shape, w_shape, (sh, sw), (pt, pb, pl, pr), (dh, dw),
                                                             cfg["groups"], np.dtype(dtype).itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_forward_reads_rows_in_place_where_meant_to(dtype):
    """The named cases meant for conv_rows.cpp's plans take them (so the tests above cover both); layers
    whose im2col is smaller than the copy (1x1 strided), narrow rows and Winograd's layers do not."""
    for name in ROWS_CASE_IDS:
        assert reads_rows_in_place(CONV_CASES[name], dtype) == "per_row", name
    for name in WIDE_ROWS_CASE_IDS:
        assert reads_rows_in_place(CONV_CASES[name], dtype) == "wide", name
    for name in ["one_by_one_stride2", "gathered_runs_n1", "gathered_short_rows", "gathered_runs_k300",
                 "gathered_short_rows_k300", "pointwise_odd", "lenet_5x5"]:
        assert reads_rows_in_place(CONV_CASES[name], dtype) is None, name
    # strided, on rows shorter than the per-row plan takes: wide rows of the copy split into row phases too
    for name in ["wide_rows_stride2", "batch_halves_odd_n", "wide_rows_short_strided"]:
        assert reads_rows_in_place(CONV_CASES[name], dtype) == "wide", name
    # 3x3 stride 2 onto 14x14: 256 output channels wide, 512 packed (gathering costs less per output channel)
    assert reads_rows_in_place(conv_case((8, 256, 28, 28), (256, 256, 3, 3), stride=2, padding=1), dtype) == "wide"
    assert reads_rows_in_place(conv_case((8, 512, 28, 28), (512, 512, 3, 3), stride=2, padding=1), dtype) is None
    # strided, with 256 taps or more on rows that leave over a twelfth of the per-row plan's lanes empty
    # (float32: 38 columns in vectors of 16; not float64, whose vectors of 8 leave 2 of 40)
    assert (reads_rows_in_place(CONV_CASES["wide_rows_strided_deep"], dtype) == "wide") == (dtype == np.float32)
    assert reads_rows_in_place(conv_case((2, 256, 56, 56), (512, 256, 1, 1), stride=2), dtype) is None
    assert reads_rows_in_place(conv_case((8, 64, 56, 56), (64, 64, 3, 3), padding=1), dtype) is None  # Winograd
    # 256 channels of 5 dilated rows: 225 KB of inputs per output row in float32, past the per-row plan's L2
    # budget; wide rows read one depth block of them at a time
    assert reads_rows_in_place(conv_case((2, 256, 40, 40), (256, 256, 3, 3), padding=2, dilation=2),
                               np.float32) == "wide"
    # short rows and many output channels: packing im2col costs less than dropping 2 columns of every 9
    assert reads_rows_in_place(conv_case((8, 512, 7, 7), (512, 512, 3, 3), padding=2, dilation=2), dtype) is None


DEPTHWISE_LANES_CASE_IDS = ["depthwise_lanes_3x3", "depthwise_lanes_strided", "depthwise_lanes_5x5_s2",
                            "depthwise_lanes_7x7_n1", "depthwise_lanes_general", "depthwise_lanes_wide_padding",
                            "depthwise_lanes_parts"]


def runs_depthwise_lanes(cfg, dtype):
    """(forward and backward-input, backward-weight) with the channels across the lanes."""
    return _pykernels_cpu.conv2d_depthwise_channels_last(cfg["x_shape"], cfg["w_shape"], *conv_pads(cfg), cfg["groups"],
                                                         np.dtype(dtype).itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_depthwise_runs_across_lanes_where_meant_to(isa, dtype):
    """The named depthwise_lanes cases take depthwise_conv.cpp's passes on every build and in both types (so
    the tests above and test_conv2d_both_isas cover them); fewer than 32 channels (the other depthwise cases),
    a channel multiplier of 2, and planes whose padded copy passes 1 MiB do not."""
    for name in DEPTHWISE_LANES_CASE_IDS:
        assert runs_depthwise_lanes(CONV_CASES[name], dtype) == (True, True), name
    for name in ["depthwise", "depthwise_many_channels", "depthwise_multiplier2", "depthwise_stride2_dilated",
                 "depthwise_rows_5x5_wide", "grouped_3"]:
        assert runs_depthwise_lanes(CONV_CASES[name], dtype) == (False, False), name
    assert runs_depthwise_lanes(conv_case((2, 64, 8, 8), (128, 1, 3, 3), padding=1, groups=64), dtype) == (False,
                                                                                                          False)
    assert runs_depthwise_lanes(conv_case((1, 32, 320, 320), (32, 1, 3, 3), stride=2, padding=1, groups=32),
                                dtype) == (False, False)
    # MobileNet's 3x3 layers from 7x7 to 56x56, at stride 1 and 2
    for hw, stride in [(7, 1), (14, 1), (28, 2), (56, 1), (56, 2)]:
        assert runs_depthwise_lanes(conv_case((8, 144, hw, hw), (144, 1, 3, 3), stride=stride, padding=1,
                                              groups=144), dtype) == (True, True), (hw, stride)


def runs_by_phases(cfg, dtype):
    """(forward, backward-input, backward-weight) as the undilated layer over x's dilation phases."""
    return _pykernels_cpu.conv2d_by_phases(cfg["x_shape"], cfg["w_shape"], *conv_pads(cfg), cfg["groups"],
                                           np.dtype(dtype).itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dilated_layers_run_by_phases_where_meant_to(dtype):
    """The named dilated_phases cases run as the undilated layer over x's phases (so the tests above cover
    it); padding or a size that the dilation does not divide, a stride, groups, or phases too small for
    Winograd do not."""
    assert runs_by_phases(CONV_CASES["dilated_phases_2"], dtype) == (True, True, True)
    assert runs_by_phases(CONV_CASES["dilated_phases_3x2"], dtype) == (True, True, True)
    assert runs_by_phases(CONV_CASES["dilated_phases_4_same"], dtype) == (True, True, False)
    for name in ["dilation3", "transposed_dilated", "rows_stride1_dilated", "depthwise_lanes_general",
                 "asym_padding_strided_dilated"]:
        assert runs_by_phases(CONV_CASES[name], dtype) == (False, False, False), name
    for cfg in [conv_case((2, 16, 16, 16), (16, 16, 3, 3), padding=1, dilation=2),
                conv_case((2, 16, 15, 16), (16, 16, 3, 3), padding=2, dilation=2),
                conv_case((2, 16, 16, 16), (16, 16, 3, 3), stride=2, padding=2, dilation=2),
                conv_case((2, 16, 16, 16), (16, 8, 3, 3), padding=2, dilation=2, groups=2),
                conv_case((1, 16, 8, 8), (16, 16, 3, 3), padding=2, dilation=2)]:
        assert runs_by_phases(cfg, dtype) == (False, False, False), cfg


def runs_per_group(cfg, dtype):
    """(forward, backward-input, backward-weight) as one Winograd layer per group."""
    return _pykernels_cpu.conv2d_per_group(cfg["x_shape"], cfg["w_shape"], *conv_pads(cfg), cfg["groups"],
                                           np.dtype(dtype).itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_grouped_layers_run_per_group_where_meant_to(dtype):
    """The named grouped_winograd cases run as one Winograd layer per group (so the tests above cover it), but
    the passes small_group_conv.cpp takes (groups of up to four vectors: 48 and 64 floats with AVX-512),
    except backward-weight of 64 a group; groups under 48 channels, 64-channel groups on small planes,
    strided layers, and 5x5 ones whose group's split-kernel Winograd costs more than half of direct
    convolution, do not. grouped_split_kernel's forward and backward-weight do (its backward-input runs as
    its transposed forward, which does)."""
    def unless_small_groups(cfg):
        small = runs_small_groups(cfg, dtype)
        return (not small[0], not small[1], not (small[2] and cfg["w_shape"][1] < 64))

    assert runs_per_group(CONV_CASES["grouped_winograd_128"], dtype) == (True, True, True)
    assert runs_per_group(CONV_CASES["grouped_winograd_64_28"], dtype) == unless_small_groups(
        CONV_CASES["grouped_winograd_64_28"])
    assert runs_per_group(CONV_CASES["grouped_split_kernel"], dtype) == (True, False, True)
    transposed = conv_case((4, 128, 20, 19), (96, 64, 5, 5), padding=2, groups=2)
    assert runs_per_group(transposed, dtype)[0]
    for name in ["grouped_3", "channels_last_grouped", "channels_last_grouped_32", "grouped_batch_gemm",
                 "transposed_grouped_even_kernel"]:
        assert runs_per_group(CONV_CASES[name], dtype) == (False, False, False), name
    for cfg in [conv_case((8, 256, 14, 14), (256, 64, 3, 3), padding=1, groups=4),
                conv_case((2, 256, 12, 12), (256, 128, 3, 3), stride=2, padding=1, groups=2),
                conv_case((2, 256, 12, 12), (256, 128, 5, 5), padding=2, groups=2),
                conv_case((8, 192, 14, 14), (192, 48, 5, 5), padding=2, groups=4),
                conv_case((4, 64, 20, 20), (64, 32, 5, 5), padding=2, groups=2),
                conv_case((8, 432, 14, 14), (432, 48, 3, 3), padding=1, groups=9),
                conv_case((2, 160, 28, 28), (160, 40, 3, 3), padding=1, groups=4)]:
        assert runs_per_group(cfg, dtype) == (False, False, False), cfg
    # RegNet's groups of 48 on 28x28 (AVX-512 float32: small_group_conv.cpp's, three vectors)
    regnet = conv_case((8, 192, 28, 28), (192, 48, 3, 3), padding=1, groups=4)
    assert runs_per_group(regnet, dtype) == unless_small_groups(regnet)


def runs_small_groups(cfg, dtype):
    """(forward, backward-input, backward-weight) with a group's channels in one or two vectors: forward and
    backward-input on F(2x2, 3x3), backward-weight on it or summed directly."""
    return _pykernels_cpu.conv2d_small_group_winograd(cfg["x_shape"], cfg["w_shape"], *conv_pads(cfg), cfg["groups"],
                                                      np.dtype(dtype).itemsize)


SMALL_GROUP_WINOGRAD_CASE_IDS = ["small_groups_16", "small_groups_32_asym", "small_groups_8_n1", "small_groups_4",
                                 "small_groups_wide_padding", "small_groups_48"]
SMALL_GROUP_CASE_IDS = SMALL_GROUP_WINOGRAD_CASE_IDS + ["small_groups_strided", "small_groups_dilated_5x3",
                                                        "small_groups_32_1x1", "small_groups_64_strided"]


def small_groups_expected(cfg, isa, dtype, winograd):
    """small_group_conv.cpp's rule, restated: (forward, backward-input, backward-weight) for a layer with as
    many output as input channels a group, `winograd` where it is 3x3 at stride 1 (and its backward-input
    can run as the transposed forward)."""
    lanes = {"avx512": 64, "avx2": 32, "portable": 16}[isa] // np.dtype(dtype).itemsize
    per_group = cfg["w_shape"][1]
    vectors = per_group // lanes if per_group % lanes == 0 and per_group // lanes <= 4 else 0
    fits = vectors >= 2 or (vectors == 1 and dtype == np.float32)  # one vector of float64: too few channels
    strided = ref._pair(cfg["stride"]) != (1, 1)
    return (fits and (winograd or strided), fits and (winograd or (strided and vectors <= 2)),
            vectors > 0 and (vectors <= 2 or isa == "avx512"))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_small_groups_run_across_lanes_where_meant_to(isa, dtype):
    """Grouped layers with as many output as input channels a group, one to four of the build's vectors of
    them, run on small_group_conv.cpp: 3x3 stride-1 ones on F(2x2, 3x3), all three passes (backward-input
    not with padding past the kernel); any other window its backward-weight summed directly, and strided
    ones their forward and backward-input too. Not forward and backward-input of one vector of float64,
    nor strided backward-input of three or four vectors, nor backward-weight of three or four without
    AVX-512. So each named small_groups case runs it on the builds where its channels make one or more
    vectors (test_conv2d_both_isas covers them there). Ungrouped layers and unequal channels in and out do
    not."""
    for name in SMALL_GROUP_CASE_IDS:
        winograd = name in SMALL_GROUP_WINOGRAD_CASE_IDS and name != "small_groups_wide_padding"
        expected = small_groups_expected(CONV_CASES[name], isa, dtype, winograd)
        if name == "small_groups_wide_padding":  # forward on Winograd, backward-input not
            expected = (expected[0] or small_groups_expected(CONV_CASES[name], isa, dtype, True)[0], False,
                        expected[2])
        assert runs_small_groups(CONV_CASES[name], dtype) == expected, name
    # ResNeXt-50's third and fourth stages and their stride-2 first layers: 16 and 32 channels a group, one and
    # two vectors of float32 with AVX-512 (all three passes), two and four with AVX2
    if isa == "avx512":
        for hw, per_group in [(14, 16), (7, 32)]:
            cfg = conv_case((8, 32 * per_group, hw, hw), (32 * per_group, per_group, 3, 3), padding=1, groups=32)
            assert runs_small_groups(cfg, dtype) == (True, True, True), (hw, per_group)
            cfg = conv_case((8, 32 * per_group, 2 * hw, 2 * hw), (32 * per_group, per_group, 3, 3), stride=2,
                            padding=1, groups=32)
            assert runs_small_groups(cfg, dtype) == (True, dtype == np.float32 or per_group == 16, True)
    for hw, per_group, stride in [(14, 16, 1), (7, 32, 1), (28, 16, 2), (14, 32, 2), (14, 64, 1), (14, 48, 1)]:
        cfg = conv_case((8, 32 * per_group, hw, hw), (32 * per_group, per_group, 3, 3), stride=stride, padding=1,
                        groups=32)
        assert runs_small_groups(cfg, dtype) == small_groups_expected(cfg, isa, dtype, stride == 1), cfg
    for cfg in [conv_case((2, 16, 9, 11), (16, 16, 3, 3), padding=1),
                conv_case((2, 64, 9, 11), (128, 16, 3, 3), padding=1, groups=4),
                conv_case((2, 64, 9, 11), (128, 16, 3, 3), stride=2, padding=1, groups=4),
                conv_case((2, 160, 9, 11), (160, 80, 3, 3), padding=1, groups=2),
                CONV_CASES["grouped_3"], CONV_CASES["depthwise"]]:
        assert runs_small_groups(cfg, dtype) == (False, False, False), cfg


CHANNELS_LAST_CASE_IDS = ["channels_last_strided", "channels_last_few_images", "channels_last_blocks",
                          "channels_last_weight_blocks", "channels_last_grouped_32"]


def runs_channels_last(cfg, dtype):
    sh, sw = ref._pair(cfg["stride"])
    dh, dw = ref._pair(cfg["dilation"])
    (pt, pb), (pl, pr) = ref.normalize_padding(cfg["padding"], cfg["x_shape"][2:], cfg["w_shape"][2:], (sh, sw),
                                               (dh, dw))
    return _pykernels_cpu.conv2d_forward_channels_last(cfg["x_shape"], cfg["w_shape"], (sh, sw), (pt, pb, pl, pr),
                                                       (dh, dw), cfg["groups"], np.dtype(dtype).itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_forward_runs_channels_last_where_meant_to(isa, dtype):
    """The named channels-last cases take channels_last_conv.cpp's path in float32 on every build (so the
    tests above and test_conv2d_both_isas cover it), a grouped one in place of the direct sums; float64
    (never faster there), batch 1, layers whose im2col-based plans keep most lanes full, 1x1 layers,
    grouped layers with many positions, and output channels that leave a strip part empty do not."""
    f32 = dtype == np.float32
    for name in CHANNELS_LAST_CASE_IDS:
        assert runs_channels_last(CONV_CASES[name], dtype) == f32, name
    for name in ["subsampled_stride2", "wide_rows_stride2", "grouped_batch_gemm", "gathered_runs_n1", "lenet_5x5",
                 "rows_per_image_deep"]:
        assert not runs_channels_last(CONV_CASES[name], dtype), name
    # CIFAR's 32 -> 64 stride-2 layer onto 8x8 outputs (wide rows keep 0.66 of the lanes in strips of 48),
    # not at batch 1; onto 16x16, where wide rows keep 0.89, and with 80 output channels (a part-empty strip
    # on AVX-512), not at all
    assert runs_channels_last(conv_case((64, 32, 16, 16), (64, 32, 3, 3), stride=2, padding=1), dtype) == f32
    assert not runs_channels_last(conv_case((1, 32, 16, 16), (64, 32, 3, 3), stride=2, padding=1), dtype)
    assert not runs_channels_last(conv_case((64, 32, 32, 32), (64, 32, 3, 3), stride=2, padding=1), dtype)
    if isa == "avx512":
        assert not runs_channels_last(conv_case((64, 32, 16, 16), (80, 32, 3, 3), stride=2, padding=1), dtype)
    assert not runs_channels_last(conv_case((2, 64, 28, 28), (64, 32, 3, 3), padding=1, groups=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_backward_input_runs_channels_last_where_meant_to(isa, dtype):
    """The named strided channels_last cases' backward-input takes channels_last_conv.cpp's path in float32 on
    every build; float64, batch 1, stride 1, images over 256 KB, input channels in part vectors and 1x1
    layers do not."""
    def chosen(cfg):
        stride, pads, dilation = conv_pads(cfg)
        return _pykernels_cpu.conv2d_backward_input_channels_last(cfg["x_shape"], cfg["w_shape"], stride, pads,
                                                                  dilation, cfg["groups"], np.dtype(dtype).itemsize)
    for name in ["channels_last_backward_strided", "channels_last_backward_blocks", "channels_last_weight_blocks",
                 "channels_last_few_images", "channels_last_blocks", "channels_last_grouped",
                 "channels_last_grouped_strided", "channels_last_grouped_32"]:
        assert chosen(CONV_CASES[name]) == (dtype == np.float32), name
    for cfg in [conv_case((1, 64, 9, 13), (20, 64, 3, 3), stride=2, padding=1),
                conv_case((2, 64, 9, 13), (20, 64, 3, 3), padding=1),
                conv_case((2, 64, 32, 33), (20, 64, 3, 3), stride=2, padding=1),
                conv_case((2, 24, 9, 13), (20, 24, 3, 3), stride=2, padding=1),
                conv_case((2, 64, 9, 13), (20, 64, 1, 1), stride=2), CONV_CASES["lenet_5x5"]]:
        assert not chosen(cfg), cfg


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_backward_weight_runs_channels_last_where_meant_to(isa, dtype):
    """The named strided and grouped channels_last cases with 32 input channels (a group) or a multiple take
    channels_last_conv.cpp's backward-weight in float32 on every build, the grouped ones in place of the
    direct sums; float64, batch 1, stride 1 of one group, 16 input channels, over 64 KB of weights per tap,
    images over 256 KB and groups of more than 32 output channels do not."""
    def chosen(cfg):
        stride, pads, dilation = conv_pads(cfg)
        return _pykernels_cpu.conv2d_backward_weight_channels_last(cfg["x_shape"], cfg["w_shape"], stride, pads,
                                                                   dilation, cfg["groups"], np.dtype(dtype).itemsize)
    for name in ["channels_last_backward_strided", "channels_last_backward_blocks", "channels_last_weight_blocks",
                 "channels_last_grouped", "channels_last_grouped_strided", "channels_last_grouped_32"]:
        assert chosen(CONV_CASES[name]) == (dtype == np.float32), name
    # the grouped ones are also the direct sums' (which run them in float64)
    for name in ["channels_last_grouped", "channels_last_grouped_strided"]:
        stride, pads, dilation = conv_pads(CONV_CASES[name])
        assert _pykernels_cpu.conv2d_sums_directly(CONV_CASES[name]["x_shape"], CONV_CASES[name]["w_shape"], stride,
                                                   pads, dilation, CONV_CASES[name]["groups"])[1], name
    for cfg in [conv_case((1, 64, 9, 13), (20, 64, 3, 3), stride=2, padding=1),
                conv_case((2, 64, 9, 13), (20, 64, 3, 3), padding=1),
                conv_case((2, 16, 9, 13), (20, 16, 3, 3), stride=2, padding=1),
                conv_case((2, 128, 9, 13), (160, 128, 3, 3), stride=2, padding=1),
                conv_case((2, 64, 32, 33), (20, 64, 3, 3), stride=2, padding=1), CONV_CASES["channels_last_blocks"],
                conv_case((2, 64, 9, 11), (80, 32, 3, 3), padding=1, groups=2),
                conv_case((2, 32, 9, 11), (32, 16, 3, 3), padding=1, groups=2)]:
        assert not chosen(cfg), cfg


def conv_pads(cfg):
    sh, sw = ref._pair(cfg["stride"])
    dh, dw = ref._pair(cfg["dilation"])
    (pt, pb), (pl, pr) = ref.normalize_padding(cfg["padding"], cfg["x_shape"][2:], cfg["w_shape"][2:], (sh, sw),
                                               (dh, dw))
    return (sh, sw), (pt, pb, pl, pr), (dh, dw)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_backward_weight_reads_wide_rows_where_meant_to(dtype):
    """The wide-row cases' backward-weight reads x's rows in place (so the tests above cover it); the
    per-row cases (8 of 40 columns dropped; strided rows of 32 columns or more), 256 or 300 output channels
    on short rows do not."""
    def wide(cfg):
        stride, pads, dilation = conv_pads(cfg)
        return _pykernels_cpu.conv2d_backward_weight_reads_wide_rows(cfg["x_shape"], cfg["w_shape"], stride, pads,
                                                                     dilation, cfg["groups"], np.dtype(dtype).itemsize)
    for name in ["wide_rows_batch2", "wide_rows_batch1", "wide_rows_blocks", "wide_rows_grouped",
                 "wide_rows_two_strips", "wide_rows_stride2"]:
        assert wide(CONV_CASES[name]), name
    for name in ["rows_stride1_dilated", "rows_per_image_deep", "gathered_runs_k300", "gathered_short_rows_k300",
                 "lenet_5x5", "pointwise_odd"]:
        assert not wide(CONV_CASES[name]), name
    assert not wide(conv_case((8, 96, 27, 27), (256, 96, 5, 5), padding=2))
    # CIFAR's first layer: 27 rows of col share each packed value of grad_y, too few for its trip to memory
    assert not wide(conv_case((64, 3, 32, 32), (64, 3, 3, 3), padding=1))


def test_grouped_layers_sum_directly_where_meant_to():
    """Which named cases sum directly: (forward and backward-input, backward-weight)."""
    def paths(cfg):
        stride, pads, dilation = conv_pads(cfg)
        return _pykernels_cpu.conv2d_sums_directly(cfg["x_shape"], cfg["w_shape"], stride, pads, dilation,
                                                   cfg["groups"])
    for name in ["grouped_direct_8", "grouped_direct_strided", "grouped_direct_dilated_5x3", "grouped_direct_18_wide"]:
        assert paths(CONV_CASES[name]) == (True, True), name
    for name in ["grouped_direct_24_batch1", "grouped_direct_20"]:
        assert paths(CONV_CASES[name]) == (True, False), name
    for name in ["depthwise", "lenet_5x5", "few_weights_channel_blocks"]:
        assert paths(CONV_CASES[name]) == (True, True), name
    for name in ["grouped_pointwise_gemm", "grouped_batch_gemm", "gemm_k70_c37_n1"]:
        assert paths(CONV_CASES[name]) == (False, False), name
    for name in ["few_taps_c1", "few_taps_c2_dilated", "few_taps_27_k16_n2", "few_taps_5x5_n1", "few_taps_wide_planes"]:
        assert paths(CONV_CASES[name]) == (False, True), name
    # 27 taps x 70 output channels: direct with AVX-512's register blocks, on the GEMM with the 16-register
    # builds' (at most 600 taps x output channels there)
    wide_registers = _pykernels_cpu.active_isa() == "avx512"
    assert paths(CONV_CASES["few_taps_27_k70"]) == (False, wide_registers)
    assert paths(conv_case((3, 1, 13, 15), (130, 1, 3, 3), padding=1)) == (False, False)  # over 128 outputs
    # strided: with AVX-512, up to 27 taps at stride 2, 32 output channels or 32x32 outputs
    assert paths(CONV_CASES["few_taps_strided"]) == (False, wide_registers)
    assert paths(conv_case((3, 3, 13, 15), (64, 3, 3, 3), stride=2, padding=1)) == (False, False)
    assert paths(conv_case((3, 3, 13, 15), (16, 3, 3, 3), stride=3, padding=1)) == (False, False)
    assert paths(conv_case((3, 4, 13, 15), (16, 4, 3, 3), stride=2, padding=1)) == (False, False)  # 36 taps
    # from batch 2, AVX-512's blocks also take up to 144 taps where taps x output channels stay within 3200
    # (the 5x5 case: 125 x 12); not at batch 1, nor past 3200 (144 x 32)
    for cfg in [CONV_CASES["transposed_5x5_same"], conv_case((3, 4, 13, 15), (8, 4, 3, 3), padding=1),
                conv_case((2, 16, 9, 10), (16, 16, 3, 3), padding=1)]:
        assert paths(cfg) == (False, wide_registers), cfg
    assert paths(conv_case((1, 16, 9, 10), (16, 16, 3, 3), padding=1)) == (False, False)
    assert paths(conv_case((2, 16, 9, 10), (32, 16, 3, 3), padding=1)) == (False, False)


def test_strided_pointwise_reads_subsampled_x_where_meant_to():
    """The subsampled_* cases' forward runs as a pointwise layer over x subsampled (so the tests above cover it); 1x1
    layers the direct sums take, stride-1 unpadded 1x1 and larger kernels do not."""
    def chosen(cfg):
        stride, pads, dilation = conv_pads(cfg)
        return _pykernels_cpu.conv2d_reads_subsampled_x(cfg["x_shape"], cfg["w_shape"], stride, pads, dilation,
                                                        cfg["groups"])
    for name in ["subsampled_stride2", "subsampled_asym_n1", "subsampled_padding_rows", "subsampled_grouped"]:
        assert chosen(CONV_CASES[name]), name
    for name in ["one_by_one_stride2", "one_by_one_padded", "pointwise_odd", "gemm_k70_c37_strided"]:
        assert not chosen(CONV_CASES[name]), name


def test_backward_input_runs_as_transposed_forward_where_meant_to():
    """The named transposed_* cases take that path (so the tests above cover it); batch 1 of one group
    (unless the transposed forward reads wide rows), 'valid' padding, undilated 3x3 and 1x7 layers of 8
    channels (under 10 taps, under 16 channels) or over 4 MiB of weights, few-weight and Winograd layers do
    not."""
    def chosen(cfg, dtype=np.float32):
        stride, pads, dilation = conv_pads(cfg)
        return _pykernels_cpu.conv2d_backward_input_uses_transposed_forward(
            cfg["x_shape"], cfg["w_shape"], stride, pads, dilation, cfg["groups"], np.dtype(dtype).itemsize)
    for name in ["transposed_5x5_same", "transposed_3x5", "transposed_dilated", "transposed_grouped_even_kernel",
                 "transposed_asym_dilated_wide", "transposed_wide_batch1", "wide_rows_batch1", "transposed_7x1",
                 "transposed_1x7_channels_last"]:
        assert chosen(CONV_CASES[name]) and chosen(CONV_CASES[name], np.float64), name
    assert runs_channels_last(CONV_CASES["transposed_1x7_channels_last"], np.float32)
    for cfg in [conv_case((1, 5, 9, 8), (12, 5, 5, 5), padding=2), conv_case((2, 5, 9, 8), (12, 5, 5, 5)),
                conv_case((2, 8, 9, 9), (12, 8, 3, 3), padding=1),
                conv_case((2, 8, 9, 9), (12, 8, 1, 7), padding=(0, 3)),
                conv_case((2, 400, 5, 9), (400, 400, 1, 7), padding=(0, 3)),  # 4.5 MB of weights to flip
                conv_case((2, 8, 9, 9), (12, 8, 5, 5), padding=2, stride=2), CONV_CASES["lenet_5x5"],
                conv_case((8, 64, 56, 56), (64, 64, 3, 3), padding=1)]:
        assert not chosen(cfg), cfg


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", CONV_CASE_IDS)
def test_conv2d_forward_named(name, dtype):
    check_conv_forward(CONV_CASES[name], dtype, use_bias=True, seed=zlib.crc32(name.encode()))
    check_conv_forward(CONV_CASES[name], dtype, use_bias=False, seed=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", CONV_CASE_IDS)
def test_conv2d_backward_named(name, dtype):
    check_conv_backward(CONV_CASES[name], dtype, seed=11)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ISA_CASE_IDS)
def test_conv2d_both_isas(isa, name, dtype):
    assert _pykernels_cpu.active_isa() == isa
    check_conv_forward(CONV_CASES[name], dtype, use_bias=True, seed=3)
    check_conv_backward(CONV_CASES[name], dtype, seed=5)


def test_isas_agree_with_each_other(request):
    """The portable and AVX2 paths give results within float32 tolerance of each other."""
    previous = _pykernels_cpu.active_isa()
    request.addfinalizer(lambda: _pykernels_cpu.set_isa(previous))
    try:
        _pykernels_cpu.set_isa("avx2")
    except ValueError:
        pytest.skip("no AVX2/FMA on this CPU")
    cfg = CONV_CASES["gemm_k70_c37_n1"]
    x, w, b = make_conv_inputs(cfg, np.float32, True, 1)
    y_avx2 = pk.conv2d(x, w, b, **conv_kwargs(cfg))
    _pykernels_cpu.set_isa("portable")
    y_portable = pk.conv2d(x, w, b, **conv_kwargs(cfg))
    assert_close(y_portable, y_avx2.astype(np.float64), np.float32, 333)


# Few-weight layers' sums run over whole padded rows, their dropped columns meeting real values of the next
# row (direct_conv_impl.inc), and so do the wide rows of conv_rows.cpp (whose backward-weight multiplies
# those values by zeros, then recomputes a result that is not finite elsewhere); a NaN or inf must still
# reach exactly the outputs and gradients whose sums include it, as in the reference: first cell, one
# inside, the end of the first row (read by the dropped columns of other taps), the last.
DIRECT_NON_FINITE_CASES = ["depthwise", "depthwise_stride2_dilated", "depthwise_rows_7x3_dilated",
                           "few_weights_channel_blocks", "few_weights_lenet_strided", "wide_rows_batch2",
                           "wide_rows_batch1", "wide_rows_grouped",
                           # the channels across the lanes: every product, the padding's zeros included; at
                           # stride 1 backward-input runs as the transposed forward only with finite weights
                           "depthwise_lanes_3x3", "depthwise_lanes_strided", "depthwise_lanes_general",
                           # a batch of dilation phases on Winograd (which recomputes a non-finite result)
                           "dilated_phases_2", "dilated_phases_3x2", "grouped_winograd_128",
                           # F(2x2, 3x3) over a group's vectors (recomputed where not finite): 16 a group all
                           # three passes in float64 on AVX-512, 8 a group backward-weight
                           "small_groups_16", "small_groups_8_n1",
                           # and summed directly (recomputed where not finite: products with the padding)
                           "small_groups_strided"]


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("operand", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("at", ["first", "inside", "row_end", "last"])
@pytest.mark.parametrize("name", DIRECT_NON_FINITE_CASES)
def test_direct_convolution_non_finite_values_reach_exactly_their_sums(name, at, operand, bad):
    cfg = CONV_CASES[name]
    x, w, _ = make_conv_inputs(cfg, np.float64, False, 13)
    p, q = conv_out_hw(cfg)
    g = np.random.default_rng(14).standard_normal((cfg["x_shape"][0], cfg["w_shape"][0], p, q))
    target = {"x": x, "weight": w, "grad_out": g}[operand]
    index = {"first": (0, 0, 0, 0), "inside": tuple(d // 2 for d in target.shape), "row_end": (0, 0, 0, -1),
             "last": (-1, -1, -1, -1)}[at]
    target[index] = bad
    with np.errstate(invalid="ignore", over="ignore"):
        got = [pk.conv2d(x, w, **conv_kwargs(cfg)),
               *pk.conv2d_backward(g, x, w, **conv_kwargs(cfg), need_bias=False)[:2]]
        want = [ref.conv2d(x, w, **conv_kwargs(cfg)), *ref.conv2d_backward(g, x, w, **conv_kwargs(cfg))[:2]]
    for what, a, b in zip(["y", "grad_x", "grad_w"], got, want):
        assert np.array_equal(np.isnan(a), np.isnan(b)), what
        assert np.array_equal(np.isinf(a), np.isinf(b)), what
        finite = np.isfinite(b)
        np.testing.assert_allclose(np.where(finite, a, 0), np.where(finite, b, 0), rtol=1e-10, atol=1e-10,
                                   err_msg=what)
    if at in ("first", "inside"):  # read by some window in every case (the others may not be, with strides)
        assert not all(np.isfinite(b).all() for b in want)


# The channels-last passes (float32 only) multiply exactly im2col's products, padding zeros included: a NaN
# or inf reaches the outputs and gradients the reference's sums reach, no more and no fewer. The first case
# takes the channels-last forward, the second its backward-input and backward-weight, the last two the
# grouped passes (the tests above assert which).
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("operand", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("at", ["first", "inside", "last"])
@pytest.mark.parametrize("name", ["channels_last_strided", "channels_last_backward_blocks", "channels_last_grouped",
                                  "channels_last_grouped_32"])
def test_channels_last_non_finite_values_reach_exactly_their_sums(name, at, operand, bad):
    cfg = CONV_CASES[name]
    x, w, _ = make_conv_inputs(cfg, np.float32, False, 15)
    p, q = conv_out_hw(cfg)
    g = np.random.default_rng(16).standard_normal((cfg["x_shape"][0], cfg["w_shape"][0], p, q)).astype(np.float32)
    target = {"x": x, "weight": w, "grad_out": g}[operand]
    index = {"first": (0, 0, 0, 0), "inside": tuple(d // 2 for d in target.shape), "last": (-1, -1, -1, -1)}[at]
    target[index] = bad
    with np.errstate(invalid="ignore", over="ignore"):
        got = [pk.conv2d(x, w, **conv_kwargs(cfg)),
               *pk.conv2d_backward(g, x, w, **conv_kwargs(cfg), need_bias=False)[:2]]
        x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
        want = [ref.conv2d(x64, w64, **conv_kwargs(cfg)),
                *ref.conv2d_backward(g64, x64, w64, **conv_kwargs(cfg))[:2]]
    for what, a, b in zip(["y", "grad_x", "grad_w"], got, want):
        assert np.array_equal(np.isnan(a), np.isnan(b)), what
        assert np.array_equal(np.isinf(a), np.isinf(b)), what


def test_conv2d_backward_need_flags():
    cfg = CONV_CASES["grouped_3"]
    x, w, _ = make_conv_inputs(cfg, np.float64, False, 2)
    p, q = conv_out_hw(cfg)
    go = np.random.default_rng(3).standard_normal((2, 9, p, q))
    full = pk.conv2d_backward(go, x, w, **conv_kwargs(cfg))
    for flags in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        got = pk.conv2d_backward(go, x, w, **conv_kwargs(cfg), need_input=flags[0], need_weight=flags[1],
                                 need_bias=flags[2])
        for asked, g, f in zip(flags, got, full):
            if asked:
                np.testing.assert_array_equal(g, f)
            else:
                assert g is None


# ---- relu ----------------------------------------------------------------------------------------------

def relu_data(shape, dtype, seed, specials=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if specials and x.size:
        flat = x.reshape(-1)
        picks = rng.integers(0, flat.size, size=max(1, flat.size // 8))
        flat[picks] = rng.choice([0.0, -0.0, np.nan, np.inf, -np.inf], size=picks.size)
    return x.astype(dtype)


@SETTINGS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31))
def test_relu_random(shape, dtype, seed):
    x = relu_data(shape, dtype, seed)
    y = pk.relu(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, ref.relu(x).astype(dtype))
    go = relu_data(shape, dtype, seed + 1, specials=False)
    for yy in (x, y):  # relu_backward accepts relu's input or its output
        gx = pk.relu_backward(go, yy)
        assert gx.dtype == dtype
        np.testing.assert_array_equal(gx, ref.relu_backward(go, yy).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(8, 64, 56, 56), (1, 1, 1, 65537), (3, 5, 7, 11), (2, 1, 1, 17), (65536 * 2 + 3,)],
                         ids=["relu_vgg", "parallel_threshold_plus1", "odd", "tail17", "flat_large_odd"])
def test_relu_named(shape, dtype):
    x = relu_data(shape, dtype, 4)
    y = pk.relu(x)
    np.testing.assert_array_equal(y, ref.relu(x).astype(dtype))
    go = relu_data(shape, dtype, 5, specials=False)
    np.testing.assert_array_equal(pk.relu_backward(go, x), ref.relu_backward(go, x).astype(dtype))


# ---- max_pool2d ----------------------------------------------------------------------------------------

def pool_data(shape, dtype, seed, kind):
    """'normal' values, 'ties' (small integers, many equal maxima) or 'specials' (ties plus NaN and +-inf)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(shape)
    else:
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
        if kind == "specials" and x.size:
            flat = x.reshape(-1)
            picks = rng.integers(0, flat.size, size=max(1, flat.size // 6))
            flat[picks] = rng.choice([np.nan, np.inf, -np.inf, -np.inf], size=picks.size)
    return x.astype(dtype)


def pool_kwargs(cfg) -> dict:
    return dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], padding=cfg["padding"],
                dilation=cfg["dilation"], ceil_mode=cfg["ceil_mode"])


def pool_case(x_shape, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return dict(x_shape=tuple(x_shape), kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=ceil_mode)


def check_pool(cfg, dtype, seed, kind, want=None):
    """Forward values and indices exactly equal to the reference's, backward close to it."""
    x = pool_data(cfg["x_shape"], dtype, seed, kind)
    if want is None:
        want = ref.max_pool2d(x, **pool_kwargs(cfg))
    want_y, want_i = want
    y, idx = pk.max_pool2d(x, **pool_kwargs(cfg), return_indices=True)
    assert y.dtype == np.dtype(dtype) and idx.dtype == np.int64
    assert y.shape == want_y.shape and idx.shape == want_i.shape, (cfg, y.shape, want_y.shape)
    np.testing.assert_array_equal(y, want_y.astype(dtype), err_msg=f"max_pool2d values {cfg}")
    np.testing.assert_array_equal(idx, want_i, err_msg=f"max_pool2d indices {cfg}")
    np.testing.assert_array_equal(pk.max_pool2d(x, **pool_kwargs(cfg)), y)  # without return_indices
    go = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
    gx = pk.max_pool2d_backward(go, idx, x.shape, **pool_kwargs(cfg))
    want_gx = ref.max_pool2d_backward(go, want_i, x.shape, **pool_kwargs(cfg))
    kh, kw = ref._pair(cfg["kernel_size"])
    assert_close(gx, want_gx, dtype, kh * kw, f"max_pool2d_backward {cfg}")


@st.composite
def pool_configs(draw, max_extra=8):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kernel = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    stride = draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = dh if dh == dw and draw(st.booleans()) else (dh, dw)
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    # Begin padding up to span - 1 (beyond PyTorch's k/2 limit, but the first window still touches the input).
    pad_kind = draw(st.sampled_from(["int", "pair", "asym", "same", "valid"]))
    if pad_kind == "int":
        p = draw(st.integers(0, min(span_h, span_w) - 1))
        padding, pads = p, (p, p, p, p)
    elif pad_kind == "pair":
        ph, pw = draw(st.integers(0, span_h - 1)), draw(st.integers(0, span_w - 1))
        padding, pads = (ph, pw), (ph, ph, pw, pw)
    elif pad_kind == "asym":
        pads = (draw(st.integers(0, span_h - 1)), draw(st.integers(0, span_h)),
                draw(st.integers(0, span_w - 1)), draw(st.integers(0, span_w)))
        padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    else:
        padding, pads = pad_kind, (0, 0, 0, 0)
    h_min = 1 if pad_kind == "same" else max(1, span_h - pads[0] - pads[1])
    w_min = 1 if pad_kind == "same" else max(1, span_w - pads[2] - pads[3])
    h = draw(st.integers(h_min, h_min + max_extra))
    w = draw(st.integers(w_min, w_min + max_extra))
    return pool_case((n, c, h, w), kernel, stride, padding, dilation, draw(st.booleans()))


@settings(SETTINGS, max_examples=150)
@given(cfg=pool_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       kind=st.sampled_from(["normal", "ties", "specials"]))
def test_max_pool2d_random(cfg, dtype, seed, kind):
    x = pool_data(cfg["x_shape"], dtype, seed, kind)
    try:
        want = ref.max_pool2d(x, **pool_kwargs(cfg))
    except ValueError:  # a window wholly in the padding: invalid (test_bad_inputs covers the error)
        assume(False)
    check_pool(cfg, dtype, seed, kind, want)


POOL_CASES = {
    "pool2x2_vgg_small": pool_case((2, 8, 56, 56), 2),
    "pool3x3s2_stem_small": pool_case((2, 4, 112, 112), 3, 2, 1),
    # 3x3/2 rows wholly inside x take pool_row_interior_3x3s2; no left padding, odd width, two rows of
    # padding at the bottom
    "k3_s2_unpadded_left_odd_width": pool_case((2, 3, 15, 53), 3, 2, ((0, 2), (0, 1))),
    "ceil_last_window_in_padding": pool_case((1, 2, 5, 5), 2, 2, 1, ceil_mode=True),
    "ceil_k1_s2": pool_case((1, 2, 6, 6), 1, 2, ceil_mode=True),
    "ceil_k3_s2_odd": pool_case((2, 3, 8, 9), 3, 2, ceil_mode=True),
    "ceil_dilated": pool_case((1, 1, 8, 7), 3, 2, dilation=2, ceil_mode=True),
    "ceil_asym_padding": pool_case((1, 2, 7, 6), (2, 3), (2, 2), ((1, 0), (0, 2)), ceil_mode=True),
    # windows 5 wide on 4 columns: ceil_mode's first window runs past the end (PyTorch's rule, found by fuzzing)
    "ceil_window_longer_than_input": pool_case((2, 3, 14, 4), 5, 3, ceil_mode=True),
    "padding_beyond_torch_limit": pool_case((1, 2, 7, 6), 3, 1, 2),
    "padding_beyond_torch_limit_dilated": pool_case((1, 2, 9, 9), 3, 2, 4, dilation=2),
    "padding_beyond_limit_asym": pool_case((2, 1, 6, 5), (3, 4), 1, ((2, 2), (3, 1))),
    "same_odd_total_stride2": pool_case((1, 3, 10, 9), 3, 2, "same"),
    "same_k2_s2_odd_input": pool_case((2, 2, 7, 7), 2, 2, "same"),
    "same_stride3": pool_case((1, 2, 11, 10), (4, 3), 3, "same"),
    "valid_k3_s1": pool_case((1, 2, 9, 10), 3, 1, "valid"),
    "non_square_stride_dilation": pool_case((2, 3, 13, 11), (2, 3), (3, 1), (1, 1), dilation=(2, 3)),
    "width_33_channels_17": pool_case((1, 17, 9, 33), 2),
    "window_equals_input": pool_case((2, 2, 5, 6), (5, 6)),
    "kernel1": pool_case((1, 3, 4, 5), 1),
    "one_pixel": pool_case((1, 1, 1, 1), 1),
    "one_pixel_padded": pool_case((1, 1, 1, 1), 3, 1, 1),
}


@pytest.mark.parametrize("kind", ["normal", "ties", "specials"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_max_pool2d_named(name, dtype, kind):
    check_pool(POOL_CASES[name], dtype, 21, kind)


def output_order_sum(go, idx, input_shape):
    """max_pool2d_backward as the plain scatter in output order, in go's own dtype: the sum the kernels
    promise bit for bit, whether they scatter or gather."""
    N, C, H, W = input_shape
    gx = np.zeros((N * C, H * W), dtype=go.dtype)
    g, ind = go.reshape(N * C, -1), idx.reshape(N * C, -1)
    for o in range(g.shape[1]):
        np.add.at(gx, (np.arange(N * C), ind[:, o]), g[:, o])
    return gx.reshape(input_shape)


# Windows two columns wide tiling rows of at least 16 of them take the gather path (AVX2 and AVX-512
# builds); the rest the scatter (with 2- and 3-row vectorised checks)
BACKWARD_PATH_CASES = {
    "k2s2_even": pool_case((2, 3, 8, 34), 2),
    "k2s2_odd_sizes": pool_case((1, 2, 9, 35), 2),
    "k2s2_left_top_padding": pool_case((2, 2, 9, 33), 2, 2, 1),
    "k2s2_ceil": pool_case((1, 3, 7, 33), 2, ceil_mode=True),
    "k2s2_same": pool_case((1, 2, 7, 33), 2, 2, "same"),
    "k3x2_s3x2": pool_case((1, 2, 10, 40), (3, 2), (3, 2), ((1, 1), (1, 0))),
    "k2_long_rows": pool_case((1, 1, 4, 70), 2),
    "k2s2_short_rows": pool_case((2, 3, 8, 12), 2),
    "k3s2_pad1": pool_case((2, 3, 15, 17), 3, 2, 1),
    "k2s1": pool_case((1, 2, 8, 9), 2, 1),
    "k3s1_pad1": pool_case((1, 2, 9, 10), 3, 1, 1),
    "k4s2": pool_case((1, 2, 12, 13), 4, 2, 1),
    "dilated": pool_case((1, 2, 11, 13), 3, 2, 2, dilation=2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(BACKWARD_PATH_CASES))
def test_max_pool2d_every_isa(isa, name, dtype):
    """Forward and backward on each instruction-set build: the forward matches the reference exactly, the
    backward is the output-order sum bit for bit (+0, not -0, for a cell given only -0)."""
    cfg = BACKWARD_PATH_CASES[name]
    x = pool_data(cfg["x_shape"], dtype, 3, "ties")
    want_y, want_i = ref.max_pool2d(x, **pool_kwargs(cfg))
    y, idx = pk.max_pool2d(x, **pool_kwargs(cfg), return_indices=True)
    np.testing.assert_array_equal(y, want_y.astype(dtype))
    np.testing.assert_array_equal(idx, want_i)
    go = np.random.default_rng(4).standard_normal(y.shape).astype(dtype)
    go.reshape(-1)[::5] = -0.0
    gx = pk.max_pool2d_backward(go, idx, x.shape, **pool_kwargs(cfg))
    want = output_order_sum(go, idx, x.shape)
    np.testing.assert_array_equal(gx, want)
    assert not np.signbit(gx[gx == 0]).any()
    assert_close(gx, ref.max_pool2d_backward(go, idx, x.shape, **pool_kwargs(cfg)), dtype, 4, name)


@pytest.mark.parametrize("name", list(BACKWARD_PATH_CASES))
def test_max_pool2d_backward_first_bad_index_every_isa(isa, name):
    """Several bad indices: the error names the first in flat order, on every build and both paths."""
    cfg = BACKWARD_PATH_CASES[name]
    x = pool_data(cfg["x_shape"], np.float32, 5, "normal")
    y, idx = pk.max_pool2d(x, **pool_kwargs(cfg), return_indices=True)
    H, W = cfg["x_shape"][2:]
    flat = idx.reshape(-1)
    rng = np.random.default_rng(6)
    for first in sorted(rng.choice(flat.size, size=3, replace=False)):
        bad = idx.copy()
        later = rng.integers(first, flat.size, size=2)
        for at in (first, *later):
            bad.reshape(-1)[at] = H * W + at  # past the plane: never a cell of any window
        where = ", ".join(str(int(i)) for i in np.unravel_index(first, idx.shape))
        with pytest.raises(ValueError, match=rf"indices\[{where}\]"):
            pk.max_pool2d_backward(y, bad, x.shape, **pool_kwargs(cfg))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (1, 1, 1, 65537), (2, 3, 64, 67)], ids=["odd", "threshold", "tails"])
def test_relu_every_isa(isa, shape, dtype):
    x = relu_data(shape, dtype, 7)
    y = pk.relu(x)
    np.testing.assert_array_equal(y, ref.relu(x).astype(dtype))
    assert not np.signbit(y[y == 0]).any()  # relu(-0) is +0
    go = relu_data(shape, dtype, 8, specials=False)
    np.testing.assert_array_equal(pk.relu_backward(go, x), ref.relu_backward(go, x).astype(dtype))
    y_in_place = x.copy()
    pk.relu(y_in_place, out=y_in_place)
    np.testing.assert_array_equal(y_in_place, y)


def test_pool_output_sizes_match_reference_and_cpp():
    for name, cfg in POOL_CASES.items():
        y, _ = ref.max_pool2d(np.zeros(cfg["x_shape"]), **pool_kwargs(cfg))
        geo = pk._args.pool2d_geometry(cfg["x_shape"], cfg["kernel_size"], cfg["stride"], cfg["padding"],
                                       cfg["dilation"], cfg["ceil_mode"])
        assert geo.out_shape == y.shape, name
        cpp = _pykernels_cpu.pool2d_output_shape(geo.x_shape, *geo.kernel_args())
        assert tuple(cpp) == y.shape, name


# ---- out=, non-contiguous and negatively strided inputs ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_conv2d_out_is_written_and_returned(dtype):
    cfg = CONV_CASES["asym_padding"]
    x, w, b = make_conv_inputs(cfg, dtype, True, 8)
    expected = pk.conv2d(x, w, b, **conv_kwargs(cfg))
    out = np.full(expected.shape, np.nan, dtype=dtype)
    got = pk.conv2d(x, w, b, **conv_kwargs(cfg), out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    assert_close(out, ref.conv2d(x, w, b, **conv_kwargs(cfg)), dtype, 3 * 3 * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_relu_out_is_written_and_returned(dtype):
    x = relu_data((2, 3, 5, 7), dtype, 9)
    out = np.full_like(x, 123.0)
    got = pk.relu(x, out=out)
    assert got is out
    np.testing.assert_array_equal(out, ref.relu(x).astype(dtype))
    # in place: out may be x itself
    want = ref.relu(x).astype(dtype)
    got = pk.relu(x, out=x)
    assert got is x
    np.testing.assert_array_equal(x, want)


def non_contiguous_views(a, seed=0):
    """Views of `a`'s values that are not C-contiguous: negatively strided, transposed, strided."""
    views = {"flipped_w": a[..., ::-1].copy()[..., ::-1],
             "transposed": np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)}
    strided = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    strided[..., ::2] = a
    views["strided"] = strided[..., ::2]
    if a.ndim == 4:
        views["fortran"] = np.asfortranarray(a)
        views["flipped_hw"] = a[:, :, ::-1, ::-1].copy()[:, :, ::-1, ::-1]
    for name, v in views.items():
        assert not v.flags.c_contiguous, name
        np.testing.assert_array_equal(v, a)
    return views


def test_conv2d_non_contiguous_inputs():
    cfg = CONV_CASES["asym_padding_strided_dilated"]
    x, w, b = make_conv_inputs(cfg, np.float32, True, 12)
    want = pk.conv2d(x, w, b, **conv_kwargs(cfg))
    p, q = conv_out_hw(cfg)
    go = np.random.default_rng(13).standard_normal(want.shape).astype(np.float32)
    want_grads = pk.conv2d_backward(go, x, w, **conv_kwargs(cfg))
    xs, ws, gos = non_contiguous_views(x), non_contiguous_views(w), non_contiguous_views(go)
    bs = {"strided": np.repeat(b, 2)[::2], "reversed": b[::-1].copy()[::-1]}
    for name in xs:
        np.testing.assert_array_equal(pk.conv2d(xs[name], w, b, **conv_kwargs(cfg)), want, err_msg=f"x {name}")
        np.testing.assert_array_equal(pk.conv2d(x, ws[name], b, **conv_kwargs(cfg)), want, err_msg=f"w {name}")
        grads = pk.conv2d_backward(gos[name], xs[name], ws[name], **conv_kwargs(cfg))
        for g, wg in zip(grads, want_grads):
            np.testing.assert_array_equal(g, wg, err_msg=f"backward {name}")
    for name, bb in bs.items():
        assert not bb.flags.c_contiguous or bb.strides[0] < 0
        np.testing.assert_array_equal(pk.conv2d(x, w, bb, **conv_kwargs(cfg)), want, err_msg=f"bias {name}")


def test_conv2d_negatively_strided_views_of_other_data():
    """x[:, :, ::-1] and a transposed view give the answer for the data they show (not their base)."""
    rng = np.random.default_rng(14)
    base = rng.standard_normal((2, 3, 9, 8))
    w = rng.standard_normal((4, 3, 3, 2))
    for view in (base[:, :, ::-1], base[:, :, :, ::-1], base.transpose(0, 1, 3, 2), base[:, ::-1, 1::2, ::-2]):
        got = pk.conv2d(view, w, padding=1, stride=(1, 2))
        np.testing.assert_array_equal(got, pk.conv2d(np.ascontiguousarray(view), w, padding=1, stride=(1, 2)))
        assert_close(got, ref.conv2d(view, w, padding=1, stride=(1, 2)), np.float64, 18)


def test_broadcast_views_are_accepted():
    """Stride-0 views (np.broadcast_to) are valid inputs: copied once, same answer as the materialised array."""
    rng = np.random.default_rng(20)
    x = np.broadcast_to(rng.standard_normal((1, 3, 6, 5)), (3, 3, 6, 5))
    w = np.broadcast_to(rng.standard_normal((1, 3, 3, 3)), (4, 3, 3, 3))
    b = np.broadcast_to(np.float64(0.5), (4,))
    got = pk.conv2d(x, w, b, padding=1)
    np.testing.assert_array_equal(got, pk.conv2d(x.copy(), w.copy(), b.copy(), padding=1))
    assert_close(got, ref.conv2d(x, w, b, padding=1), np.float64, 27)
    y, idx = pk.max_pool2d(x, 2, return_indices=True)
    ry, ri = ref.max_pool2d(x, 2)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ri)
    np.testing.assert_array_equal(pk.relu(x), ref.relu(x))


def test_relu_non_contiguous_inputs():
    x = relu_data((2, 3, 5, 7), np.float64, 15)
    go = relu_data((2, 3, 5, 7), np.float64, 16, specials=False)
    want_y, want_g = pk.relu(x), pk.relu_backward(go, x)
    for (name, xv), gv in zip(non_contiguous_views(x).items(), non_contiguous_views(go).values()):
        np.testing.assert_array_equal(pk.relu(xv), want_y, err_msg=name)
        np.testing.assert_array_equal(pk.relu_backward(gv, xv), want_g, err_msg=name)
    view = x[:, :, ::-1]
    np.testing.assert_array_equal(pk.relu(view), ref.relu(view))


def test_max_pool2d_non_contiguous_inputs():
    cfg = POOL_CASES["ceil_asym_padding"]
    x = pool_data(cfg["x_shape"], np.float32, 17, "specials")
    want_y, want_i = pk.max_pool2d(x, **pool_kwargs(cfg), return_indices=True)
    go = np.random.default_rng(18).standard_normal(want_y.shape).astype(np.float32)
    want_g = pk.max_pool2d_backward(go, want_i, x.shape, **pool_kwargs(cfg))
    for (name, xv), gv, iv in zip(non_contiguous_views(x).items(), non_contiguous_views(go).values(),
                                  non_contiguous_views(want_i).values()):
        y, i = pk.max_pool2d(xv, **pool_kwargs(cfg), return_indices=True)
        np.testing.assert_array_equal(y, want_y, err_msg=name)
        np.testing.assert_array_equal(i, want_i, err_msg=name)
        np.testing.assert_array_equal(pk.max_pool2d_backward(gv, iv, x.shape, **pool_kwargs(cfg)), want_g, err_msg=name)
    view = x[:, :, ::-1]
    y, i = pk.max_pool2d(view, **pool_kwargs(cfg), return_indices=True)
    ry, ri = ref.max_pool2d(view, **pool_kwargs(cfg))
    np.testing.assert_array_equal(y, ry.astype(np.float32))
    np.testing.assert_array_equal(i, ri)


# ---- empty batch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["asym_padding", "pointwise_odd", "grouped_3", "depthwise", "wide_rows_batch2",
                                  "wide_rows_grouped", "transposed_5x5_same", "rows_per_image_deep",
                                  "grouped_direct_8", "vgg_3x3_64_small"])
def test_conv2d_empty_batch(name, dtype):
    cfg = dict(CONV_CASES[name])
    cfg["x_shape"] = (0,) + cfg["x_shape"][1:]
    x, w, b = make_conv_inputs(cfg, dtype, True, 19)
    p, q = conv_out_hw(cfg)
    k = cfg["w_shape"][0]
    y = pk.conv2d(x, w, b, **conv_kwargs(cfg))
    assert y.shape == (0, k, p, q) and y.dtype == dtype
    go = np.zeros((0, k, p, q), dtype=dtype)
    gx, gw, gb = pk.conv2d_backward(go, x, w, **conv_kwargs(cfg))
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and gw.dtype == dtype
    assert gb.shape == (k,) and gb.dtype == dtype
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    np.testing.assert_array_equal(gb, np.zeros(k, dtype=dtype))
    # and the same through the reference
    want_gx, want_gw, want_gb = ref.conv2d_backward(go, x, w, **conv_kwargs(cfg))
    assert want_gw.shape == gw.shape and not want_gw.any()


# (C, K, H = W, kernel, stride, dilation, groups) reaching every path of the dispatch: Winograd F(4x4) and
# F(2x2), streamed filters, split 5x5, strided and dilated layers, depthwise and grouped ones, pointwise.
# Float64 64 -> 64 channels on 8x8 died of SIGFPE at batch 0 (a path divided by its count of tiles).
EMPTY_BATCH_LAYERS = [(3, 8, 40, 7, 2, 1, 1), (32, 64, 16, 3, 2, 1, 1), (128, 128, 14, 3, 2, 1, 8),
                      (64, 64, 10, 3, 1, 1, 64), (32, 32, 10, 5, 1, 1, 32), (16, 16, 16, 3, 1, 2, 1),
                      (96, 96, 14, 3, 1, 1, 2), (96, 256, 27, 5, 1, 1, 2), (512, 512, 7, 3, 1, 1, 1),
                      (64, 64, 6, 3, 1, 1, 1), (64, 64, 8, 3, 1, 1, 1), (16, 24, 7, 1, 2, 1, 1),
                      (16, 24, 7, 1, 1, 1, 1),
                      (64, 64, 14, 5, 1, 1, 1), (1, 6, 28, 5, 1, 1, 1), (256, 256, 7, 1, 1, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layer", EMPTY_BATCH_LAYERS, ids=str)
def test_conv2d_empty_batch_on_every_path(layer, dtype):
    c, k, hw, r, stride, dilation, groups = layer
    x = np.zeros((0, c, hw, hw), dtype)
    w = np.random.default_rng(3).standard_normal((k, c // groups, r, r)).astype(dtype)
    kw = dict(stride=stride, padding=r // 2 * dilation, dilation=dilation, groups=groups)
    y = pk.conv2d(x, w, **kw)
    assert y.shape == ref.conv2d(x, w, **kw).shape and y.dtype == dtype
    gx, gw, gb = pk.conv2d_backward(np.zeros(y.shape, dtype), x, w, **kw)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (k,)
    assert not gw.any() and not gb.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_relu_and_pool_empty_batch(dtype):
    x = np.zeros((0, 3, 5, 5), dtype=dtype)
    y = pk.relu(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert pk.relu_backward(x, x).shape == x.shape
    y, idx = pk.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert y.shape == (0, 3, 3, 3) and y.dtype == dtype and idx.shape == y.shape and idx.dtype == np.int64
    gx = pk.max_pool2d_backward(y, idx, x.shape, 3, 2, 1)
    assert gx.shape == x.shape and gx.dtype == dtype
