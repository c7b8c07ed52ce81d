"""Tests that prove pykernels/reference.py (the float64 truth) is itself right.

Expected values come from hand computation, central finite differences, or PyTorch -- never
from the reference itself.
"""

import importlib.util
import math
import pathlib
import warnings
import zlib

import numpy as np
import pytest

try:
    from pykernels import reference as ref
except ImportError:  # package __init__ may need the compiled extension; the reference does not
    _path = pathlib.Path(__file__).resolve().parents[1] / "pykernels" / "reference.py"
    _spec = importlib.util.spec_from_file_location("pykernels_reference_standalone", _path)
    ref = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(ref)


NAN = float("nan")
INF = float("inf")


def _tf_same(n, k, s, d):
    """TensorFlow 'same' padding, written out independently for the torch comparisons."""
    out = math.ceil(n / s)
    total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
    return total // 2, total - total // 2


# ============================================================================ hand-computed cases

class TestNormalizePadding:
    def test_same_resnet_stem(self):
        assert ref.normalize_padding("same", (224, 224), (7, 7), (2, 2), (1, 1)) == ((2, 3), (2, 3))

    def test_same_resnet_stem_output_is_112(self):
        x = np.random.default_rng(0).standard_normal((1, 1, 224, 224))
        w = np.random.default_rng(1).standard_normal((1, 1, 7, 7))
        y = ref.conv2d(x, w, stride=2, padding="same")
        assert y.shape == (1, 1, 112, 112)
        # first output pixel: window rows/cols -2..4 -> only x[0:5, 0:5] against w[2:7, 2:7]
        assert np.isclose(y[0, 0, 0, 0], np.sum(x[0, 0, 0:5, 0:5] * w[0, 0, 2:7, 2:7]))
        # last output pixel: window starts at 111*2 - 2 = 220 -> x[220:224] against w[0:4] (3 pad rows)
        assert np.isclose(y[0, 0, -1, -1], np.sum(x[0, 0, 220:224, 220:224] * w[0, 0, 0:4, 0:4]))

    def test_same_various(self):
        # in 8, k 3, s 2: out 4, total 6 + 3 - 8 = 1 -> (0, 1)
        assert ref.normalize_padding("same", (8, 8), (3, 3), (2, 2), (1, 1)) == ((0, 1), (0, 1))
        # stride 1, k 4: total 3 -> (1, 2); k 3 dilation 2: total 4 -> (2, 2)
        assert ref.normalize_padding("same", (5, 6), (4, 3), (1, 1), (1, 2)) == ((1, 2), (2, 2))
        # total would be negative -> 0: in 6, k 1, s 2: out 3, 4 + 1 - 6 = -1
        assert ref.normalize_padding("same", (6, 6), (1, 1), (2, 2), (1, 1)) == ((0, 0), (0, 0))
        # int stride / dilation accepted
        assert ref.normalize_padding("same", (7, 10), (3, 5), 1, 1) == ((1, 1), (2, 2))

    def test_explicit_forms(self):
        assert ref.normalize_padding(0, (5, 5), (3, 3), 1, 1) == ((0, 0), (0, 0))
        assert ref.normalize_padding(2, (5, 5), (3, 3), 1, 1) == ((2, 2), (2, 2))
        assert ref.normalize_padding((1, 3), (5, 5), (3, 3), 1, 1) == ((1, 1), (3, 3))
        assert ref.normalize_padding(((1, 0), (0, 2)), (5, 5), (3, 3), 1, 1) == ((1, 0), (0, 2))
        assert ref.normalize_padding("valid", (5, 5), (3, 3), 2, 2) == ((0, 0), (0, 0))


