"""The short way through ops.py (pykernels/_fast.py) for NumPy calls whose shapes and window arguments an
earlier call has vetted.

What a user relies on: a repeated call gives the same bits as the first; it is really the short way (the
argument checks are not run again); anything the short way cannot vouch for (a non-contiguous input, a
wrong dtype or shape, a window argument that only compares equal, like 2.0 or True) gets exactly what the
checked way gives: a copy and the right answer, or its own clear error.
"""

from __future__ import annotations

import numpy as np
import pytest

import pykernels as pk
from pykernels import _args, _fast
from pykernels import reference as ref

RNG = np.random.default_rng(11)


def _data(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def no_plans():
    _fast.forget()
    yield
    _fast.forget()


def _refuse_checks(monkeypatch):
    """Makes ops.py's checked way fail loudly: a call that still works took the short way."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checked way ran")
    for name in ("conv2d_geometry", "pool2d_geometry"):
        monkeypatch.setattr(_args, name, refuse)
    monkeypatch.setattr(pk.ops, "_kind_and_dtype", refuse)


def _conv_case(dtype):
    x, w, b = _data(2, 3, 9, 7, dtype=dtype), _data(4, 3, 3, 3, dtype=dtype), _data(4, dtype=dtype)
    gy = _data(2, 4, 5, 4, dtype=dtype)
    return x, w, b, gy, dict(stride=(2, 2), padding="same", dilation=1, groups=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_calls_take_the_short_way_and_give_the_same_bits(dtype, monkeypatch):
    x, w, b, gy, kw = _conv_case(dtype)
    first_y = pk.conv2d(x, w, b, **kw)
    first_grads = pk.conv2d_backward(gy, x, w, **kw)
    first_relu, first_relu_grad = pk.relu(x), pk.relu_backward(x[::-1].copy(), x)
    first_pool, first_indices = pk.max_pool2d(x, 3, 2, padding=1, return_indices=True)
    gp = _data(*first_pool.shape, dtype=dtype)
    first_pool_grad = pk.max_pool2d_backward(gp, first_indices, x.shape, 3, 2, padding=1)

    _refuse_checks(monkeypatch)
    y = pk.conv2d(x, w, b, **kw)
    assert type(y) is np.ndarray and y.dtype == dtype and y.flags.c_contiguous and y.flags.writeable
    np.testing.assert_array_equal(y, first_y)
    for got, want in zip(pk.conv2d_backward(gy, x, w, **kw), first_grads):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
    gx, gw, gb = pk.conv2d_backward(gy, x, w, **kw, need_input=False, need_bias=False)
    assert gx is None and gb is None
    np.testing.assert_array_equal(gw, first_grads[1])
    np.testing.assert_array_equal(pk.relu(x), first_relu)
    np.testing.assert_array_equal(pk.relu_backward(x[::-1].copy(), x), first_relu_grad)
    pool, indices = pk.max_pool2d(x, 3, 2, padding=1, return_indices=True)
    np.testing.assert_array_equal(pool, first_pool)
    np.testing.assert_array_equal(indices, first_indices)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(pk.max_pool2d(x, 3, 2, padding=1), first_pool)
    np.testing.assert_array_equal(pk.max_pool2d_backward(gp, indices, x.shape, 3, 2, padding=1), first_pool_grad)
    # and the first calls were right (against the float64 reference)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ref.conv2d(x.astype(np.float64), w, b, **kw), **tol)


def test_a_network_step_after_the_first_runs_without_the_checks(monkeypatch):
    """Layers pass their window arguments as tuples, and the max-pool layer's backward a fresh shape tuple:
    exact too."""
    model = pk.layers.Sequential(pk.layers.Conv2D(3, 4, 3, padding=1), pk.layers.ReLU(), pk.layers.MaxPool2D(2))
    x = _data(2, 3, 8, 8)
    y = model.forward(x)
    grad = model.backward(np.ones_like(y))
    _refuse_checks(monkeypatch)
    np.testing.assert_array_equal(model.forward(x), y)
    np.testing.assert_array_equal(model.backward(np.ones_like(y)), grad)


def _not_contiguous(a):
    """a's values in an array that is not C-contiguous."""
    out = np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
    assert not out.flags.c_contiguous
    return out


def _assert_same(got, want):
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            np.testing.assert_array_equal(g, w)


def _refusal_cases():
    """op -> (call of one array, that array, a call the extension refuses, the checked way's message: where
    the extension's own words differ, the pattern matches only the checked way's)."""
    x, w, b, gy, kw = _conv_case(np.float32)
    pool, indices = pk.max_pool2d(x, 2, return_indices=True)
    gp = _data(*pool.shape)
    return {
        "conv2d": (lambda a: pk.conv2d(a, w, b, **kw), x,
                   lambda: pk.conv2d(x, w, b[:3], **kw), r"bias must have shape \(4,\) \(weight's output channels\)"),
        "conv2d_backward": (lambda a: pk.conv2d_backward(a, x, w, **kw), gy,
                            lambda: pk.conv2d_backward(gy[:, :2], x, w, **kw),
                            r"grad_out must have shape \(2, 4, 5, 4\)"),
        "relu": (pk.relu, x, lambda: pk.relu(x.astype(np.float16)), "float16 runs on CUDA only"),
        "relu_backward": (lambda a: pk.relu_backward(a, x), x, lambda: pk.relu_backward(x, x[:1]),
                          r"y must have shape \(2, 3, 9, 7\)"),
        "max_pool2d": (lambda a: pk.max_pool2d(a, 2, return_indices=True), x,
                       lambda: pk.max_pool2d(x.astype(np.int32), 2), "float32, float64; got int32"),
        "max_pool2d_backward": (lambda a: pk.max_pool2d_backward(a, indices, x.shape, 2), gp,
                                lambda: pk.max_pool2d_backward(gp[:, :1], indices, x.shape, 2),
                                r"grad_out must have shape \(2, 3, 4, 3\)"),
    }


@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward", "relu", "relu_backward", "max_pool2d",
                                "max_pool2d_backward"])
