"""Bad inputs: every one raises the right exception TYPE with a message that names the argument (and, where
natural, the shapes). The C++ entry points of _pykernels_cpu are also called directly with bad arguments:
they re-check everything and raise ValueError/TypeError instead of crashing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

import _pykernels_cpu as C
import pykernels as pk
from pykernels import _args, reference

F32, F64 = np.float32, np.float64
NO_PAD = (0, 0, 0, 0)


@contextlib.contextmanager
def raises(exc_type, *fragments):
    """pytest.raises(exc_type) whose message contains every fragment (case-sensitive, literal)."""
    with pytest.raises(exc_type) as info:
        yield info
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message {message!r}"


def rnd(*shape, dtype=F32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


X = rnd(2, 4, 7, 7)
W = rnd(6, 4, 3, 3)


# ==== conv2d: shapes ====================================================================================

def test_conv2d_x_3d():
    with raises(ValueError, "x", "4-D", "(4, 7, 7)"):
        pk.conv2d(rnd(4, 7, 7), W)


def test_conv2d_x_5d():
    with raises(ValueError, "x", "4-D", "(1, 2, 4, 7, 7)"):
        pk.conv2d(rnd(1, 2, 4, 7, 7), W)


def test_conv2d_weight_5d():
    with raises(ValueError, "weight", "4-D", "(6, 4, 3, 3, 1)"):
        pk.conv2d(X, rnd(6, 4, 3, 3, 1))


def test_conv2d_weight_2d():
    with raises(ValueError, "weight", "(6, 36)"):
        pk.conv2d(X, rnd(6, 36))


def test_conv2d_channel_mismatch():
    with raises(ValueError, "weight", "(6, 3, 3, 3)", "x", "(2, 4, 7, 7)"):
        pk.conv2d(X, rnd(6, 3, 3, 3))


def test_conv2d_channel_groups_mismatch():
    # groups = 2 needs weight (K, 2, R, S) for C = 4
    with raises(ValueError, "weight", "(6, 4, 3, 3)", "groups"):
        pk.conv2d(X, W, groups=2)


def test_conv2d_groups_not_dividing_channels():
    with raises(ValueError, "groups", "3", "(2, 4, 7, 7)"):
        pk.conv2d(X, rnd(6, 1, 3, 3), groups=3)


def test_conv2d_groups_not_dividing_output_channels():
    with raises(ValueError, "groups", "(5, 2, 3, 3)"):
        pk.conv2d(X, rnd(5, 2, 3, 3), groups=2)


@pytest.mark.parametrize("groups", [0, -2])
def test_conv2d_groups_not_positive(groups):
    with raises(ValueError, "groups"):
        pk.conv2d(X, W, groups=groups)


@pytest.mark.parametrize("groups", [1.0, "1", None, True])
def test_conv2d_groups_not_int(groups):
    with raises(TypeError, "groups"):
        pk.conv2d(X, W, groups=groups)


def test_conv2d_kernel_larger_than_input():
    with raises(ValueError, "weight", "5x5", "(1, 1, 3, 3)"):
        pk.conv2d(rnd(1, 1, 3, 3), rnd(1, 1, 5, 5))


def test_conv2d_kernel_larger_than_padded_input_one_axis():
    with raises(ValueError, "weight", "padding"):
        pk.conv2d(rnd(1, 1, 8, 3), rnd(1, 1, 3, 6), padding=(0, 1))


def test_conv2d_dilated_kernel_larger_than_input():
    with raises(ValueError, "weight", "dilation"):
        pk.conv2d(rnd(1, 1, 6, 6), rnd(1, 1, 3, 3), dilation=3)


def test_conv2d_kernel_fits_after_padding_is_fine():
    assert pk.conv2d(rnd(1, 1, 3, 3), rnd(1, 1, 5, 5), padding=1).shape == (1, 1, 1, 1)


@pytest.mark.parametrize("shape", [(2, 0, 7, 7), (2, 4, 0, 7), (2, 4, 7, 0)])
def test_conv2d_x_without_channels_rows_or_columns(shape):
    with raises(ValueError, "x", str(shape)):
        pk.conv2d(np.zeros(shape, F32), rnd(6, max(shape[1], 1), 1, 1))


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (6, 4, 0, 3), (6, 4, 3, 0)])
def test_conv2d_empty_weight(shape):
    with raises(ValueError, "weight", str(shape)):
        pk.conv2d(X, np.zeros(shape, F32))


# ==== conv2d: stride, dilation, padding =================================================================

@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value", [0, -1, (1, 0), (-2, 1), (0, 0)])
def test_stride_dilation_not_positive(name, value):
    with raises(ValueError, name):
        pk.conv2d(X, W, **{name: value})
    with raises(ValueError, name):
        pk.max_pool2d(X, 2, **{name: value})


@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value", [(1, 2, 3), (1,), ()])
def test_stride_dilation_wrong_length(name, value):
    with raises(ValueError, name):
        pk.conv2d(X, W, **{name: value})


@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value", [1.0, "2", None, True, (1, 1.5), np.float32(1)])
def test_stride_dilation_not_int(name, value):
    with raises(TypeError, name):
        pk.conv2d(X, W, **{name: value})


@pytest.mark.parametrize("padding", [-1, (0, -1), ((0, -1), (0, 0)), ((0, 0), (-3, 0))])
def test_negative_padding(padding):
    with raises(ValueError, "padding"):
        pk.conv2d(X, W, padding=padding)
    with raises(ValueError, "padding"):
        pk.max_pool2d(X, 2, padding=padding)


@pytest.mark.parametrize("padding", ["full", "", "causal", (1, 2, 3), (1,), ((1, 2), (3, 4), (5, 6)),
                                     ((1, 2, 3), (0, 0))])
def test_bad_padding_value(padding):
    with raises(ValueError, "padding"):
        pk.conv2d(X, W, padding=padding)


@pytest.mark.parametrize("padding", [1.5, None, (1.0, 1), b"same"])
def test_padding_not_int(padding):
    with pytest.raises((TypeError, ValueError)) as info:
        pk.conv2d(X, W, padding=padding)
    assert "padding" in str(info.value)


@pytest.mark.parametrize("name,value", [("stride", 2**31), ("stride", 2**40), ("dilation", 2**33),
                                        ("padding", 2**32), ("padding", ((0, 2**31), (0, 0))), ("groups", 2**40),
                                        ("stride", -(2**63)), ("padding", 2**70)])
def test_huge_parameters(name, value):
    with raises(ValueError, name):
        pk.conv2d(X, W, **{name: value})


@pytest.mark.parametrize("name,value", [("kernel_size", 2**31), ("stride", 2**40), ("padding", 2**32),
                                        ("dilation", 2**31)])
def test_huge_pool_parameters(name, value):
    kwargs = dict(kernel_size=2)
    kwargs[name] = value
    with raises(ValueError, name):
        pk.max_pool2d(X, **kwargs)


def test_padding_at_limit_gives_output_too_large():
    # 2^31 - 1 is accepted as a parameter, but the output it implies has more than 2^56 elements
    with raises(ValueError, "output"):
        pk.conv2d(rnd(1, 1, 2, 2), rnd(1, 1, 1, 1), padding=2**31 - 1)


@pytest.mark.parametrize("x_shape,w_shape,kwargs", [
    ((2, 1, 5, 5), (1, 1, 3, 3), dict(stride=10**4)),  # few weights: the direct sums' layers
    ((2, 1, 5, 5), (1, 1, 3, 3), dict(stride=2**31 - 1)),
    ((2, 4, 5, 5), (4, 1, 3, 3), dict(stride=10**5, groups=4)),  # depthwise
    ((2, 8, 5, 7), (16, 2, 3, 3), dict(stride=10**5, groups=4)),  # small groups
    ((1, 16, 40, 40), (32, 16, 3, 3), dict(stride=(10**5, 1))),  # a GEMM's layers
    ((2, 16, 40, 40), (32, 16, 3, 3), dict(stride=(1, 10**5))),
    ((2, 16, 40, 40), (32, 16, 3, 3), dict(stride=10**5)),
    ((1, 1, 4, 4), (1, 1, 2, 2), dict(stride=10**4, dilation=1000, padding=((1000, 0), (1000, 0)))),
])
def test_strides_far_past_the_window(x_shape, w_shape, kwargs):
    # A stride far past the window leaves most of its stride phases without a tap: copies of x split into
    # them (the direct sums' planes, the wide rows' copy) had grown with stride^2, 1 GB at stride 1000,
    # std::bad_alloc from 10^4 (phase_copy_fits). Such layers take the GEMM, which gets the reference's
    # answer at once.
    x, w = rnd(*x_shape, dtype=F64), rnd(*w_shape, dtype=F64, seed=1)
    layer = (x_shape, w_shape, *_args.conv2d_geometry(
        x_shape, w_shape, padding=kwargs.get("padding", 0), stride=kwargs["stride"],
        dilation=kwargs.get("dilation", 1), groups=kwargs.get("groups", 1)).kernel_args())
    assert C.conv2d_sums_directly(*layer) == (False, False)
    assert C.conv2d_forward_reads_rows_in_place(*layer, 8) is None  # nor from a copy, wide or per row
    assert not C.conv2d_backward_weight_reads_wide_rows(*layer, 8)
    y = pk.conv2d(x, w, **kwargs)
    np.testing.assert_allclose(y, reference.conv2d(x, w, **kwargs), rtol=1e-12, atol=1e-12)
    g = rnd(*y.shape, dtype=F64, seed=2)
    for got, want in zip(pk.conv2d_backward(g, x, w, **kwargs), reference.conv2d_backward(g, x, w, **kwargs)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ==== dtypes and array types ============================================================================

BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.float16, np.complex64, np.complex128, object,
              np.longdouble]


def as_dtype(a, dtype):
    return a.astype(dtype) if dtype is not object else a.astype(object)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_bad_dtype_x(dtype):
    with raises(TypeError, "x", np.dtype(dtype).name):
        pk.conv2d(as_dtype(X, dtype), W)
    with raises(TypeError, "x"):
        pk.relu(as_dtype(X, dtype))
    with raises(TypeError, "x"):
        pk.max_pool2d(as_dtype(X, dtype), 2)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_bad_dtype_weight_bias_grad_out(dtype):
    with raises(TypeError, "weight"):
        pk.conv2d(X, as_dtype(W, dtype))
    with raises(TypeError, "bias"):
        pk.conv2d(X, W, as_dtype(rnd(6), dtype))
    go = rnd(2, 6, 5, 5)
    with raises(TypeError, "grad_out"):
        pk.conv2d_backward(as_dtype(go, dtype), X, W)
    with raises(TypeError, "grad_out"):
        pk.relu_backward(as_dtype(X, dtype), X)
    with raises(TypeError, "y"):
        pk.relu_backward(X, as_dtype(X, dtype))
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    with raises(TypeError, "grad_out"):
        pk.max_pool2d_backward(as_dtype(y, dtype), idx, X.shape, 2)


def test_float16_message_mentions_cuda():
    with raises(TypeError, "x", "float16"):
        pk.conv2d(X.astype(np.float16), W.astype(np.float16))


@pytest.mark.parametrize("a,b", [(F32, F64), (F64, F32)])
def test_mixed_dtypes(a, b):
    with raises(TypeError, "weight", "x", np.dtype(a).name, np.dtype(b).name):
        pk.conv2d(X.astype(a), W.astype(b))
    with raises(TypeError, "bias"):
        pk.conv2d(X.astype(a), W.astype(a), rnd(6).astype(b))
    go = rnd(2, 6, 5, 5)
    with raises(TypeError, "x"):
        pk.conv2d_backward(go.astype(a), X.astype(b), W.astype(b))
    with raises(TypeError, "weight"):
        pk.conv2d_backward(go.astype(a), X.astype(a), W.astype(b))
    with raises(TypeError, "y"):
        pk.relu_backward(X.astype(a), X.astype(b))


def test_python_lists_instead_of_arrays():
    with raises(TypeError, "x", "list"):
        pk.conv2d(X.tolist(), W)
    with raises(TypeError, "weight", "list"):
        pk.conv2d(X, W.tolist())
    with raises(TypeError, "bias", "list"):
        pk.conv2d(X, W, [0.0] * 6)
    with raises(TypeError, "x"):
        pk.relu(X.tolist())
    with raises(TypeError, "x"):
        pk.relu(3.0)
    with raises(TypeError, "x"):
        pk.max_pool2d(X.tolist(), 2)
    go = rnd(2, 6, 5, 5)
    with raises(TypeError, "grad_out"):
        pk.conv2d_backward(go.tolist(), X, W)
    with raises(TypeError, "x"):
        pk.conv2d_backward(go, X.tolist(), W)
    with raises(TypeError, "grad_out"):
        pk.relu_backward(X.tolist(), X)
    with raises(TypeError, "y"):
        pk.relu_backward(X, X.tolist())
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    with raises(TypeError, "grad_out"):
        pk.max_pool2d_backward(y.tolist(), idx, X.shape, 2)
    with raises(TypeError, "indices"):
        pk.max_pool2d_backward(y, idx.tolist(), X.shape, 2)


def test_memoryview_is_not_silently_converted():
    with pytest.raises(TypeError):
        pk.relu(memoryview(X))


# ==== bias, out= ========================================================================================

@pytest.mark.parametrize("shape", [(5,), (7,), (1, 6), (6, 1), ()])
def test_bias_wrong_shape(shape):
    with raises(ValueError, "bias", str(shape)):
        pk.conv2d(X, W, np.zeros(shape, F32))


def test_out_wrong_shape():
    with raises(ValueError, "out", "(2, 6, 5, 5)", "(2, 6, 5, 4)"):
        pk.conv2d(X, W, out=np.empty((2, 6, 5, 4), F32))
    with raises(ValueError, "out"):
        pk.conv2d(X, W, out=np.empty((2 * 6 * 5 * 5,), F32))
    with raises(ValueError, "out"):
        pk.relu(X, out=np.empty((2, 4, 7, 6), F32))


def test_out_wrong_dtype():
    with raises(TypeError, "out", "float32", "float64"):
        pk.conv2d(X, W, out=np.empty((2, 6, 5, 5), F64))
    with raises(TypeError, "out"):
        pk.relu(X, out=np.empty(X.shape, F64))
    with raises(TypeError, "out"):
        pk.relu(X, out=np.empty(X.shape, np.int32))


def test_out_not_contiguous():
    big = np.empty((2, 6, 5, 10), F32)
    with raises(ValueError, "out", "contiguous"):
        pk.conv2d(X, W, out=big[..., ::2])
    with raises(ValueError, "out", "contiguous"):
        pk.conv2d(X, W, out=np.empty((2, 6, 5, 5), F32, order="F"))
    with raises(ValueError, "out", "contiguous"):
        pk.relu(X, out=np.empty(X.shape[::-1], F32).T)


def test_out_read_only():
    out = np.empty((2, 6, 5, 5), F32)
    out.flags.writeable = False
    with raises(ValueError, "out", "writeable"):
        pk.conv2d(X, W, out=out)
    x = X.copy()
    x.flags.writeable = False
    with raises(ValueError, "out", "writeable"):
        pk.relu(x, out=x)
    assert pk.relu(x).shape == x.shape  # a read-only input is fine


def test_out_not_an_array():
    with raises(TypeError, "out"):
        pk.conv2d(X, W, out=[[0.0]])


def test_out_aliasing_input():
    buf = np.zeros(2 * 4 * 7 * 7 + 100, F32)
    x = buf[:X.size].reshape(X.shape)
    x[...] = X
    out = buf[50:50 + 2 * 6 * 5 * 5].reshape(2, 6, 5, 5)
    with raises(ValueError, "out", "x"):
        pk.conv2d(x, W, out=out)
    with raises(ValueError, "out", "x"):
        pk.relu(buf[:98].reshape(2, 49), out=buf[10:108].reshape(2, 49))


# ==== backward passes ===================================================================================

def test_conv2d_backward_grad_out_wrong_shape():
    with raises(ValueError, "grad_out", "(2, 6, 5, 5)", "(2, 6, 4, 5)"):
        pk.conv2d_backward(rnd(2, 6, 4, 5), X, W)
    with raises(ValueError, "grad_out"):
        pk.conv2d_backward(rnd(2, 6, 5, 5), X, W, stride=2)
    with raises(ValueError, "grad_out"):
        pk.conv2d_backward(rnd(6, 5, 5), X, W)


def test_conv2d_backward_bad_geometry():
    with raises(ValueError, "weight"):
        pk.conv2d_backward(rnd(2, 6, 5, 5), X, rnd(6, 3, 3, 3))
    with raises(ValueError, "groups"):
        pk.conv2d_backward(rnd(2, 6, 5, 5), X, W, groups=0)
    with raises(ValueError, "padding"):
        pk.conv2d_backward(rnd(2, 6, 5, 5), X, W, padding=-1)


def test_relu_backward_shape_mismatch():
    with raises(ValueError, "y", "(2, 4, 7, 7)", "(2, 4, 7, 6)"):
        pk.relu_backward(X, rnd(2, 4, 7, 6))
    with raises(ValueError, "y"):
        pk.relu_backward(X, rnd(2 * 4 * 7 * 7))


def test_max_pool2d_backward_grad_out_wrong_shape():
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    with raises(ValueError, "grad_out", "(2, 4, 3, 3)", "(2, 4, 3, 2)"):
        pk.max_pool2d_backward(y[..., :2].copy(), idx, X.shape, 2)
    with raises(ValueError, "grad_out"):
        pk.max_pool2d_backward(y, idx, X.shape, 3)  # different geometry, different output shape


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.uint64, np.float32, np.intp(0).dtype.newbyteorder()])
def test_max_pool2d_backward_indices_wrong_dtype(dtype):
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    with raises(TypeError, "indices", "int64"):
        pk.max_pool2d_backward(y, idx.astype(dtype), X.shape, 2)


def test_max_pool2d_backward_indices_wrong_shape():
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    with raises(ValueError, "indices", "(2, 4, 3, 3)", "(2, 4, 3, 2)"):
        pk.max_pool2d_backward(y, idx[..., :2].copy(), X.shape, 2)


@pytest.mark.parametrize("bad", [-1, 49, 10**12, -(2**63)])
def test_max_pool2d_backward_indices_out_of_range(bad):
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    idx = idx.copy()
    idx[1, 2, 0, 1] = bad
    with raises(ValueError, "indices[1, 2, 0, 1]", str(bad)):
        pk.max_pool2d_backward(y, idx, X.shape, 2)


def test_max_pool2d_backward_index_outside_its_window():
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    idx = idx.copy()
    idx[0, 3, 2, 2] = 0  # in the plane, but the cell of window (0, 0), not (2, 2)
    with raises(ValueError, "indices[0, 3, 2, 2]"):
        pk.max_pool2d_backward(y, idx, X.shape, 2)
    # a dilated window skips cells: the gap between taps is not in the window
    y, idx = pk.max_pool2d(X, 2, 1, dilation=2, return_indices=True)
    idx = idx.copy()
    idx[0, 0, 0, 0] = 1  # window (0, 0) holds columns 0 and 2, not 1
    with raises(ValueError, "indices[0, 0, 0, 0]"):
        pk.max_pool2d_backward(y, idx, X.shape, 2, 1, dilation=2)
    # the cell left of a window that starts in the padding
    y, idx = pk.max_pool2d(X, 3, 2, 1, return_indices=True)
    idx = idx.copy()
    idx[0, 0, 0, 1] = 0  # window (0, 1) covers columns 1..3
    with raises(ValueError, "indices[0, 0, 0, 1]"):
        pk.max_pool2d_backward(y, idx, X.shape, 3, 2, 1)
    # window (1, 0) starts one column left of the image: the last cell of the row above is
    # flat-adjacent to its first column but not in it
    idx = pk.max_pool2d(X, 3, 2, 1, return_indices=True)[1].copy()
    idx[0, 0, 1, 0] = 1 * X.shape[3] - 1  # (h 0, w 6): row 0 is outside window (1, 0)'s rows 1..3 anyway
    with raises(ValueError, "indices[0, 0, 1, 0]"):
        pk.max_pool2d_backward(y, idx, X.shape, 3, 2, 1)
    idx = pk.max_pool2d(X, 3, 2, 1, return_indices=True)[1].copy()
    idx[0, 0, 1, 0] = 2 * X.shape[3] - 1  # (h 1, w 6): right row, but column 6 is not in columns -1..1
    with raises(ValueError, "indices[0, 0, 1, 0]"):
        pk.max_pool2d_backward(y, idx, X.shape, 3, 2, 1)


def test_max_pool2d_backward_index_in_the_next_row_of_a_window_cut_by_padding():
    # One column wide, window (1, 2) with stride 2 and one column of right padding: the window's second
    # column is padding, and the flat offset one past its first column is the next row's cell.
    x = np.arange(3, dtype=np.float64).reshape(1, 1, 3, 1)
    y, idx = pk.max_pool2d(x, (1, 2), (1, 2), ((0, 0), (0, 1)), return_indices=True)
    assert idx.ravel().tolist() == [0, 1, 2]
    bad = idx.copy()
    bad[0, 0, 0, 0] = 1  # row 1's cell, as if it were column 1 of row 0
    with raises(ValueError, "indices[0, 0, 0, 0]"):
        pk.max_pool2d_backward(y, bad, x.shape, (1, 2), (1, 2), ((0, 0), (0, 1)))


def test_max_pool2d_backward_bad_input_shape():
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    with raises(TypeError, "input_shape"):
        pk.max_pool2d_backward(y, idx, "2,4,7,7", 2)
    with raises(TypeError, "input_shape"):
        pk.max_pool2d_backward(y, idx, 7, 2)
    with raises(ValueError, "input_shape"):
        pk.max_pool2d_backward(y, idx, (4, 7, 7), 2)
    for bad in ((2, 4, 7.5, 7), (2, 4, 7.0, 7), (2, True, 7, 7)):  # was truncated to 7 or taken as 1
        with raises(TypeError, "input_shape", "ints"):
            pk.max_pool2d_backward(y, idx, bad, 2)
    np.testing.assert_array_equal(pk.max_pool2d_backward(y, idx, np.array(X.shape), 2),
                                  pk.max_pool2d_backward(y, idx, X.shape, 2))


def test_none_for_an_array_is_a_type_error_naming_it():
    # (had been AttributeError: 'NoneType' object has no attribute 'shape')
    y, idx = pk.max_pool2d(X, 2, return_indices=True)
    g = rnd(2, 6, 5, 5)
    for name, call in (("x", lambda: pk.conv2d(None, W)), ("weight", lambda: pk.conv2d(X, None)),
                       ("grad_out", lambda: pk.conv2d_backward(None, X, W)),
                       ("x", lambda: pk.conv2d_backward(g, None, W)),
                       ("weight", lambda: pk.conv2d_backward(g, X, None)),
                       ("x", lambda: pk.relu(None)), ("grad_out", lambda: pk.relu_backward(None, X)),
                       ("y", lambda: pk.relu_backward(X, None)), ("x", lambda: pk.max_pool2d(None, 2)),
                       ("grad_out", lambda: pk.max_pool2d_backward(None, idx, X.shape, 2)),
                       ("indices", lambda: pk.max_pool2d_backward(y, None, X.shape, 2))):
        with raises(TypeError, name, "got None"):
            call()
    np.testing.assert_array_equal(pk.conv2d(X, W, None), pk.conv2d(X, W))  # bias may be None


# ==== max_pool2d ========================================================================================

@pytest.mark.parametrize("kwargs", [dict(kernel_size=2, padding=2), dict(kernel_size=3, stride=1, padding=3),
                                    dict(kernel_size=(2, 2), padding=((0, 0), (2, 0))),
                                    dict(kernel_size=2, padding=((0, 3), (0, 0)), stride=1),
                                    dict(kernel_size=3, stride=2, padding=5, dilation=2),
                                    dict(kernel_size=2, padding=((0, 0), (0, 4)), stride=2, ceil_mode=True)],
                         ids=["begin_h", "begin_hw_k3", "begin_w", "end_h", "begin_dilated", "end_w_ceil"])
def test_pool_window_wholly_in_padding(kwargs):
    # A window wholly in the END padding (ids end_*) must be caught as well as one in the begin padding.
    with raises(ValueError, "padding", "(2, 4, 7, 7)"):
        pk.max_pool2d(X, **kwargs)


def test_pool_kernel_larger_than_padded_input():
    with raises(ValueError, "kernel_size", "(2, 4, 7, 7)"):
        pk.max_pool2d(X, 8)
    with raises(ValueError, "kernel_size"):
        pk.max_pool2d(X, 3, dilation=4)


@pytest.mark.parametrize("kernel_size", [0, -1, (2, 0), (3,), (1, 2, 3)])
def test_pool_bad_kernel_size(kernel_size):
    with raises(ValueError, "kernel_size"):
        pk.max_pool2d(X, kernel_size)


@pytest.mark.parametrize("kernel_size", [2.0, None, "2", True])
def test_pool_kernel_size_not_int(kernel_size):
    with raises(TypeError, "kernel_size"):
        pk.max_pool2d(X, kernel_size)


@pytest.mark.parametrize("ceil_mode", ["yes", 2, None, 1.0])
def test_pool_ceil_mode_not_bool(ceil_mode):
    with raises(TypeError, "ceil_mode"):
        pk.max_pool2d(X, 2, ceil_mode=ceil_mode)


def test_pool_ceil_mode_takes_numpy_bools_as_the_layer_does():
    for flag in (True, False):
        np.testing.assert_array_equal(pk.max_pool2d(X, 2, ceil_mode=np.bool_(flag)),
                                      pk.max_pool2d(X, 2, ceil_mode=flag))


@pytest.mark.parametrize("value", ["no", None, 2, 0.0])
def test_pool_return_indices_not_bool(value):
    # "no" reads as true: a silent tuple where the caller expected an array.
    with raises(TypeError, "return_indices", repr(value)):
        pk.max_pool2d(X, 2, return_indices=value)


@pytest.mark.parametrize("name", ["need_input", "need_weight", "need_bias"])
@pytest.mark.parametrize("value", ["no", None, 2, 1.0])
def test_conv_backward_need_flags_not_bool(name, value):
    grad_out = rnd(2, 6, 5, 5)
    with raises(TypeError, name, repr(value)):
        pk.conv2d_backward(grad_out, X, W, **{name: value})


def test_flags_take_numpy_bools_and_0_1():
    grad_out = rnd(2, 6, 5, 5)
    want = pk.conv2d_backward(grad_out, X, W, need_input=False, need_bias=False)
    got = pk.conv2d_backward(grad_out, X, W, need_input=np.False_, need_weight=np.True_, need_bias=0)
    assert got[0] is None and got[2] is None
    np.testing.assert_array_equal(got[1], want[1])
    y, indices = pk.max_pool2d(X, 2, return_indices=np.True_)
    np.testing.assert_array_equal(y, pk.max_pool2d(X, 2))
    assert isinstance(pk.max_pool2d(X, 2, return_indices=0), np.ndarray)


def test_masked_arrays_are_refused_not_unmasked():
    # relu returned a plain array computed from the masked values too, the mask gone.
    masked = np.ma.array(X, mask=X > 1)
    for call in (lambda: pk.relu(masked), lambda: pk.conv2d(masked, W), lambda: pk.max_pool2d(masked, 2),
                 lambda: pk.conv2d(X, W, out=np.ma.zeros((2, 6, 5, 5), F32)),
                 lambda: pk.relu_backward(X, masked)):
        with raises(TypeError, "masked array", "filled"):
            call()


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_other_byte_order_is_named_with_its_fix(dtype):
    # (the message had said 'must have dtype float32, float64; got >f4' alone: a float32 by any other name)
    native = "float32" if dtype == ">f4" else "float64"
    with raises(TypeError, "x must have dtype", f"{native} in the other byte order", "x.astype("):
        pk.relu(X.astype(dtype))
    with raises(TypeError, "weight", "other byte order"):
        pk.conv2d(X, W.astype(dtype))


def test_pool_wrong_ndim():
    with raises(ValueError, "x", "4-D", "(4, 7, 7)"):
        pk.max_pool2d(rnd(4, 7, 7), 2)
    with raises(ValueError, "x", "(2, 0, 7, 7)"):
        pk.max_pool2d(np.zeros((2, 0, 7, 7), F32), 2)


# ==== sizes whose products overflow =====================================================================

def test_huge_broadcast_view_is_rejected_before_any_copy():
    """A broadcast view with 2^60 elements (stride 0, no memory behind it) must be a ValueError about its
    shape -- not a MemoryError from copying it to a contiguous array before the shape is checked."""
    huge = np.broadcast_to(np.float32(1), (2**20, 2**20, 2**20, 1))
    with raises(ValueError, "x", "too many elements"):
        pk.conv2d(huge, np.ones((1, 2**20, 1, 1), F32))


def test_huge_broadcast_view_pool():
    huge = np.broadcast_to(np.float32(1), (2**20, 2**20, 2**20, 1))
    with raises(ValueError, "x", "too many elements"):
        pk.max_pool2d(huge, 1)


def test_huge_broadcast_view_relu():
    huge = np.broadcast_to(np.float32(1), (2**20, 2**20, 2**20, 1))
    with raises(ValueError, "x", "too many elements"):
        pk.relu(huge)
    with raises(ValueError, "grad_out", "too many elements"):
        pk.relu_backward(huge, huge)


def test_huge_view_of_another_dtype_or_shape_is_named_not_a_memory_error():
    # 2^36 elements (256 GiB of float32 result): the short way allocated the result first and raised MemoryError.
    big = (2**18, 2**18)
    with raises(TypeError, "x", "int32"):
        pk.relu(np.broadcast_to(np.int32(1), big))
    with raises(ValueError, "y", "(3,)"):
        pk.relu_backward(np.broadcast_to(np.float32(1), big), np.ones(3, F32))
    with raises(TypeError, "grad_out", "int8"):
        pk.relu_backward(np.broadcast_to(np.int8(1), big), np.ones(3, F32))


def _import_with(name, value):
    script = "import warnings; warnings.simplefilter('error'); import pykernels"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYKERNELS_")}
    return subprocess.run([sys.executable, "-c", script], env=dict(env, **{name: value}), capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("name,value,why", [
    ("PYKERNELS_CPU_ISA", "bogus", "is not portable, avx2 or avx512"),
    ("PYKERNELS_CPU_ISA", "AVX2", "is not portable"),
    ("PYKERNELS_CONV_ALGORITHM", "GEMM", "is not 'gemm' or 'auto'"),  # had kept Winograd on in silence
    ("PYKERNELS_CPU_CACHE_MB", "-5", "is not a whole number"),  # had meant no cap at all
    ("PYKERNELS_CPU_CACHE_MB", "1e3", "is not a whole number"),
])
def test_a_setting_the_extension_ignores_warns(name, value, why):
    result = _import_with(name, value)
    assert result.returncode != 0 and "RuntimeWarning" in result.stderr and why in result.stderr, result.stderr


@pytest.mark.parametrize("name,value", [("PYKERNELS_CPU_ISA", "portable"), ("PYKERNELS_CONV_ALGORITHM", "gemm"),
                                        ("PYKERNELS_CONV_ALGORITHM", "auto"), ("PYKERNELS_CPU_CACHE_MB", "0"),
                                        ("PYKERNELS_CPU_CACHE_MB", "17592186044416")])
def test_a_setting_the_extension_takes_is_quiet(name, value):
    result = _import_with(name, value)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("x_shape,w_shape", [
    ((2**20, 2**20, 2**20, 1), (1, 2**20, 1, 1)),
    ((1, 1, 2**40, 2**40), (1, 1, 1, 1)),
    ((2**62, 1, 1, 1), (1, 1, 1, 1)),
    ((1, 2**30, 2**30, 1), (2**30, 2**30, 1, 1)),
])
def test_geometry_with_overflowing_products(x_shape, w_shape):
    with raises(ValueError, "too many elements"):
        _args.conv2d_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1)
    with raises(ValueError, "too many elements"):
        C.conv2d_output_shape(x_shape, w_shape, (1, 1), NO_PAD, (1, 1), 1)


def test_pool_geometry_with_overflowing_products():
    with raises(ValueError, "too many elements"):
        _args.pool2d_geometry((2**20, 2**20, 2**20, 1), 1)
    with raises(ValueError, "too many elements"):
        C.pool2d_output_shape((2**20, 2**20, 2**20, 1), (1, 1), (1, 1), NO_PAD, (1, 1), False)
    with raises(ValueError):
        C.pool2d_output_shape((2**62, 2**62, 1, 1), (1, 1), (1, 1), NO_PAD, (1, 1), False)


def test_im2col_workspace_too_large():
    # x and output are small enough, but one image's im2col matrix (C*R*S x P*Q) is not
    with raises(ValueError, "im2col"):
        _args.conv2d_geometry((1, 2**20, 2**14, 2**14), (1, 2**20, 2**6, 2**6), stride=1, padding=(2**6, 2**6),
                              dilation=1, groups=1)
    with raises(ValueError, "im2col"):
        C.conv2d_output_shape((1, 2**20, 2**14, 2**14), (1, 2**20, 2**6, 2**6), (1, 1), (2**6,) * 4, (1, 1), 1)


def test_cpp_shape_functions_reject_weight_channels_overflowing_with_groups():
    # weight C/groups = 2^62 + 1 with groups = 4: the product 4 * (2^62 + 1) wraps to 4 in int64
    with raises(ValueError, "weight"):
        C.conv2d_output_shape((1, 4, 5, 5), (4, 2**62 + 1, 3, 3), (1, 1), NO_PAD, (1, 1), 4)
    with raises(ValueError, "weight"):
        _args.conv2d_geometry((1, 4, 5, 5), (4, 2**62 + 1, 3, 3), stride=1, padding=0, dilation=1, groups=4)


def test_cpp_shape_functions_bad_parameters():
    for bad in [dict(stride=(0, 1)), dict(pad=(0, -1, 0, 0)), dict(dilation=(1, 0)), dict(groups=0),
                dict(stride=(2**31, 1)), dict(pad=(2**40, 0, 0, 0)), dict(groups=-4)]:
        args = dict(stride=(1, 1), pad=NO_PAD, dilation=(1, 1), groups=1)
        args.update(bad)
        with pytest.raises(ValueError):
            C.conv2d_output_shape((1, 4, 5, 5), (4, 4, 3, 3), args["stride"], args["pad"], args["dilation"],
                                  args["groups"])
    with pytest.raises(ValueError):
        C.conv2d_output_shape((-1, 4, 5, 5), (4, 4, 3, 3), (1, 1), NO_PAD, (1, 1), 1)
    with pytest.raises(ValueError):
        C.conv2d_output_shape((1, 4, 5, 5), (4, -4, 3, 3), (1, 1), NO_PAD, (1, 1), 1)
    with pytest.raises(ValueError):
        C.pool2d_output_shape((1, 1, 4, 4), (2, 2), (1, 1), (2, 0, 0, 0), (1, 1), False)  # window in padding
    with pytest.raises(ValueError):
        C.pool2d_output_shape((1, 1, 4, 4), (0, 2), (1, 1), NO_PAD, (1, 1), False)
    with pytest.raises((TypeError, ValueError)):
        C.conv2d_output_shape((1, 4, 5), (4, 4, 3, 3), (1, 1), NO_PAD, (1, 1), 1)
    with pytest.raises(TypeError):  # does not fit int64
        C.conv2d_output_shape((1, 4, 5, 5), (4, 4, 3, 3), (2**64, 1), NO_PAD, (1, 1), 1)


def test_nchw_offset_bad_arguments():
    with raises(ValueError, "index"):
        C.nchw_offset((0, 0, 0, 16), (1, 1, 16, 16))
    with raises(ValueError, "index"):
        C.nchw_offset((-1, 0, 0, 0), (1, 1, 16, 16))
    with raises(ValueError, "too many elements"):
        C.nchw_offset((0, 0, 0, 0), (2**62, 2**62, 1, 1))
    with pytest.raises(ValueError):
        C.nchw_offset((0, 0, 0, 0), (1, -1, 1, 1))


def test_set_isa_unknown_name():
    before = C.active_isa()
    with raises(ValueError, "isa", "bogus"):
        C.set_isa("bogus")
    assert C.active_isa() == before


# ==== the C++ entry points called directly ==============================================================

def conv_args(**over):
    a = dict(stride=(1, 1), padding=NO_PAD, dilation=(1, 1), groups=1)
    a.update(over)
    return a["stride"], a["padding"], a["dilation"], a["groups"]


class TestCppConvForward:
    x = rnd(2, 4, 7, 7)
    w = rnd(6, 4, 3, 3)

    def out(self, shape=(2, 6, 5, 5), dtype=F32):
        return np.zeros(shape, dtype)

    def test_good_call_works(self):
        y = self.out()
        C.conv2d_forward(self.x, self.w, None, y, *conv_args())
        np.testing.assert_allclose(y, pk.conv2d(self.x, self.w), rtol=1e-6, atol=1e-6)

    def test_wrong_ndim(self):
        with raises(ValueError, "x"):
            C.conv2d_forward(self.x[0], self.w, None, self.out(), *conv_args())
        with raises(ValueError, "weight"):
            C.conv2d_forward(self.x, self.w[None], None, self.out(), *conv_args())
        with raises(ValueError, "bias"):
            C.conv2d_forward(self.x, self.w, np.zeros((1, 6), F32), self.out(), *conv_args())
        with raises(ValueError, "out"):
            C.conv2d_forward(self.x, self.w, None, self.out((2, 6, 25)), *conv_args())

    def test_wrong_shapes(self):
        with raises(ValueError, "out", "(2, 6, 5, 5)"):
            C.conv2d_forward(self.x, self.w, None, self.out((2, 6, 5, 6)), *conv_args())
        with raises(ValueError, "bias"):
            C.conv2d_forward(self.x, self.w, np.zeros(5, F32), self.out(), *conv_args())
        with raises(ValueError, "weight"):
            C.conv2d_forward(self.x, rnd(6, 3, 3, 3), None, self.out(), *conv_args())
        with pytest.raises(ValueError):
            C.conv2d_forward(self.x, rnd(6, 4, 9, 9), None, self.out(), *conv_args())  # kernel > input

    def test_bad_parameters(self):
        for over in [dict(stride=(0, 1)), dict(dilation=(1, -1)), dict(padding=(0, 0, -1, 0)), dict(groups=0),
                     dict(groups=-1), dict(groups=3), dict(stride=(2**40, 1)), dict(padding=(2**31, 0, 0, 0))]:
            with pytest.raises(ValueError):
                C.conv2d_forward(self.x, self.w, None, self.out(), *conv_args(**over))
        with pytest.raises(TypeError):  # padding needs 4 entries
            C.conv2d_forward(self.x, self.w, None, self.out(), (1, 1), (0, 0), (1, 1), 1)
        with pytest.raises(TypeError):  # does not fit int64
            C.conv2d_forward(self.x, self.w, None, self.out(), (2**70, 1), NO_PAD, (1, 1), 1)

    def test_wrong_dtypes(self):
        for dtype in [np.int32, np.float16, np.complex64, np.bool_, object]:
            with raises(TypeError, "x"):
                C.conv2d_forward(self.x.astype(dtype), self.w, None, self.out(), *conv_args())
        with raises(TypeError, "weight"):
            C.conv2d_forward(self.x, self.w.astype(F64), None, self.out(), *conv_args())
        with raises(TypeError, "bias"):
            C.conv2d_forward(self.x, self.w, np.zeros(6, F64), self.out(), *conv_args())
        with raises(TypeError, "out"):
            C.conv2d_forward(self.x, self.w, None, self.out(dtype=F64), *conv_args())
        with raises(TypeError, "out"):
            C.conv2d_forward(self.x, self.w, None, self.out(dtype=np.int32), *conv_args())

    def test_non_arrays(self):
        with pytest.raises(TypeError):
            C.conv2d_forward(self.x.tolist(), self.w, None, self.out(), *conv_args())
        with pytest.raises(TypeError):
            C.conv2d_forward(self.x, self.w, [0.0] * 6, self.out(), *conv_args())
        with pytest.raises(TypeError):
            C.conv2d_forward(self.x, self.w, None, None, *conv_args())

    def test_non_contiguous(self):
        with raises(ValueError, "x", "contiguous"):
            C.conv2d_forward(self.x[:, :, ::-1], self.w, None, self.out(), *conv_args())
        with raises(ValueError, "weight", "contiguous"):
            C.conv2d_forward(self.x, np.asfortranarray(self.w), None, self.out(), *conv_args())
        with raises(ValueError, "bias", "contiguous"):
            C.conv2d_forward(self.x, self.w, np.zeros(12, F32)[::2], self.out(), *conv_args())
        with raises(ValueError, "out", "contiguous"):
            C.conv2d_forward(self.x, self.w, None, np.zeros((2, 6, 5, 10), F32)[..., ::2], *conv_args())

    def test_out_aliasing_inputs(self):
        buf = np.zeros(self.x.size + 300, F32)
        x = buf[:self.x.size].reshape(self.x.shape)
        with raises(ValueError, "out", "x"):
            C.conv2d_forward(x, self.w, None, buf[100:400].reshape(2, 6, 5, 5), *conv_args())
        wbuf = np.zeros(self.w.size + 300, F32)
        w = wbuf[300:].reshape(self.w.shape)
        with raises(ValueError, "out", "weight"):
            C.conv2d_forward(self.x, w, None, wbuf[10:310].reshape(2, 6, 5, 5), *conv_args())
        bbuf = np.zeros(306, F32)
        with raises(ValueError, "out", "bias"):
            C.conv2d_forward(self.x, self.w, bbuf[300:], bbuf[5:305].reshape(2, 6, 5, 5), *conv_args())

    def test_read_only_out(self):
        y = self.out()
        y.flags.writeable = False
        with raises(ValueError, "out", "writeable"):
            C.conv2d_forward(self.x, self.w, None, y, *conv_args())
        assert not y.any()


class TestCppConvBackward:
    x = rnd(2, 4, 7, 7)
    w = rnd(6, 4, 3, 3)
    gy = rnd(2, 6, 5, 5)

    def test_good_calls_work(self):
        gx, gw, gb = np.zeros_like(self.x), np.zeros_like(self.w), np.zeros(6, F32)
        C.conv2d_backward_input(self.gy, self.w, gx, *conv_args())
        C.conv2d_backward_weight(self.gy, self.x, gw, *conv_args())
        C.conv2d_backward_bias(self.gy, gb)
        for a, b in zip((gx, gw, gb), pk.conv2d_backward(self.gy, self.x, self.w)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def test_backward_input_bad(self):
        with raises(ValueError, "grad_out"):
            C.conv2d_backward_input(self.gy[:, :, :4].copy(), self.w, np.zeros_like(self.x), *conv_args())
        with raises(ValueError, "grad_out"):
            C.conv2d_backward_input(self.gy, self.w, np.zeros_like(self.x), *conv_args(stride=(2, 2)))
        with raises(ValueError, "grad_x"):
            C.conv2d_backward_input(self.gy, self.w, np.zeros((2, 4, 7), F32), *conv_args())
        with raises(ValueError, "weight"):
            C.conv2d_backward_input(self.gy, rnd(6, 3, 3, 3), np.zeros_like(self.x), *conv_args())
        with raises(TypeError, "weight"):
            C.conv2d_backward_input(self.gy, self.w.astype(F64), np.zeros_like(self.x), *conv_args())
        with raises(TypeError, "grad_x"):
            C.conv2d_backward_input(self.gy, self.w, np.zeros(self.x.shape, F64), *conv_args())
        with raises(TypeError, "grad_out"):
            C.conv2d_backward_input(self.gy.astype(np.int64), self.w, np.zeros_like(self.x), *conv_args())
        with raises(ValueError, "grad_out", "contiguous"):
            C.conv2d_backward_input(np.asfortranarray(self.gy), self.w, np.zeros_like(self.x), *conv_args())
        with raises(ValueError, "grad_x", "contiguous"):
            C.conv2d_backward_input(self.gy, self.w, np.zeros((2, 4, 7, 14), F32)[..., ::2], *conv_args())
        with pytest.raises(ValueError):
            C.conv2d_backward_input(self.gy, self.w, np.zeros_like(self.x), *conv_args(groups=0))
        gx = np.zeros_like(self.x)
        gx.flags.writeable = False
        with raises(ValueError, "grad_x", "writeable"):
            C.conv2d_backward_input(self.gy, self.w, gx, *conv_args())
        buf = np.zeros(self.gy.size + self.x.size, F32)
        gy = buf[:self.gy.size].reshape(self.gy.shape)
        with raises(ValueError, "grad_x", "grad_out"):
            C.conv2d_backward_input(gy, self.w, buf[10:10 + self.x.size].reshape(self.x.shape), *conv_args())

    def test_backward_weight_bad(self):
        with raises(ValueError, "grad_out"):
            C.conv2d_backward_weight(self.gy[:1].copy(), self.x, np.zeros_like(self.w), *conv_args())
        with raises(ValueError, "grad_weight"):
            C.conv2d_backward_weight(self.gy, self.x, np.zeros((6, 4, 3), F32), *conv_args())
        with raises(ValueError):
            C.conv2d_backward_weight(self.gy, self.x, np.zeros((6, 2, 3, 3), F32), *conv_args())
        with raises(TypeError, "x"):
            C.conv2d_backward_weight(self.gy, self.x.astype(F64), np.zeros_like(self.w), *conv_args())
        with raises(TypeError, "grad_weight"):
            C.conv2d_backward_weight(self.gy, self.x, np.zeros(self.w.shape, np.float16), *conv_args())
        with raises(ValueError, "x", "contiguous"):
            C.conv2d_backward_weight(self.gy, self.x[:, :, ::-1], np.zeros_like(self.w), *conv_args())
        buf = np.zeros(self.x.size, F32)
        x = buf.reshape(self.x.shape)
        with raises(ValueError, "grad_weight", "x"):
            C.conv2d_backward_weight(self.gy, x, buf[:self.w.size].reshape(self.w.shape), *conv_args())
        gw = np.zeros_like(self.w)
        gw.flags.writeable = False
        with raises(ValueError, "grad_weight", "writeable"):
            C.conv2d_backward_weight(self.gy, self.x, gw, *conv_args())

    def test_backward_bias_bad(self):
        with raises(ValueError, "grad_bias"):
            C.conv2d_backward_bias(self.gy, np.zeros(5, F32))
        with raises(ValueError, "grad_bias"):
            C.conv2d_backward_bias(self.gy, np.zeros((6, 1), F32))
        with raises(ValueError, "grad_out"):
            C.conv2d_backward_bias(self.gy[0], np.zeros(6, F32))
        with raises(TypeError, "grad_bias"):
            C.conv2d_backward_bias(self.gy, np.zeros(6, F64))
        with raises(TypeError, "grad_out"):
            C.conv2d_backward_bias(self.gy.astype(np.int32), np.zeros(6, F32))
        with raises(ValueError, "grad_out", "contiguous"):
            C.conv2d_backward_bias(self.gy[:, :, ::-1], np.zeros(6, F32))
        with raises(ValueError, "grad_bias", "grad_out"):
            C.conv2d_backward_bias(self.gy, self.gy.reshape(-1)[:6])
        gb = np.zeros(6, F32)
        gb.flags.writeable = False
        with raises(ValueError, "grad_bias", "writeable"):
            C.conv2d_backward_bias(self.gy, gb)
        with pytest.raises(TypeError):
            C.conv2d_backward_bias(self.gy.tolist(), np.zeros(6, F32))


class TestCppRelu:
    x = rnd(2, 3, 4, 5)

    def test_good_and_in_place(self):
        x = self.x.copy()
        C.relu_forward(x, x)
        np.testing.assert_array_equal(x, np.maximum(self.x, 0))

    def test_bad(self):
        with raises(ValueError, "out"):
            C.relu_forward(self.x, np.zeros((2, 3, 4, 6), F32))
        with raises(ValueError, "out"):
            C.relu_forward(self.x, np.zeros((2, 3, 20), F32))
        with raises(TypeError, "out"):
            C.relu_forward(self.x, np.zeros(self.x.shape, F64))
        with raises(TypeError, "x"):
            C.relu_forward(self.x.astype(np.int8), np.zeros(self.x.shape, F32))
        with raises(ValueError, "x", "contiguous"):
            C.relu_forward(self.x[..., ::-1], np.zeros(self.x.shape, F32))
        with raises(ValueError, "out", "contiguous"):
            C.relu_forward(self.x, np.zeros(self.x.shape, F32, order="F"))
        buf = np.zeros(self.x.size + 7, F32)
        with raises(ValueError, "out", "x"):  # partial overlap is refused, exact aliasing is allowed
            C.relu_forward(buf[:self.x.size].reshape(self.x.shape), buf[7:].reshape(self.x.shape))
        y = np.zeros(self.x.shape, F32)
        y.flags.writeable = False
        with raises(ValueError, "out", "writeable"):
            C.relu_forward(self.x, y)
        with pytest.raises(TypeError):
            C.relu_forward(self.x.tolist(), np.zeros(self.x.shape, F32))

    def test_backward_bad(self):
        g = np.zeros(self.x.shape, F32)
        with raises(ValueError, "y"):
            C.relu_backward(self.x, self.x[:1].copy(), g)
        with raises(ValueError, "grad_x"):
            C.relu_backward(self.x, self.x, g[:1].copy())
        with raises(TypeError, "y"):
            C.relu_backward(self.x, self.x.astype(F64), g)
        with raises(TypeError, "grad_x"):
            C.relu_backward(self.x, self.x, g.astype(F64))
        with raises(TypeError, "grad_out"):
            C.relu_backward(self.x.astype(np.complex64), self.x, g)
        with raises(ValueError, "y", "contiguous"):
            C.relu_backward(self.x, np.asfortranarray(self.x), g)
        buf = np.zeros(self.x.size + 3, F32)
        with raises(ValueError, "grad_x", "y"):
            C.relu_backward(self.x, buf[:self.x.size].reshape(self.x.shape), buf[3:].reshape(self.x.shape))


class TestCppMaxPool:
    x = rnd(2, 3, 7, 7)
    pool = ((2, 2), (2, 2), NO_PAD, (1, 1), False)

    def outputs(self):
        return np.zeros((2, 3, 3, 3), F32), np.zeros((2, 3, 3, 3), np.int64)

    def test_good_call_works(self):
        y, idx = self.outputs()
        C.max_pool2d_forward(self.x, y, idx, *self.pool)
        want_y, want_i = pk.max_pool2d(self.x, 2, return_indices=True)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(idx, want_i)
        gx = np.zeros_like(self.x)
        C.max_pool2d_backward(y, idx, gx, *self.pool)
        np.testing.assert_array_equal(gx, pk.max_pool2d_backward(y, idx, self.x.shape, 2))
        y2, _ = self.outputs()
        C.max_pool2d_forward(self.x, y2, None, *self.pool)
        np.testing.assert_array_equal(y2, want_y)

    def test_forward_bad(self):
        y, idx = self.outputs()
        with raises(ValueError, "out"):
            C.max_pool2d_forward(self.x, y[..., :2].copy(), idx, *self.pool)
        with raises(ValueError, "indices"):
            C.max_pool2d_forward(self.x, y, idx[..., :2].copy(), *self.pool)
        with raises(TypeError, "indices", "int64"):
            C.max_pool2d_forward(self.x, y, idx.astype(np.int32), *self.pool)
        with raises(TypeError, "indices", "int64"):
            C.max_pool2d_forward(self.x, y, idx.astype(F32), *self.pool)
        with raises(TypeError, "out"):
            C.max_pool2d_forward(self.x, y.astype(F64), idx, *self.pool)
        with raises(TypeError, "x"):
            C.max_pool2d_forward(self.x.astype(np.uint16), y, idx, *self.pool)
        with raises(ValueError, "x"):
            C.max_pool2d_forward(self.x[0], y, idx, *self.pool)
        with raises(ValueError, "x", "contiguous"):
            C.max_pool2d_forward(self.x[:, :, ::-1], y, idx, *self.pool)
        with raises(ValueError, "indices", "contiguous"):
            C.max_pool2d_forward(self.x, y, np.zeros((2, 3, 3, 6), np.int64)[..., ::2], *self.pool)
        with raises(ValueError, "padding"):  # window wholly in the padding
            C.max_pool2d_forward(self.x, np.zeros((2, 3, 5, 5), F32), None, (2, 2), (2, 2), (2, 2, 2, 2), (1, 1),
                                 False)
        for bad in [((0, 2), (2, 2), NO_PAD, (1, 1)), ((2, 2), (0, 2), NO_PAD, (1, 1)),
                    ((2, 2), (2, 2), (0, -1, 0, 0), (1, 1)), ((2, 2), (2, 2), NO_PAD, (1, 0)),
                    ((2**31, 2), (2, 2), NO_PAD, (1, 1)), ((9, 9), (1, 1), NO_PAD, (1, 1))]:
            with pytest.raises(ValueError):
                C.max_pool2d_forward(self.x, y, idx, *bad, False)
        ro = np.zeros_like(y)
        ro.flags.writeable = False
        with raises(ValueError, "out", "writeable"):
            C.max_pool2d_forward(self.x, ro, idx, *self.pool)
        ro_i = np.zeros_like(idx)
        ro_i.flags.writeable = False
        with raises(ValueError, "indices", "writeable"):
            C.max_pool2d_forward(self.x, y, ro_i, *self.pool)
        buf = np.zeros(self.x.size, F32)
        with raises(ValueError, "out", "x"):
            C.max_pool2d_forward(buf.reshape(self.x.shape), buf[:54].reshape(2, 3, 3, 3), None, *self.pool)
        ibuf = np.zeros(self.x.size // 2 + 1, np.int64)  # same bytes as x's float32 data
        xv = ibuf.view(F32)[:self.x.size].reshape(self.x.shape)
        with raises(ValueError, "indices", "x"):
            C.max_pool2d_forward(xv, y, ibuf[:54].reshape(2, 3, 3, 3), *self.pool)
        ybuf = np.zeros(54, np.int64)
        with raises(ValueError, "indices", "out"):
            C.max_pool2d_forward(self.x, ybuf.view(F32)[:54].reshape(2, 3, 3, 3), ybuf.reshape(2, 3, 3, 3),
                                 *self.pool)

    def test_backward_bad(self):
        y, idx = self.outputs()
        C.max_pool2d_forward(self.x, y, idx, *self.pool)
        gx = np.zeros_like(self.x)
        for bad_value, where in [(-1, (0, 0, 0, 0)), (49, (1, 2, 2, 2)), (2**62, (1, 0, 1, 0)), (14, (0, 1, 0, 0))]:
            bad = idx.copy()
            bad[where] = bad_value
            with raises(ValueError, "indices[" + ", ".join(map(str, where)) + "]", str(bad_value)):
                C.max_pool2d_backward(y, bad, gx, *self.pool)
        with raises(TypeError, "indices"):
            C.max_pool2d_backward(y, idx.astype(np.int32), gx, *self.pool)
        with raises(TypeError, "indices"):
            C.max_pool2d_backward(y, idx.astype(F32), gx, *self.pool)
        with raises(ValueError, "indices"):
            C.max_pool2d_backward(y, idx[..., :2].copy(), gx, *self.pool)
        with raises(ValueError, "indices", "contiguous"):
            C.max_pool2d_backward(y, np.asfortranarray(idx), gx, *self.pool)
        with raises(ValueError, "grad_out"):
            C.max_pool2d_backward(y[..., :2].copy(), idx, gx, *self.pool)
        with raises(ValueError, "grad_x"):
            C.max_pool2d_backward(y, idx, np.zeros((2, 3, 7), F32), *self.pool)
        with raises(ValueError):  # grad_x of another size implies another output shape
            C.max_pool2d_backward(y, idx, np.zeros((2, 3, 9, 9), F32), *self.pool)
        with raises(TypeError, "grad_x"):
            C.max_pool2d_backward(y, idx, gx.astype(F64), *self.pool)
        with raises(TypeError, "grad_out"):
            C.max_pool2d_backward(y.astype(np.int64), idx, gx, *self.pool)
        with raises(ValueError, "grad_x", "contiguous"):
            C.max_pool2d_backward(y, idx, np.zeros((2, 3, 7, 14), F32)[..., ::2], *self.pool)
        ro = np.zeros_like(gx)
        ro.flags.writeable = False
        with raises(ValueError, "grad_x", "writeable"):
            C.max_pool2d_backward(y, idx, ro, *self.pool)
        buf = np.zeros(self.x.size + 54, F32)
        with raises(ValueError, "grad_x", "grad_out"):
            C.max_pool2d_backward(buf[:54].reshape(y.shape), idx, buf[:self.x.size].reshape(self.x.shape),
                                  *self.pool)
        with pytest.raises(ValueError):
            C.max_pool2d_backward(y, idx, gx, (2, 2), (0, 2), NO_PAD, (1, 1), False)
        with pytest.raises(TypeError):
            C.max_pool2d_backward(y, None, gx, *self.pool)


def test_remembered_geometry_does_not_admit_bools_or_floats():
    """_args remembers the geometry of valid calls; stride=True (== 1) or 2.0 (== 2) must still raise
    after the valid call with the same values was remembered."""
    x, w = rnd(1, 2, 9, 9), rnd(3, 2, 3, 3)
    for good, bad in ((1, True), (2, 2.0), ((1, 2), (True, 2)), ((2, 2), (2, 2.0))):
        pk.conv2d(x, w, stride=good)
        with pytest.raises(TypeError, match="stride"):
            pk.conv2d(x, w, stride=bad)
        pk.max_pool2d(x, 2, stride=good)
        with pytest.raises(TypeError, match="stride"):
            pk.max_pool2d(x, 2, stride=bad)
    pk.max_pool2d(x, 3, padding=1)
    with pytest.raises(TypeError, match="padding"):
        pk.max_pool2d(x, 3, padding=True)
    with pytest.raises(TypeError, match="ceil_mode"):
        pk.max_pool2d(x, 3, padding=1, ceil_mode=2)