class TestConvHand:
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)

    def test_valid(self):
        y = ref.conv2d(self.x, self.w, bias=np.array([0.5]))
        # 1*1+2*2+4*3+5*4 = 37, 2+6+15+24 = 47, 4+10+21+32 = 67, 5+12+24+36 = 77
        np.testing.assert_array_equal(y, np.array([[[[37.5, 47.5], [67.5, 77.5]]]]))
        assert y.dtype == np.float64

    def test_pad1_stride2(self):
        y = ref.conv2d(self.x, self.w, padding=1, stride=2)
        # windows at rows/cols -1..0 and 1..2:
        # (0,0): x00*w11 = 4; (0,1): x01*w10 + x02*w11 = 6 + 12 = 18
        # (1,0): x10*w01 + x20*w11 = 8 + 28 = 36; (1,1): 5 + 12 + 24 + 36 = 77
        np.testing.assert_array_equal(y, np.array([[[[4.0, 18.0], [36.0, 77.0]]]]))

    def test_asymmetric_padding(self):
        # pad bottom 1 only, no left/right: rows 0..3 (row 3 zero), cols 0..2 -> 3 x 2 output
        y = ref.conv2d(self.x, self.w, padding=((0, 1), (0, 0)))
        assert y.shape == (1, 1, 3, 2)
        np.testing.assert_array_equal(y[0, 0, :2], np.array([[37.0, 47.0], [67.0, 77.0]]))
        # last row: only w's top row sees data: 7*1 + 8*2 = 23, 8 + 18 = 26
        np.testing.assert_array_equal(y[0, 0, 2], np.array([23.0, 26.0]))

    def test_dilation(self):
        x = np.array([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 1, 1, 5)
        w = np.array([1.0, 10.0]).reshape(1, 1, 1, 2)
        y = ref.conv2d(x, w, dilation=2)
        np.testing.assert_array_equal(y.ravel(), [1 + 30, 2 + 40, 3 + 50])

    def test_groups(self):
        x = np.array([2.0, 3.0]).reshape(1, 2, 1, 1)
        w = np.array([10.0, 100.0]).reshape(2, 1, 1, 1)
        y = ref.conv2d(x, w, groups=2)
        np.testing.assert_array_equal(y.ravel(), [20.0, 300.0])
        # same weights, groups=1 with weight (2, 2, 1, 1): each output sees both channels
        w1 = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
        np.testing.assert_array_equal(ref.conv2d(x, w1).ravel(), [2 + 6, 6 + 12])
        # groups=2 with 2 outputs per group: K=4, channel 0 -> outputs 0,1; channel 1 -> outputs 2,3
        w2 = np.array([1.0, -1.0, 2.0, 5.0]).reshape(4, 1, 1, 1)
        np.testing.assert_array_equal(ref.conv2d(x, w2, groups=2).ravel(), [2.0, -2.0, 6.0, 15.0])

    def test_backward_hand(self):
        w = np.ones((1, 1, 2, 2))
        go = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
        gx, gw, gb = ref.conv2d_backward(go, self.x, w)
        # grad_x[i, j] = sum of go over windows covering (i, j)
        np.testing.assert_array_equal(gx[0, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]])
        # grad_w[r, s] = sum_{p,q} go[p,q] * x[p+r, q+s]
        # (0,0): 1+4+12+20 = 37; (0,1): 2+6+15+24 = 47; (1,0): 4+10+21+32 = 67; (1,1): 77
        np.testing.assert_array_equal(gw[0, 0], [[37, 47], [67, 77]])
        np.testing.assert_array_equal(gb, [10.0])
        assert gx.shape == self.x.shape and gw.shape == w.shape and gb.shape == (1,)