def test_what_the_short_way_refuses_gets_the_checked_way(op):
    """After a vetted call: a non-contiguous input gives the right answer (copied), a wrong dtype or shape
    the checked way's message, naming the argument."""
    call, array, refused, message = _refusal_cases()[op]
    want = call(array)
    _assert_same(call(array), want)  # the short way
    _assert_same(call(_not_contiguous(array)), want)
    with pytest.raises((ValueError, TypeError), match=message):
        refused()
    _assert_same(call(array), want)  # and the plan is still good


def test_window_arguments_that_only_compare_equal_still_raise():
    x, w = _data(1, 2, 6, 6), _data(2, 2, 3, 3)
    pk.conv2d(x, w, stride=2, padding=1)
    pk.conv2d(x, w, stride=(2, 2), padding=1)
    for bad in (2.0, (2.0, 2), (2, 2.0)):
        with pytest.raises(TypeError, match="stride"):
            pk.conv2d(x, w, stride=bad, padding=1)
    pk.conv2d(x, w, stride=1, padding=1)
    with pytest.raises(TypeError, match="stride"):
        pk.conv2d(x, w, stride=True, padding=1)
    pk.max_pool2d(x, 2)
    with pytest.raises(TypeError, match="kernel_size"):
        pk.max_pool2d(x, 2.0)


def test_unhashable_and_unusual_arguments_work_as_before():
    x, w = _data(1, 2, 6, 6), _data(2, 2, 3, 3)
    want = pk.conv2d(x, w, stride=[2, 2], padding=[1, 1])
    np.testing.assert_array_equal(pk.conv2d(x, w, stride=[2, 2], padding=[1, 1]), want)
    np.testing.assert_array_equal(pk.conv2d(x, w, stride=2, padding=1), want)
    np.testing.assert_array_equal(pk.conv2d(x, w, stride=np.int64(2), padding=1), want)
    pool = pk.max_pool2d(x, [2, 2])
    np.testing.assert_array_equal(pk.max_pool2d(x, 2), pool)
    _, indices = pk.max_pool2d(x, 2, return_indices=True)
    g = np.ones_like(pool)
    want_grad = pk.max_pool2d_backward(g, indices, [1, 2, 6, 6], 2)
    np.testing.assert_array_equal(pk.max_pool2d_backward(g, indices, (1, 2, 6, 6), 2), want_grad)


def test_a_bad_index_gets_the_same_error_the_short_way():
    x = _data(1, 1, 4, 4)
    y, indices = pk.max_pool2d(x, 2, return_indices=True)
    g = np.ones_like(y)
    pk.max_pool2d_backward(g, indices, x.shape, 2)  # vetted
    bad = indices.copy()
    bad[0, 0, 1, 1] = 0  # cell (0, 0) is not in window (1, 1)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 1, 1\] = 0"):
        pk.max_pool2d_backward(g, bad, x.shape, 2)


def test_plans_stay_bounded():
    x = _data(1, 1, 3, 1)
    for size in range(3, 3 + _fast._MOST_PLANS + 10):
        pk.max_pool2d(np.resize(x, (1, 1, size, 1)), (1, 1))
    assert 0 < len(_fast._plans) <= _fast._MOST_PLANS
    np.testing.assert_array_equal(pk.max_pool2d(x, (1, 1)), x)


def test_mixed_dtypes_after_a_vetted_call_get_the_checked_way_s_message():
    x, w, b, gy, kw = _conv_case(np.float32)
    pk.conv2d(x, w, b, **kw)
    pk.conv2d_backward(gy, x, w, **kw)
    for call in (lambda: pk.conv2d(x, w, b.astype(np.float64), **kw),
                 lambda: pk.conv2d(x.astype(np.float64), w, **kw),
                 lambda: pk.conv2d_backward(gy.astype(np.float64), x, w, **kw),
                 lambda: pk.relu_backward(x, x.astype(np.float64))):
        with pytest.raises(TypeError, match="pass arrays of one dtype"):
            call()


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)])
def test_backward_passes_asked_for_alone_check_every_array_the_short_way(need):
    """After a vetted conv2d_backward: a pass asked for alone (or none) still refuses what the checked way
    refuses, though its extension call does not read every array (fuzzing found grad_x alone returned in
    float32 for a float64 x, grad_b alone for a grad_out of the wrong shape)."""
    x, w, b, gy, kw = _conv_case(np.float32)
    flags = dict(need_input=need[0], need_weight=need[1], need_bias=need[2])
    want = pk.conv2d_backward(gy, x, w, **kw, **flags)
    _assert_same(pk.conv2d_backward(gy, x, w, **kw, **flags), want)  # the short way
    for args, message in (((gy.astype(np.float64), x, w), "pass arrays of one dtype"),
                          ((gy, x.astype(np.float64), w), "pass arrays of one dtype"),
                          ((gy, x, w.astype(np.float64)), "pass arrays of one dtype"),
                          ((gy.astype(np.int64), x, w), "grad_out must have dtype float32, float64"),
                          ((gy[:, :, :-1], x, w), r"grad_out must have shape \(2, 4, 5, 4\)")):
        with pytest.raises((TypeError, ValueError), match=message):
            pk.conv2d_backward(*args, **kw, **flags)
