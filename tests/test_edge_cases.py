"""Edge cases that similar libraries have shipped bugs in: NaN/-inf/ties in max-pool, ReLU at NaN and at 0,
TensorFlow 'same' padding, ceil_mode sizes, 64-bit index maths, determinism and thread safety.

Expected values are written out by hand (or by pykernels.reference where stated), never taken from
the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import _pykernels_cpu
import pykernels as pk
from pykernels import _args
from pykernels import reference as ref

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
NAN, INF = float("nan"), float("inf")


def plane(rows, dtype):
    """A (1, 1, H, W) array from a nested list."""
    return np.array(rows, dtype=dtype)[None, None]


# ---- max_pool2d: NaN, -inf, ties -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_all_nan_windows(dtype):
    x = np.full((2, 3, 4, 6), NAN, dtype=dtype)
    y, idx = pk.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y).all()
    # each 2x2 window's first cell: (2p, 2q) -> 2p * 6 + 2q
    expected = np.array([[0, 2, 4], [12, 14, 16]], dtype=np.int64)
    np.testing.assert_array_equal(idx, np.broadcast_to(expected, idx.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_all_nan_windows_with_padding(dtype):
    x = np.full((1, 2, 5, 5), NAN, dtype=dtype)
    y, idx = pk.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert y.shape == (1, 2, 3, 3) and np.isnan(y).all()
    first = [0, 1, 3]  # first in-bounds row/col of windows starting at -1, 1, 3
    expected = np.array([[r * 5 + c for c in first] for r in first], dtype=np.int64)
    np.testing.assert_array_equal(idx, np.broadcast_to(expected, idx.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_all_minus_inf_windows_get_first_in_bounds_cell(dtype):
    x = np.full((1, 1, 4, 4), -INF, dtype=dtype)
    y, idx = pk.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert y.shape == (1, 1, 2, 2) and (y == -INF).all()
    # windows start at rows/cols -1 and 1: first in-bounds cells are 0 and 1
    np.testing.assert_array_equal(idx[0, 0], [[0, 1], [4, 5]])
    assert (idx >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_all_minus_inf_large_padding_and_dilation(dtype):
    # padding 4 > kernel/2 with dilation 2: window 0 covers -4, -2, 0 -> only cell 0 is inside
    x = np.full((1, 1, 6, 6), -INF, dtype=dtype)
    y, idx = pk.max_pool2d(x, 3, 3, 4, dilation=2, return_indices=True)
    ry, ri = ref.max_pool2d(x, 3, 3, 4, dilation=2)
    assert (idx >= 0).all() and (y == -INF).all()
    np.testing.assert_array_equal(idx, ri)
    # 4 windows starting at -4, -1, 2, 5: rows {0}, {1, 3}, {2, 4}, {5} -> first in-bounds 0, 1, 2, 5
    assert y.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, 2, 5])
    np.testing.assert_array_equal(idx[0, 0, :, 0], [0, 6, 12, 30])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_all_minus_inf_ceil_mode(dtype):
    x = np.full((1, 1, 5, 5), -INF, dtype=dtype)
    y, idx = pk.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)
    assert y.shape == (1, 1, 3, 3)
    # windows start at -1, 1, 3: first in-bounds 0, 1, 3
    np.testing.assert_array_equal(idx[0, 0], [[0, 1, 3], [5, 6, 8], [15, 16, 18]])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_nan_not_first_gets_first_nan_index(dtype):
    x = plane([[1.0, 5.0, 9.0, NAN],
               [NAN, 7.0, NAN, 2.0]], dtype)
    y, idx = pk.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y).all()
    # window 0: NaN at (1, 0) -> 1*4 + 0 = 4; window 1: first NaN in row-major order is (0, 3) = 3
    np.testing.assert_array_equal(idx[0, 0], [[4, 3]])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_nan_after_larger_value_and_inf(dtype):
    x = plane([[INF, 3.0, 1.0],
               [2.0, 8.0, 0.0],
               [0.0, NAN, NAN]], dtype)
    y, idx = pk.max_pool2d(x, 3, return_indices=True)
    assert np.isnan(y[0, 0, 0, 0])
    assert idx[0, 0, 0, 0] == 7  # (2, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_nan_propagates_with_padding_and_dilation(dtype):
    x = np.arange(49, dtype=dtype).reshape(1, 1, 7, 7)
    x[0, 0, 3, 1] = NAN  # windows start at -1, 1, 3 and read odd rows/columns only
    y, idx = pk.max_pool2d(x, 3, 2, 1, dilation=2, return_indices=True)
    ry, ri = ref.max_pool2d(x, 3, 2, 1, dilation=2)
    np.testing.assert_array_equal(y, ry.astype(dtype))
    np.testing.assert_array_equal(idx, ri)
    nan_windows = np.isnan(y[0, 0])
    assert nan_windows.any()
    assert nan_windows.sum() == 6 and (idx[0, 0][nan_windows] == 3 * 7 + 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_ties_go_to_first_max(dtype):
    x = plane([[3.0, 3.0, 1.0, 5.0],
               [3.0, 3.0, 5.0, 5.0],
               [-1.0, 0.0, -INF, -INF],
               [0.0, 0.0, -INF, -INF]], dtype)
    y, idx = pk.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y[0, 0], [[3.0, 5.0], [0.0, -INF]])
    np.testing.assert_array_equal(idx[0, 0], [[0, 3], [9, 10]])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_ties_overlapping_windows_and_backward(dtype):
    x = np.ones((1, 1, 4, 4), dtype=dtype)
    y, idx = pk.max_pool2d(x, 2, 1, return_indices=True)
    # every window's first cell wins
    np.testing.assert_array_equal(idx[0, 0], [[0, 1, 2], [4, 5, 6], [8, 9, 10]])
    gx = pk.max_pool2d_backward(np.ones_like(y), idx, x.shape, 2, 1)
    expected = np.zeros((4, 4), dtype=dtype)
    expected[:3, :3] = 1.0
    np.testing.assert_array_equal(gx[0, 0], expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_backward_sums_cells_chosen_by_several_windows(dtype):
    x = plane([[0.0, 0.0, 0.0, 0.0],
               [0.0, 9.0, 0.0, 0.0],
               [0.0, 0.0, 0.0, 0.0]], dtype)
    y, idx = pk.max_pool2d(x, 2, 1, return_indices=True)
    go = np.arange(1, 7, dtype=dtype).reshape(1, 1, 2, 3)
    gx = pk.max_pool2d_backward(go, idx, x.shape, 2, 1)
    # cell (1, 1) is the max of windows (0,0), (0,1), (1,0), (1,1): 1 + 2 + 4 + 5
    assert gx[0, 0, 1, 1] == 12.0
    np.testing.assert_array_equal(gx, ref.max_pool2d_backward(go, idx, x.shape, 2, 1).astype(dtype))


# ---- relu ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_nan_is_nan(dtype):
    x = np.array([NAN, -NAN, 1.0, -1.0, 0.0, -0.0, INF, -INF] * 5, dtype=dtype)  # 40: SIMD body and tail
    y = pk.relu(x)
    assert np.isnan(y[0::8]).all() and np.isnan(y[1::8]).all()
    np.testing.assert_array_equal(y[2::8], 1.0)
    np.testing.assert_array_equal(y[3::8], 0.0)
    np.testing.assert_array_equal(y[4::8], 0.0)
    np.testing.assert_array_equal(y[5::8], 0.0)
    np.testing.assert_array_equal(y[6::8], INF)
    np.testing.assert_array_equal(y[7::8], 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_nan_is_nan_in_large_parallel_array(dtype):
    x = np.full((3, 1, 1, 1 << 16), -1.0, dtype=dtype)
    x[1, 0, 0, 12345] = NAN
    y = pk.relu(x)
    assert np.isnan(y[1, 0, 0, 12345])
    assert np.isnan(y).sum() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_backward_at_zero_is_zero(dtype):
    y = np.array([0.0, -0.0, 1e-30, -1e-30, NAN, 2.0, INF, -INF] * 3, dtype=dtype)
    if dtype == np.float32:
        y[2::8] = np.float32(1e-45)  # smallest float32 subnormal: still > 0
    go = np.full(y.shape, 7.0, dtype=dtype)
    gx = pk.relu_backward(go, y)
    np.testing.assert_array_equal(gx[0::8], 0.0)   # y == 0
    np.testing.assert_array_equal(gx[1::8], 0.0)   # y == -0
    np.testing.assert_array_equal(gx[2::8], 7.0)   # tiny positive
    np.testing.assert_array_equal(gx[3::8], 0.0)
    np.testing.assert_array_equal(gx[4::8], 0.0)   # y NaN: not > 0
    np.testing.assert_array_equal(gx[5::8], 7.0)
    np.testing.assert_array_equal(gx[6::8], 7.0)
    np.testing.assert_array_equal(gx[7::8], 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_backward_passes_nan_gradient_where_y_positive(dtype):
    go = np.array([NAN, NAN, 1.0], dtype=dtype)
    y = np.array([1.0, 0.0, NAN], dtype=dtype)
    gx = pk.relu_backward(go, y)
    assert np.isnan(gx[0]) and gx[1] == 0.0 and gx[2] == 0.0


# ---- 'same' padding and ceil_mode sizes ----------------------------------------------------------------

def test_same_padding_224_k7_s2():
    geo = _args.conv2d_geometry((1, 3, 224, 224), (64, 3, 7, 7), stride=2, padding="same", dilation=1, groups=1)
    assert geo.padding == (2, 3, 2, 3)
    assert geo.out_shape == (1, 64, 112, 112)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_conv_equals_explicit_asymmetric_padding(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 224, 224)).astype(dtype)
    w = rng.standard_normal((3, 2, 7, 7)).astype(dtype)
    y_same = pk.conv2d(x, w, stride=2, padding="same")
    y_explicit = pk.conv2d(x, w, stride=2, padding=((2, 3), (2, 3)))
    assert y_same.shape == (1, 3, 112, 112)
    np.testing.assert_array_equal(y_same, y_explicit)
    # and not the symmetric padding 3 (which would shift the windows)
    y_sym = pk.conv2d(x, w, stride=2, padding=3)
    assert y_sym.shape == (1, 3, 112, 112)
    assert not np.allclose(y_same, y_sym)
    # first output pixel: rows/cols -2..4 -> x[0:5, 0:5] against w[2:7, 2:7]
    first = np.einsum("chw,kchw->k", x[0, :, :5, :5].astype(np.float64), w[:, :, 2:, 2:].astype(np.float64))
    np.testing.assert_allclose(y_same[0, :, 0, 0], first, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
    # last output pixel: window starts at 111*2 - 2 = 220 -> x[220:224] against w[0:4] (3 padded rows)
    last = np.einsum("chw,kchw->k", x[0, :, 220:, 220:].astype(np.float64), w[:, :, :4, :4].astype(np.float64))
    np.testing.assert_allclose(y_same[0, :, -1, -1], last, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)


def test_same_pool_equals_explicit_asymmetric_padding():
    x = np.random.default_rng(1).standard_normal((1, 2, 224, 224))
    geo = _args.pool2d_geometry(x.shape, 7, 2, "same")
    assert geo.padding == (2, 3, 2, 3) and geo.out_shape == (1, 2, 112, 112)
    y1, i1 = pk.max_pool2d(x, 7, 2, "same", return_indices=True)
    y2, i2 = pk.max_pool2d(x, 7, 2, ((2, 3), (2, 3)), return_indices=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(i1, i2)


@pytest.mark.parametrize("size,kernel,stride,dilation,expected", [
    (224, 7, 2, 1, (2, 3)), (10, 4, 3, 1, (1, 2)), (7, 2, 2, 1, (0, 1)), (5, 3, 1, 2, (2, 2)),
    (1, 3, 3, 1, (1, 1)), (8, 1, 3, 1, (0, 0)), (9, 2, 2, 3, (1, 2))])
def test_same_padding_amounts(size, kernel, stride, dilation, expected):
    assert _args.same_padding(size, kernel, stride, dilation) == expected
    geo = _args.conv2d_geometry((1, 1, size, size), (1, 1, kernel, kernel), stride=stride, padding="same",
                                dilation=dilation, groups=1)
    assert geo.padding == expected * 2
    assert geo.out_shape[2:] == (-(-size // stride),) * 2


@pytest.mark.parametrize("size,kernel,stride,padding,expected", [
    (5, 2, 2, 1, 3),  # ceil gives 4, but window 3 would start at 6 - 1 = 5, in the end padding: dropped
    (6, 1, 2, 0, 3),  # ceil gives 4, but window 3 starts at 6 = in: dropped
    (6, 3, 2, 1, 4),
    (7, 2, 2, 0, 4),
    (4, 2, 2, 1, 3),
    (1, 2, 2, 1, 1),
    (4, 5, 3, 0, 1),  # a window longer than the input: ceil_mode's first one may run stride - 1 past the end
    (4, 6, 3, 0, 1),
    (3, 4, 2, 0, 1),
])
def test_ceil_mode_output_sizes(size, kernel, stride, padding, expected):
    x = np.zeros((1, 1, size, size), dtype=np.float32)
    y = pk.max_pool2d(x, kernel, stride, padding, ceil_mode=True)
    assert y.shape == (1, 1, expected, expected)
    assert tuple(_pykernels_cpu.pool2d_output_shape((1, 1, size, size), (kernel, kernel), (stride, stride),
                                                    (padding,) * 4, (1, 1), True)) == (1, 1, expected, expected)
    assert ref.max_pool2d(x, kernel, stride, padding, ceil_mode=True)[0].shape == y.shape


def test_ceil_mode_asymmetric_spec_cases():
    # in 5, k 2, s 2, p 1 -> 3; in 6, k 1, s 2 -> 3 (from the spec)
    assert pk.max_pool2d(np.zeros((1, 1, 5, 6)), (2, 1), (2, 2), (1, 0), ceil_mode=True).shape == (1, 1, 3, 3)


# ---- 64-bit index maths --------------------------------------------------------------------------------

def test_nchw_offset_beyond_int32():
    shape = (70000, 256, 16, 16)
    total = 70000 * 256 * 16 * 16
    assert total > 2**31
    last = tuple(d - 1 for d in shape)
    assert _pykernels_cpu.nchw_offset(last, shape) == total - 1
    n, c, h, w = 54321, 201, 7, 9
    assert _pykernels_cpu.nchw_offset((n, c, h, w), shape) == ((n * 256 + c) * 16 + h) * 16 + w
    big = (3, 5, 2**20, 2**20)  # 15 * 2^40 elements
    assert _pykernels_cpu.nchw_offset((2, 4, 2**20 - 1, 2**20 - 1), big) == 15 * 2**40 - 1


def test_conv2d_output_shape_beyond_int32():
    assert tuple(_pykernels_cpu.conv2d_output_shape((70000, 256, 16, 16), (64, 256, 3, 3), (1, 1), (1, 1, 1, 1),
                                                    (1, 1), 1)) == (70000, 64, 16, 16)
    # one spatial axis longer than 2^32
    h = 2**32 + 5
    assert tuple(_pykernels_cpu.conv2d_output_shape((1, 1, h, 1), (1, 1, 3, 1), (1, 1), (0, 0, 0, 0), (1, 1),
                                                    1)) == (1, 1, h - 2, 1)
    assert tuple(_pykernels_cpu.conv2d_output_shape((1, 2, h, 3), (4, 1, 7, 3), (2, 1), (3, 3, 1, 1), (1, 1),
                                                    2)) == (1, 4, -(-h // 2), 3)
    geo = _args.conv2d_geometry((70000, 256, 16, 16), (64, 256, 3, 3), stride=1, padding=1, dilation=1, groups=1)
    assert geo.out_shape == (70000, 64, 16, 16)


def test_pool2d_output_shape_beyond_int32():
    assert tuple(_pykernels_cpu.pool2d_output_shape((70000, 256, 16, 16), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1),
                                                    False)) == (70000, 256, 8, 8)
    assert tuple(_pykernels_cpu.pool2d_output_shape((70000, 256, 16, 16), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1),
                                                    True)) == (70000, 256, 9, 9)  # last window starts at 15
    geo = _args.pool2d_geometry((70000, 256, 16, 16), 3, 2, 1)
    assert geo.out_shape == (70000, 256, 8, 8)


# ---- determinism and thread safety ---------------------------------------------------------------------

def _workload(dtype=np.float32):
    rng = np.random.default_rng(42)
    x = rng.standard_normal((4, 16, 33, 31)).astype(dtype)
    w = rng.standard_normal((24, 16, 3, 3)).astype(dtype)
    b = rng.standard_normal(24).astype(dtype)
    go = rng.standard_normal((4, 24, 17, 16)).astype(dtype)
    return x, w, b, go


def _streamed_winograd_layer(dtype):
    # K * C > 116508: Winograd with the filters transformed block by block, the blocks sized by the
    # thread count (forward and backward-input; backward-weight takes the GEMM on such a layer)
    rng = np.random.default_rng(43)
    x = rng.standard_normal((3, 340, 17, 16)).astype(dtype)
    w = rng.standard_normal((350, 340, 3, 3)).astype(dtype)
    y = pk.conv2d(x, w, padding=1)
    return y, pk.conv2d_backward(y, x, w, padding=1, need_weight=False, need_bias=False)[0]


def _whole_chunk_winograd_forward(dtype):
    # 1.4 MB of transformed filters in float32 (2.9 MB in float64), 196 tiles: with 2 threads each takes whole
    # chunks of tiles (U of at most 4 MiB), with 1 or 5 the threads split each phase
    rng = np.random.default_rng(46)
    x = rng.standard_normal((4, 100, 28, 28)).astype(dtype)
    w = rng.standard_normal((100, 100, 3, 3)).astype(dtype)
    return pk.conv2d(x, w, padding=1)


def _batch_halves_weight_gradient(dtype):
    # N * P * Q >= 8 * C*R*S: backward-weight sums two batch halves, each on its own thread
    rng = np.random.default_rng(44)
    x = rng.standard_normal((3, 4, 40, 42)).astype(dtype)
    w = rng.standard_normal((10, 4, 3, 3)).astype(dtype)
    go = rng.standard_normal((3, 10, 20, 21)).astype(dtype)
    return pk.conv2d_backward(go, x, w, stride=2, padding=1, need_input=False, need_bias=False)[1]


def _copy_and_shared_paths(dtype):
    # forward from phase-split copies (an image per thread at batch 2; threads splitting the output rows at
    # batch 1), backward-weight packed from those copies, and batch 1 with threads splitting the GEMM's
    # rows over one shared packing of B (81 columns: a last strip of 1 on AVX2 and portable, narrow_kernel)
    rng = np.random.default_rng(45)
    x = rng.standard_normal((2, 3, 70, 90)).astype(dtype)
    w = rng.standard_normal((16, 3, 5, 5)).astype(dtype)
    assert _pykernels_cpu.conv2d_forward_reads_rows_in_place(x.shape, w.shape, (2, 2), (2, 2, 2, 2), (1, 1), 1,
                                                             x.itemsize) == "per_row"
    y = pk.conv2d(x, w, stride=2, padding=2)
    y1 = pk.conv2d(x[:1], w, stride=2, padding=2)
    gw = pk.conv2d_backward(y, x, w, stride=2, padding=2, need_input=False, need_bias=False)[1]
    xs = rng.standard_normal((1, 128, 9, 9)).astype(dtype)
    ws = rng.standard_normal((100, 128, 3, 3)).astype(dtype)
    # batch 1 with 49 output positions: the weights read in place (gemm.hpp's ReadA::rows_in_place) and the
    # last column (49 = 48 + 1 on AVX-512, 3 * 16 + 1 on AVX2) summed as dot products, with the rows split
    # between threads or not (48 input channels: too few for Winograd F(2x2))
    xt = rng.standard_normal((1, 48, 7, 7)).astype(dtype)
    wt = rng.standard_normal((100, 48, 3, 3)).astype(dtype)
    # and its backward-input at batch 1 with 37 channels: col2im split between threads by channels (49
    # positions are too few for bands of input rows), 37 not divisible by the thread count
    gt = rng.standard_normal((1, 100, 7, 7)).astype(dtype)
    wc = rng.standard_normal((100, 37, 3, 3)).astype(dtype)
    gxc = pk.conv2d_backward(gt, xt[:, :37], wc, padding=1, need_weight=False, need_bias=False)[0]
    # a depthwise layer with stride 2 (direct sums, all three passes: a task per image and channel, or per
    # output channel), and a 5x5 layer whose backward-input runs as the transposed forward
    xd = rng.standard_normal((2, 24, 19, 17)).astype(dtype)
    wd = rng.standard_normal((24, 1, 3, 3)).astype(dtype)
    yd = pk.conv2d(xd, wd, stride=2, padding=1, groups=24)
    depthwise = (yd, *pk.conv2d_backward(yd, xd, wd, stride=2, padding=1, groups=24, need_bias=False)[:2])
    w5 = rng.standard_normal((20, 24, 5, 5)).astype(dtype)
    assert _pykernels_cpu.conv2d_backward_input_uses_transposed_forward(xd.shape, w5.shape, (1, 1), (2, 2, 2, 2),
                                                                        (1, 1), 1, xd.itemsize)
    g5 = pk.conv2d_backward(pk.conv2d(xd, w5, padding=2), xd, w5, padding=2, need_weight=False, need_bias=False)[0]
    # wide rows at batch 1: the threads split the image's rows into blocks, at least one each (forward, and
    # backward-input as the transposed forward)
    xw = rng.standard_normal((1, 8, 30, 38)).astype(dtype)
    ww = rng.standard_normal((10, 8, 5, 5)).astype(dtype)
    assert _pykernels_cpu.conv2d_forward_reads_rows_in_place(xw.shape, ww.shape, (1, 1), (2, 2, 2, 2), (1, 1), 1,
                                                             xw.itemsize) == "wide"
    yw = pk.conv2d(xw, ww, padding=2)
    wide = (yw, pk.conv2d_backward(yw, xw, ww, padding=2, need_weight=False, need_bias=False)[0])
    # backward-weight on wide rows at batch 2 and 1, 200 taps in tasks of 24 rows split among the threads
    assert _pykernels_cpu.conv2d_backward_weight_reads_wide_rows(xw.shape, ww.shape, (1, 1), (2, 2, 2, 2), (1, 1),
                                                                 1, xw.itemsize)
    x2 = np.concatenate([xw, xw[:, ::-1]])
    wide += tuple(pk.conv2d_backward(pk.conv2d(xi, ww, padding=2), xi, ww, padding=2, need_input=False,
                                     need_bias=False)[1] for xi in (x2, xw))
    # a grouped layer of 8 output channels per group summed directly: backward-weight's blocks of output
    # channels are 8, 4 and 1 channels at 1, 2 and 5 threads (register blocks of 4 or 2, and 1)
    wg = rng.standard_normal((32, 6, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_sums_directly(xd.shape, wg.shape, (1, 1), (1, 1, 1, 1), (1, 1), 4) == (True, True)
    yg = pk.conv2d(xd, wg, padding=1, groups=4)
    grouped = (yg, *pk.conv2d_backward(yg, xd, wg, padding=1, groups=4, need_bias=False)[:2])
    # depthwise on planes of a page (32x36): backward-weight's threads each take a run of the 13 channels
    # (all 13; 6 + 7; or 2 + 3 + 2 + 3 + 3 of them), image by image
    xp = rng.standard_normal((3, 13, 32, 36)).astype(dtype)
    wp = rng.standard_normal((13, 1, 3, 3)).astype(dtype)
    yp = pk.conv2d(xp, wp, padding=1, groups=13)
    grouped += (pk.conv2d_backward(yp, xp, wp, padding=1, groups=13, need_input=False, need_bias=False)[1],)
    # Winograd F(2x2) at batch 1 (256 channels and more: float64 too), forward and backward-input: the
    # threads take shares of the output channels in whole vectors, each a strip of them at a time
    x2 = rng.standard_normal((1, 260, 7, 7)).astype(dtype)
    w2 = rng.standard_normal((270, 260, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_winograd_is_f2(x2.shape, w2.shape, (1, 1), (1, 1, 1, 1), (1, 1), 1, x2.itemsize)
    y2 = pk.conv2d(x2, w2, padding=1)
    f2 = (y2, pk.conv2d_backward(y2, x2, w2, padding=1, need_weight=False, need_bias=False)[0])
    # a 6x6 kernel as a 3x3 layer of 4x the channels on Winograd (split_kernel.cpp), all three passes
    x6 = rng.standard_normal((3, 16, 20, 20)).astype(dtype)
    w6 = rng.standard_normal((16, 16, 6, 6)).astype(dtype)
    assert _pykernels_cpu.conv2d_uses_split_winograd(x6.shape, w6.shape, (1, 1), (0, 0, 0, 0), (1, 1), 1, x6.itemsize)
    y6 = pk.conv2d(x6, w6)
    split = (y6, *pk.conv2d_backward(y6, x6, w6, need_bias=False)[:2])
    # Winograd backward-weight by parts of the tiles (winograd_impl.inc): 64 x 64 channels, 400 tiles in 2
    # parts of 2 chunks each, fixed by the layer whatever the thread count
    xv = rng.standard_normal((4, 64, 40, 40)).astype(dtype)
    wv = rng.standard_normal((64, 64, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_backward_weight_uses_winograd(xv.shape, wv.shape, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    gv = pk.conv2d_backward(pk.conv2d(xv, wv, padding=1), xv, wv, padding=1, need_input=False, need_bias=False)[1]
    # backward-weight summed directly by parts of the batch (5 images in parts of 1, 1, 1 and 2 whatever the
    # thread count), 27 taps, 20 output channels
    xq = rng.standard_normal((5, 3, 17, 15)).astype(dtype)
    wq = rng.standard_normal((20, 3, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_sums_directly(xq.shape, wq.shape, (1, 1), (1, 1, 1, 1), (1, 1), 1) == (False, True)
    gq = pk.conv2d_backward(pk.conv2d(xq, wq, padding=1), xq, wq, padding=1, need_input=False, need_bias=False)[1]
    # and 144 taps (16 -> 16 channels, as CIFAR ResNet-20's first stage), directly with AVX-512's blocks
    xr = rng.standard_normal((5, 16, 11, 13)).astype(dtype)
    wr = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    gr = pk.conv2d_backward(pk.conv2d(xr, wr, padding=1), xr, wr, padding=1, need_input=False, need_bias=False)[1]
    # forward as one GEMM per tap over channels-last copies (float32): 3 and 2 images of 77 positions, an
    # image at a time on one thread, else split into blocks of positions, about 4 per thread
    xl = rng.standard_normal((3, 17, 21, 14)).astype(dtype)
    wl = rng.standard_normal((64, 17, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_forward_channels_last(xl.shape, wl.shape, (2, 2), (1, 1, 1, 1), (1, 1), 1,
                                                       xl.itemsize) == (dtype == np.float32)
    channels_last = (pk.conv2d(xl, wl, stride=2, padding=1), pk.conv2d(xl[:2], wl, stride=2, padding=1))
    # and backward-input: 3 images of 128 channels, in blocks of channels as many as the threads make;
    # backward-weight, a task per tap and half of the batch (image 0; images 1 and 2)
    xb = rng.standard_normal((3, 128, 7, 5)).astype(dtype)
    wb = rng.standard_normal((20, 128, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_backward_input_channels_last(xb.shape, wb.shape, (2, 2), (1, 1, 1, 1), (1, 1), 1,
                                                              xb.itemsize) == (dtype == np.float32)
    yb = pk.conv2d(xb, wb, stride=2, padding=1)
    assert _pykernels_cpu.conv2d_backward_weight_channels_last(xb.shape, wb.shape, (2, 2), (1, 1, 1, 1), (1, 1), 1,
                                                               xb.itemsize) == (dtype == np.float32)
    channels_last += tuple(pk.conv2d_backward(yb, xb, wb, stride=2, padding=1, need_bias=False)[:2])
    # and grouped: 3 groups of 32 input channels, a task per group, tap and half of the batch
    wgl = rng.standard_normal((48, 32, 3, 3)).astype(dtype)
    xg = xb[:, :96]
    assert _pykernels_cpu.conv2d_backward_weight_channels_last(xg.shape, wgl.shape, (1, 1), (1, 1, 1, 1), (1, 1), 3,
                                                               xg.itemsize) == (dtype == np.float32)
    channels_last += (pk.conv2d_backward(pk.conv2d(xg, wgl, padding=1, groups=3), xg, wgl, padding=1, groups=3,
                                         need_input=False, need_bias=False)[1],)
    # forward and backward-input of a grouped layer (6 items of image and group: one at a time on one thread,
    # else blocks of positions, and blocks of channels)
    x32 = rng.standard_normal((3, 64, 7, 9)).astype(dtype)
    w32 = rng.standard_normal((64, 32, 3, 2)).astype(dtype)  # 3x2: a 3x3 kernel takes small_group_conv.cpp
    y32 = pk.conv2d(x32, w32, padding=1, groups=2)
    channels_last += (y32, pk.conv2d_backward(y32, x32, w32, padding=1, groups=2, need_weight=False,
                                              need_bias=False)[0])
    # depthwise with the channels across the lanes (depthwise_conv.cpp): tasks of image and block of
    # channels; backward-weight's 5 images in parts fixed by the layer, added in order; stride 1 and 2
    lanes = ()
    xl = rng.standard_normal((5, 48, 9, 10)).astype(dtype)
    wl = rng.standard_normal((48, 1, 3, 3)).astype(dtype)
    for stride in (1, 2):
        assert _pykernels_cpu.conv2d_depthwise_channels_last(xl.shape, wl.shape, (stride, stride), (1, 1, 1, 1),
                                                             (1, 1), 48, xl.itemsize) == (True, True)
        yl = pk.conv2d(xl, wl, stride=stride, padding=1, groups=48)
        lanes += (yl, *pk.conv2d_backward(yl, xl, wl, stride=stride, padding=1, groups=48, need_bias=False)[:2])
    # a dilated layer as its undilated one over x's 2 x 2 dilation phases, on Winograd (dilated_phases.cpp)
    xp = rng.standard_normal((2, 8, 16, 24)).astype(dtype)
    wp = rng.standard_normal((12, 8, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_by_phases(xp.shape, wp.shape, (1, 1), (2, 2, 2, 2), (2, 2), 1,
                                           xp.itemsize) == (True, True, True)
    yp = pk.conv2d(xp, wp, padding=2, dilation=2)
    phases = (yp, *pk.conv2d_backward(yp, xp, wp, padding=2, dilation=2, need_bias=False)[:2])
    # a grouped layer of 2 groups of 128 as one Winograd layer per group (grouped_winograd.cpp)
    xw = rng.standard_normal((2, 256, 12, 12)).astype(dtype)
    ww = rng.standard_normal((256, 128, 3, 3)).astype(dtype)
    assert _pykernels_cpu.conv2d_per_group(xw.shape, ww.shape, (1, 1), (1, 1, 1, 1), (1, 1), 2,
                                           xw.itemsize) == (True, True, True)
    yw = pk.conv2d(xw, ww, padding=1, groups=2)
    per_group = (yw, *pk.conv2d_backward(yw, xw, ww, padding=1, groups=2, need_bias=False)[:2])
    # 8 groups of 16 channels on F(2x2, 3x3) over the group's vectors (small_group_conv.cpp, where 16 channels
    # are one or two of the build's vectors): forward's tasks of image and group, backward-weight's of group over
    # the batch in order
    xs16 = rng.standard_normal((3, 128, 9, 7)).astype(dtype)
    ws16 = rng.standard_normal((128, 16, 3, 3)).astype(dtype)
    vector_lanes = {"avx512": 64, "avx2": 32, "portable": 16}[_pykernels_cpu.active_isa()] // xs16.itemsize
    small_builds = 16 in (vector_lanes, 2 * vector_lanes)
    # (and at stride 2, all three passes summed directly over the group's vectors)
    small_groups = ()
    for stride in (1, 2):
        assert _pykernels_cpu.conv2d_small_group_winograd(xs16.shape, ws16.shape, (stride, stride), (1, 1, 1, 1),
                                                          (1, 1), 8, xs16.itemsize)[2] == small_builds
        ys16 = pk.conv2d(xs16, ws16, stride=stride, padding=1, groups=8)
        small_groups += (ys16, *pk.conv2d_backward(ys16, xs16, ws16, stride=stride, padding=1, groups=8,
                                                   need_bias=False)[:2])
    return (y, y1, gw, pk.conv2d(xs, ws, padding=2, dilation=2), pk.conv2d(xt, wt, padding=1, stride=1, groups=1),
            gxc, *depthwise, g5, *grouped, *wide, *f2, *split, gv, gq, gr, *channels_last, *lanes, *phases,
            *per_group, *small_groups)


def _col2im_blocks_layers(dtype):
    # backward-input at batch 1 through im2col columns added back (col2im): one thread adds them in blocks of
    # output rows in turn (each block's columns within about 512 KB: 2 blocks here), two or more threads
    # add the whole image's at once, split into bands of input rows; each cell must get its entries in one
    # order either way. A 7x7 stride-2 stem (stride 2 across: col2im_add_by_pairs) and a stride-1 5x6 'same'
    # layer (the fuzzing found both thread-count dependent)
    rng = np.random.default_rng(46)
    grads = ()
    for x_shape, w_shape, kwargs in (((1, 3, 75, 63), (64, 3, 7, 7), dict(stride=2)),
                                     ((1, 32, 22, 12), (38, 32, 5, 6), dict(padding="same"))):
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        g = rng.standard_normal(pk.conv2d(x, w, **kwargs).shape).astype(dtype)
        grads += (pk.conv2d_backward(g, x, w, **kwargs, need_weight=False, need_bias=False)[0],)
    return grads


def _run_all(x, w, b, go):
    extra = () if x.shape[0] != 4 else (*_streamed_winograd_layer(x.dtype), _batch_halves_weight_gradient(x.dtype),
                                         _whole_chunk_winograd_forward(x.dtype),
                                         *_copy_and_shared_paths(x.dtype), *_col2im_blocks_layers(x.dtype))
    y = pk.conv2d(x, w, b, stride=2, padding=1)
    grads = pk.conv2d_backward(go, x, w, stride=2, padding=1)
    # stride 1: the Winograd path, all three passes (its chunking depends on the thread count)
    assert _pykernels_cpu.conv2d_uses_winograd(x.shape, w.shape, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    y1 = pk.conv2d(x, w, b, padding=1)
    grads1 = pk.conv2d_backward(y1 * 0.5 - 1, x, w, padding=1)
    py, pidx = pk.max_pool2d(x, 3, 2, 1, return_indices=True)
    pgx = pk.max_pool2d_backward(py, pidx, x.shape, 3, 2, 1)
    return (y, *grads, y1, *grads1, py, pidx, pgx, *extra)


def _assert_bits_equal(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), f"{what}: results differ in their bits"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_passes_are_deterministic(dtype):
    x, w, b, go = _workload(dtype)
    first = pk.conv2d_backward(go, x, w, stride=2, padding=1)
    for _ in range(3):
        again = pk.conv2d_backward(go, x, w, stride=2, padding=1)
        for a, c, name in zip(first, again, ["grad_x", "grad_weight", "grad_bias"]):
            _assert_bits_equal(a, c, name)
    # N = 1 takes the parallel-GEMM path
    first1 = pk.conv2d_backward(go[:1], x[:1], w, stride=2, padding=1)
    again1 = pk.conv2d_backward(go[:1], x[:1], w, stride=2, padding=1)
    for a, c in zip(first1, again1):
        _assert_bits_equal(a, c, "N=1")
    y, idx = pk.max_pool2d(x, 3, 1, 1, return_indices=True)  # overlapping windows: cells chosen repeatedly
    g1 = pk.max_pool2d_backward(y, idx, x.shape, 3, 1, 1)
    g2 = pk.max_pool2d_backward(y, idx, x.shape, 3, 1, 1)
    _assert_bits_equal(g1, g2, "max_pool2d_backward")


@pytest.mark.parametrize("threads", ["1", "5"])
def test_results_do_not_depend_on_thread_count(tmp_path, threads):
    """The same bits with OMP_NUM_THREADS=1 (and 5: uneven shares of every split) as with the default thread
    count (design: no atomics, fixed order)."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import _pykernels_cpu
        from test_edge_cases import _workload, _run_all
        assert _pykernels_cpu.openmp_threads() == int(sys.argv[3])
        _pykernels_cpu.set_isa(sys.argv[2])
        outs = []
        for n in (4, 1):
            x, w, b, go = _workload()
            outs += _run_all(x[:n], w, b, go[:n])
        np.savez(sys.argv[1], *outs)
    """)
    path = tmp_path / "other.npz"
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    isa = _pykernels_cpu.active_isa()
    subprocess.run([sys.executable, "-c", script, str(path), isa, threads], check=True, env=env, cwd=tmp_path)
    other = np.load(path)
    mine = []
    for n in (4, 1):
        x, w, b, go = _workload()
        mine += _run_all(x[:n], w, b, go[:n])
    for i, a in enumerate(mine):
        _assert_bits_equal(a, other[f"arr_{i}"],
                           f"output {i} (threads: {_pykernels_cpu.openmp_threads()} vs {threads})")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_concurrent_python_threads_match_single_threaded(dtype):
    inputs = _workload(dtype)
    expected = _run_all(*inputs)
    # N = 1 runs the GEMM itself in parallel, a different path
    inputs1 = (inputs[0][:1], inputs[1], inputs[2], inputs[3][:1])
    expected1 = _run_all(*inputs1)
    start = threading.Barrier(4)

    def worker(i):
        start.wait()
        results = []
        for rep in range(4):
            results.append(_run_all(*inputs) if (i + rep) % 2 == 0 else _run_all(*inputs1))
            results.append(pk.relu(inputs[0]))
        return i, results

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(worker, range(4)))
    relu_expected = pk.relu(inputs[0])
    for i, results in outcomes:
        for rep in range(4):
            got = results[2 * rep]
            want = expected if (i + rep) % 2 == 0 else expected1
            for k, (a, b) in enumerate(zip(got, want)):
                _assert_bits_equal(a, b, f"thread {i} rep {rep} output {k}")
            _assert_bits_equal(results[2 * rep + 1], relu_expected, "relu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the 'fork' start method is Linux's default")
def test_a_process_forked_after_parallel_calls_runs_them_too():
    # GNU OpenMP's threads do not survive fork: the child's first parallel region waited for them for ever.
    script = textwrap.dedent("""
        import multiprocessing as mp, numpy as np, pykernels as pk
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 16, 32, 32), dtype=np.float32)
        w = rng.standard_normal((16, 16, 3, 3), dtype=np.float32)
        want = pk.conv2d(x, w, padding=1)                    # a parallel region in the parent
        def child(queue):
            queue.put(pk.conv2d(x, w, padding=1).tobytes())
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        p = ctx.Process(target=child, args=(queue,))
        p.start()
        got = queue.get(timeout=60)
        p.join(60)
        assert p.exitcode == 0, p.exitcode
        assert got == want.tobytes(), "the child's result differs"
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_concurrent_threads_on_portable_isa(request):
    """The portable path is thread-safe too: concurrent float64 conv2d calls all match the reference."""
    previous = _pykernels_cpu.active_isa()
    request.addfinalizer(lambda: _pykernels_cpu.set_isa(previous))
    x, w, b, go = _workload(np.float64)
    want = ref.conv2d(x, w, b, stride=2, padding=1)
    try:
        _pykernels_cpu.set_isa("portable")
    except ValueError:
        pytest.skip("no portable ISA switch")

    def worker(_):
        return pk.conv2d(x, w, b, stride=2, padding=1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(worker, range(8)))
    scale = np.abs(want).max()
    for y in outs:
        assert np.abs(y - want).max() <= 1e-10 * scale