class TestReluHand:
    def test_relu_values_and_nan(self):
        x = np.array([-2.0, -0.0, 0.0, 1.5, NAN, -INF, INF], dtype=np.float32)
        y = ref.relu(x)
        assert y.dtype == np.float64
        np.testing.assert_array_equal(y[[0, 1, 2, 3, 5, 6]], [0.0, 0.0, 0.0, 1.5, 0.0, INF])
        assert np.isnan(y[4])

    def test_relu_backward_at_zero_and_sign(self):
        y = np.array([0.0, -0.0, 2.0, -1.0, 1e-300, NAN])
        go = np.array([5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
        np.testing.assert_array_equal(ref.relu_backward(go, y), [0.0, 0.0, 7.0, 0.0, 9.0, 0.0])

    def test_relu_backward_with_x_as_y(self):
        x = np.array([[-3.0, 4.0], [0.0, 0.25]])
        go = np.array([[1.0, 2.0], [3.0, 4.0]])
        np.testing.assert_array_equal(ref.relu_backward(go, x), [[0.0, 2.0], [0.0, 4.0]])


class TestPoolHand:
    def test_basic_2x2(self):
        x = np.array([[1.0, 5.0, 2.0, 0.0],
                      [3.0, 4.0, 9.0, 8.0],
                      [-1.0, -2.0, -5.0, -4.0],
                      [-3.0, -0.5, -6.0, -7.0]]).reshape(1, 1, 4, 4)
        y, idx = ref.max_pool2d(x, 2)
        np.testing.assert_array_equal(y[0, 0], [[5.0, 9.0], [-0.5, -4.0]])
        np.testing.assert_array_equal(idx[0, 0], [[1, 6], [13, 11]])
        assert idx.dtype == np.int64 and y.dtype == np.float64

    @pytest.mark.parametrize(
        "n, k, s, p, ceil, expected",
        [
            (5, 2, 2, 1, True, 3),   # ceil(5/2)+1 = 4, but window 3 would start at 6 >= 5+1 -> 3
            (6, 1, 2, 0, True, 3),   # ceil(5/2)+1 = 4, window 3 starts at 6 >= 6 -> 3
            (5, 2, 2, 0, True, 3),   # ceil(3/2)+1 = 3, start 4 < 5 kept
            (5, 2, 2, 0, False, 2),
            (7, 3, 2, 1, True, 4),   # ceil(6/2)+1 = 4, start 6 < 8 kept
            (8, 3, 3, 1, True, 3),   # ceil(7/3)+1 = 4, start 9 >= 9 -> 3
            (8, 3, 3, 1, False, 3),
        ],
    )
    def test_output_sizes(self, n, k, s, p, ceil, expected):
        x = np.random.default_rng(n * 100 + k).standard_normal((1, 1, n, n + 1))
        y, idx = ref.max_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil)
        assert y.shape[2] == expected
        assert (idx >= 0).all() and (idx < n * (n + 1)).all()

    def test_ceil_mode_partial_window(self):
        x = np.array([1.0, 7.0, 3.0, 2.0, 8.0]).reshape(1, 1, 1, 5)
        y, idx = ref.max_pool2d(x, (1, 2), ceil_mode=True)
        np.testing.assert_array_equal(y.ravel(), [7.0, 3.0, 8.0])
        np.testing.assert_array_equal(idx.ravel(), [1, 2, 4])
        y2, _ = ref.max_pool2d(x, (1, 2), ceil_mode=False)
        np.testing.assert_array_equal(y2.ravel(), [7.0, 3.0])

    def test_ties_first_max_row_major(self):
        x = np.array([[3.0, 5.0], [5.0, 1.0]]).reshape(1, 1, 2, 2)
        y, idx = ref.max_pool2d(x, 2)
        assert y.item() == 5.0 and idx.item() == 1
        x = np.full((1, 1, 2, 3), 4.0)
        x[0, 0, 1, 0] = -1.0
        y, idx = ref.max_pool2d(x, (2, 3))
        assert y.item() == 4.0 and idx.item() == 0
        # tie between rows in a dilated window: taps at (0,0),(0,2),(2,0),(2,2)
        x = np.zeros((1, 1, 3, 3))
        x[0, 0] = [[1.0, 9.0, 2.0], [9.0, 9.0, 9.0], [2.0, 9.0, 0.5]]
        y, idx = ref.max_pool2d(x, 2, dilation=2)
        assert y.item() == 2.0 and idx.item() == 2

    def test_padded_cells_never_chosen(self):
        # negative input with padding: padded cells are -inf, so the max is an input cell
        x = -np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
        y, idx = ref.max_pool2d(x, 3, stride=1, padding=1)
        assert (y < 0).all()
        np.testing.assert_array_equal(idx[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])

    def test_nan_first_nan_index(self):
        x = np.array([[1.0, NAN], [NAN, 9.0]]).reshape(1, 1, 2, 2)
        y, idx = ref.max_pool2d(x, 2)
        assert np.isnan(y.item()) and idx.item() == 1
        x = np.array([[1.0, 2.0], [3.0, NAN]]).reshape(1, 1, 2, 2)
        y, idx = ref.max_pool2d(x, 2)
        assert np.isnan(y.item()) and idx.item() == 3
        # NaN after a larger value, and another window unaffected
        x = np.array([[100.0, 2.0, 5.0, 6.0], [NAN, NAN, 7.0, 1.0]]).reshape(1, 1, 2, 4)
        y, idx = ref.max_pool2d(x, 2)
        assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 4
        assert y[0, 0, 0, 1] == 7.0 and idx[0, 0, 0, 1] == 6

    def test_all_neg_inf_window_gets_first_in_bounds(self):
        x = np.full((1, 1, 3, 3), -INF)
        x[0, 0, 2, 2] = 4.0
        y, idx = ref.max_pool2d(x, 2, stride=2, padding=1)
        # windows: rows/cols -1..0 and 1..2; first in-bounds cells are 0, 1, 3; last holds the 4
        np.testing.assert_array_equal(idx[0, 0], [[0, 1], [3, 8]])
        np.testing.assert_array_equal(y[0, 0], [[-INF, -INF], [-INF, 4.0]])
        assert (idx >= 0).all()
        # -inf window with asymmetric padding and ceil_mode
        x = np.full((1, 1, 2, 5), -INF)
        x[0, 0, 0, 0] = 1.0
        y, idx = ref.max_pool2d(x, 2, stride=2, padding=((1, 0), (0, 0)), ceil_mode=True)
        # rows -1..0, 1..2; cols 0..1, 2..3, 4..5
        assert y.shape == (1, 1, 2, 3)
        np.testing.assert_array_equal(idx[0, 0], [[0, 2, 4], [5, 7, 9]])
        assert y[0, 0, 0, 0] == 1.0 and np.isneginf(y[0, 0, 1]).all()

    def test_same_padding_and_large_padding(self):
        x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
        # 'same' k 2 s 1: total 1 -> pad bottom/right only
        y, idx = ref.max_pool2d(x, 2, stride=1, padding="same")
        np.testing.assert_array_equal(y[0, 0], [[5, 6, 6], [8, 9, 9], [8, 9, 9]])
        np.testing.assert_array_equal(idx[0, 0], [[4, 5, 5], [7, 8, 8], [7, 8, 8]])
        # padding 2 with k 3 (beyond PyTorch's k/2 limit), windows still overlap the input
        y, idx = ref.max_pool2d(-x, 3, stride=1, padding=2)
        assert y.shape == (1, 1, 5, 5)
        assert idx[0, 0, 0, 0] == 0 and y[0, 0, 0, 0] == -1.0
        assert idx[0, 0, 4, 4] == 8 and y[0, 0, 4, 4] == -9.0

    def test_window_whose_taps_all_miss_the_input_is_refused(self):
        # n 1, k 2, dilation 2, pad 1: taps at -1 and 1, both outside the single input cell
        x = np.array([3.0]).reshape(1, 1, 1, 1)
        with pytest.raises(ValueError):
            ref.max_pool2d(x, (1, 2), stride=1, padding=(0, 1), dilation=(1, 2))

    def test_backward_hand_overlapping(self):
        x = np.array([1.0, 9.0, 2.0, 3.0, 0.0]).reshape(1, 1, 1, 5)
        y, idx = ref.max_pool2d(x, (1, 3), stride=(1, 1))
        np.testing.assert_array_equal(idx.ravel(), [1, 1, 3])
        go = np.array([10.0, 20.0, 40.0]).reshape(1, 1, 1, 3)
        gx = ref.max_pool2d_backward(go, idx, x.shape, (1, 3), stride=(1, 1))
        np.testing.assert_array_equal(gx.ravel(), [0.0, 30.0, 0.0, 40.0, 0.0])

    def test_backward_per_plane(self):
        x = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[8.0, 7.0], [6.0, 5.0]]],
                      [[[0.0, -1.0], [-2.0, -3.0]], [[2.0, 2.0], [9.0, 1.0]]]])
        y, idx = ref.max_pool2d(x, 2)
        np.testing.assert_array_equal(idx.reshape(-1), [3, 0, 0, 2])
        go = np.array([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1, 1)
        gx = ref.max_pool2d_backward(go, idx, x.shape, 2)
        expected = np.zeros((2, 2, 2, 2))
        expected[0, 0, 1, 1] = 1.0
        expected[0, 1, 0, 0] = 2.0
        expected[1, 0, 0, 0] = 3.0
        expected[1, 1, 1, 0] = 4.0
        np.testing.assert_array_equal(gx, expected)


# ============================================================================ finite differences

def _fd_grad(f, a, eps):
    """Central-difference gradient of scalar f at array a (float64)."""
    a = a.copy()
    g = np.zeros_like(a)
    flat = a.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(a)
        flat[i] = old - eps
        fm = f(a)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


CONV_FD_CONFIGS = [
    # name, (N, C, H, W), (K, Cg, R, S), kwargs
    ("basic_pad1", (2, 3, 5, 6), (4, 3, 3, 3), dict(padding=1)),
    ("stride2_nonsquare", (1, 2, 7, 6), (3, 2, 3, 2), dict(stride=2)),
    ("stride3x2_dil2_pairpad", (2, 2, 9, 8), (2, 2, 2, 3), dict(stride=(3, 2), padding=(1, 2), dilation=2)),
    ("groups2_asym", (1, 4, 5, 5), (6, 2, 3, 2), dict(groups=2, padding=((1, 0), (0, 2)))),
    ("depthwise_same_s2", (2, 3, 8, 7), (3, 1, 3, 4), dict(groups=3, stride=2, padding="same")),
    ("depthwise_mult2_dil", (1, 2, 6, 7), (4, 1, 2, 3), dict(groups=2, dilation=(2, 1), padding=(2, 1))),
    ("same_odd_total_s3_dil2", (1, 2, 8, 10), (2, 2, 3, 2), dict(stride=(2, 3), dilation=(1, 2), padding="same")),
    ("batch1_one_channel", (1, 1, 4, 5), (1, 1, 2, 2), dict(stride=1, padding=((0, 1), (2, 0)))),
    ("valid_1x1_stride2", (2, 3, 5, 4), (2, 3, 1, 1), dict(stride=2, padding="valid")),
    ("groups3_stride3", (2, 6, 7, 7), (3, 2, 3, 3), dict(groups=3, stride=3, padding=1)),
]


@pytest.mark.parametrize("name, xshape, wshape, kw", CONV_FD_CONFIGS, ids=[c[0] for c in CONV_FD_CONFIGS])
def test_conv2d_backward_finite_differences(name, xshape, wshape, kw):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = rng.standard_normal(xshape)
    w = rng.standard_normal(wshape)
    b = rng.standard_normal(wshape[0])
    y = ref.conv2d(x, w, b, **kw)
    go = rng.standard_normal(y.shape)
    gx, gw, gb = ref.conv2d_backward(go, x, w, **kw)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape

    eps = 1e-4
    fd_x = _fd_grad(lambda a: np.sum(ref.conv2d(a, w, b, **kw) * go), x, eps)
    fd_w = _fd_grad(lambda a: np.sum(ref.conv2d(x, a, b, **kw) * go), w, eps)
    fd_b = _fd_grad(lambda a: np.sum(ref.conv2d(x, w, a, **kw) * go), b, eps)
    np.testing.assert_allclose(gx, fd_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, fd_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, fd_b, rtol=1e-6, atol=1e-7)
    # gradients must be non-trivial (guards against comparing zeros with zeros)
    assert np.abs(gx).max() > 1e-3 and np.abs(gw).max() > 1e-3


def test_relu_backward_finite_differences():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 4, 5))
    x = np.where(np.abs(x) < 0.1, np.sign(x) * 0.1 + x, x)  # keep away from the kink at 0
    go = rng.standard_normal(x.shape)
    g = ref.relu_backward(go, ref.relu(x))
    fd = _fd_grad(lambda a: np.sum(ref.relu(a) * go), x, 1e-6)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    assert (g != 0).any() and (g == 0).any()


POOL_FD_CONFIGS = [
    ("k2", (2, 2, 4, 6), dict(kernel_size=2)),
    ("k3s2p1", (1, 2, 7, 6), dict(kernel_size=3, stride=2, padding=1)),
    ("k3s1_overlap", (1, 1, 5, 5), dict(kernel_size=3, stride=1)),
    ("k2s2p1_ceil", (2, 1, 5, 6), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ("dil2_nonsquare", (1, 2, 7, 8), dict(kernel_size=(2, 3), stride=(1, 2), dilation=2)),
    ("asym_pad", (1, 2, 5, 5), dict(kernel_size=3, stride=2, padding=((0, 2), (1, 0)))),
    ("same_s2", (1, 1, 6, 7), dict(kernel_size=3, stride=2, padding="same")),
    ("bigpad_ceil", (1, 1, 4, 5), dict(kernel_size=3, stride=2, padding=2, ceil_mode=True)),
]


@pytest.mark.parametrize("name, xshape, kw", POOL_FD_CONFIGS, ids=[c[0] for c in POOL_FD_CONFIGS])
def test_max_pool2d_backward_finite_differences(name, xshape, kw):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = int(np.prod(xshape))
    # distinct values, gaps of at least 0.05 -> unique max per window, eps far below the gaps
    x = (rng.permutation(n) * 0.1 + rng.uniform(0, 0.05, n) - n * 0.05).reshape(xshape)
    y, idx = ref.max_pool2d(x, **kw)
    go = rng.standard_normal(y.shape)
    gx = ref.max_pool2d_backward(go, idx, x.shape, **kw)
    fd = _fd_grad(lambda a: np.sum(ref.max_pool2d(a, **kw)[0] * go), x, 1e-6)
    np.testing.assert_allclose(gx, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(gx).max() > 1e-3


# ============================================================================ against PyTorch

def _random_conv_config(rng):
    groups = int(rng.choice([1, 1, 2, 3]))
    Cg, Kg = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    N = int(rng.integers(1, 4))
    R, S = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    H = int(rng.integers(dh * (R - 1) + 1, dh * (R - 1) + 9))
    W = int(rng.integers(dw * (S - 1) + 1, dw * (S - 1) + 9))
    form = int(rng.integers(0, 5))
    if form == 0:
        p = int(rng.integers(0, 3))
        padding, pads = p, ((p, p), (p, p))
    elif form == 1:
        ph, pw = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        padding, pads = (ph, pw), ((ph, ph), (pw, pw))
    elif form == 2:
        pads = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(2))
        padding = pads
    elif form == 3:
        padding = "same"
        pads = (_tf_same(H, R, sh, dh), _tf_same(W, S, sw, dw))
    else:
        padding, pads = "valid", ((0, 0), (0, 0))
    return dict(N=N, C=Cg * groups, H=H, W=W, K=Kg * groups, Cg=Cg, R=R, S=S, groups=groups,
                stride=(sh, sw), dilation=(dh, dw), padding=padding, pads=pads)


@pytest.mark.parametrize("seed", range(24))
def test_conv2d_against_torch(seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1000 + seed)
    cfg = _random_conv_config(rng)
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"]))
    w = rng.standard_normal((cfg["K"], cfg["Cg"], cfg["R"], cfg["S"]))
    b = rng.standard_normal(cfg["K"]) if seed % 3 else None
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])

    y = ref.conv2d(x, w, b, **kw)

    (pt, pb), (pl, pr) = cfg["pads"]
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if b is not None else torch.zeros(cfg["K"], dtype=torch.float64,
                                                                               requires_grad=True)
    ty = F.conv2d(F.pad(tx, (pl, pr, pt, pb)), tw, tb, stride=cfg["stride"], dilation=cfg["dilation"],
                  groups=cfg["groups"])
    assert y.shape == tuple(ty.shape)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)

    go = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(go))
    gx, gw, gb = ref.conv2d_backward(go, x, w, **kw)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_conv2d_same_stride1_against_torch_same():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 6, 7))
    for R, S, d in [(3, 3, 1), (4, 2, 1), (2, 3, 2)]:
        w = rng.standard_normal((3, 2, R, S))
        y = ref.conv2d(x, w, padding="same", dilation=d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ty = F.conv2d(torch.tensor(x), torch.tensor(w), padding="same", dilation=d)
        np.testing.assert_allclose(y, ty.numpy(), rtol=1e-10, atol=1e-10)


def test_relu_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5))
    x[0, 0, 0, :3] = [0.0, NAN, -INF]
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.relu(tx)
    np.testing.assert_array_equal(ref.relu(x), ty.detach().numpy())  # NaN == NaN in assert_array_equal
    go = rng.standard_normal(x.shape)
    ty.backward(torch.tensor(go))
    g = ref.relu_backward(go, ref.relu(x))
    # PyTorch passes the gradient through where y is NaN; our convention is "y > 0" literally, so 0
    # there (checked by hand in TestReluHand). Compare everywhere else, including y == 0 exactly.
    finite = ~np.isnan(x)
    assert not finite.all()
    np.testing.assert_array_equal(g[finite], tx.grad.numpy()[finite])
    assert g[0, 0, 0, 0] == 0.0 and tx.grad.numpy()[0, 0, 0, 0] == 0.0


def _random_pool_config(rng):
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    stride = None if rng.random() < 0.25 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))  # PyTorch: pad <= k/2
    ceil_mode = bool(rng.random() < 0.5)
    H = int(rng.integers(max(dh * (kh - 1) + 1 - 2 * ph, 1), dh * (kh - 1) + 9))
    W = int(rng.integers(max(dw * (kw - 1) + 1 - 2 * pw, 1), dw * (kw - 1) + 9))
    N, C = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    return (N, C, H, W), dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw), dilation=(dh, dw),
                              ceil_mode=ceil_mode)


@pytest.mark.parametrize("seed", range(30))
def test_max_pool2d_against_torch(seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2000 + seed)
    shape, kw = _random_pool_config(rng)
    x = rng.standard_normal(shape)
    if seed % 2:  # integer data -> many ties (PyTorch also keeps the first maximum on ties)
        x = np.round(x * 2)
    y, idx = ref.max_pool2d(x, **kw)

    tx = torch.tensor(x, requires_grad=True)
    ty, tidx = F.max_pool2d(tx, kw["kernel_size"], stride=kw["stride"] or kw["kernel_size"],
                            padding=kw["padding"], dilation=kw["dilation"], ceil_mode=kw["ceil_mode"],
                            return_indices=True)
    assert y.shape == tuple(ty.shape)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())
    assert idx.dtype == np.int64

    go = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(go))
    gx = ref.max_pool2d_backward(go, idx, x.shape, **kw)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_max_pool2d_ceil_sizes_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for n in range(1, 12):
        for k in range(1, 5):
            for s in range(1, 4):
                for p in range(0, k // 2 + 1):
                    for d in (1, 2):
                        if n + 2 * p < d * (k - 1) + 1:
                            continue
                        x = np.arange(float(n)).reshape(1, 1, 1, n)
                        ty, tidx = F.max_pool2d(torch.tensor(x), (1, k), stride=(1, s), padding=(0, p),
                                                dilation=(1, d), ceil_mode=True, return_indices=True)
                        args = dict(stride=(1, s), padding=(0, p), dilation=(1, d), ceil_mode=True)
                        if (tidx < 0).any() or (tidx >= n).any():
                            # a dilated window whose taps all miss the input (e.g. n 1, k 2, d 2, p 1):
                            # PyTorch returns -inf with an out-of-range index; the reference refuses.
                            with pytest.raises(ValueError):
                                ref.max_pool2d(x, (1, k), **args)
                            continue
                        y, idx = ref.max_pool2d(x, (1, k), **args)
                        assert y.shape == tuple(ty.shape), (n, k, s, p, d)
                        np.testing.assert_array_equal(y, ty.numpy())
                        np.testing.assert_array_equal(idx, tidx.numpy())
