"""pykernels.shapes matches design.md's benchmark table; the comparison peers (pykernels.peers) are right.

The NumPy im2col peer is checked against plain loops written here and by the adjoint identity
<grad_out, conv(dx, w)> == <grad_x, dx> (conv is linear in x and in w); the torch peer, when torch
is installed, against the NumPy peer and small loops.
"""

import subprocess
import sys

import numpy as np
import pytest

from pykernels import peers, shapes

# ------------------------------------------------------------------------------------------------
# the table, copied by hand from design.md "Benchmark shapes"

EXPECTED_CONV = [
    # name, x (CPU batch), weight, stride, pad
    ("lenet_5x5", (64, 1, 28, 28), (6, 1, 5, 5), 1, 0),
    ("vgg_3x3_64", (8, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ("resnet_stem", (8, 3, 224, 224), (64, 3, 7, 7), 2, 3),
    ("resnet_3x3_128", (8, 128, 28, 28), (128, 128, 3, 3), 1, 1),
    ("resnet_3x3_256", (8, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ("resnet_3x3_512", (8, 512, 7, 7), (512, 512, 3, 3), 1, 1),
    ("resnet_1x1_256_64", (8, 256, 56, 56), (64, 256, 1, 1), 1, 0),
]
EXPECTED_RELU = [("relu_vgg", (8, 64, 56, 56))]
EXPECTED_POOL = [
    # name, x, kernel, stride, pad
    ("pool2x2_vgg", (8, 64, 56, 56), 2, 2, 0),
    ("pool3x3s2_stem", (8, 64, 112, 112), 3, 2, 1),
]


def test_conv_table_matches_design():
    got = [(s.name, s.x, s.weight, s.stride, s.padding) for s in shapes.CONV_SHAPES]
    assert got == EXPECTED_CONV
    for s in shapes.CONV_SHAPES:
        assert (s.dilation, s.groups) == (1, 1)


def test_relu_and_pool_tables_match_design():
    assert [(s.name, s.x) for s in shapes.RELU_SHAPES] == EXPECTED_RELU
    assert [(s.name, s.x, s.kernel_size, s.stride, s.padding) for s in shapes.POOL_SHAPES] == EXPECTED_POOL
    for s in shapes.POOL_SHAPES:
        assert (s.dilation, s.ceil_mode) == (1, False)


def test_names_unique_and_lookup():
    names = [s.name for s in shapes.ALL_SHAPES]
    assert len(names) == len(set(names)) == 10
    assert shapes.get_shape("resnet_stem") is shapes.CONV_SHAPES[2]
    with pytest.raises(KeyError, match="known"):
        shapes.get_shape("nope")


def test_output_shapes():
    out = {s.name: s.out for s in shapes.CONV_SHAPES}
    assert out["lenet_5x5"] == (64, 6, 24, 24)
    assert out["vgg_3x3_64"] == (8, 64, 56, 56)
    assert out["resnet_stem"] == (8, 64, 112, 112)  # (224 + 6 - 7) // 2 + 1
    assert out["resnet_3x3_512"] == (8, 512, 7, 7)
    assert out["resnet_1x1_256_64"] == (8, 64, 56, 56)
    pool = {s.name: s.out for s in shapes.POOL_SHAPES}
    assert pool["pool2x2_vgg"] == (8, 64, 28, 28)
    assert pool["pool3x3s2_stem"] == (8, 64, 56, 56)  # (112 + 2 - 3) // 2 + 1


def test_flops_hand_checked():
    s = shapes.get_shape("resnet_3x3_128")
    # 2 * N * K * P * Q * C * R * S = 2 * 8 * 128 * 28 * 28 * 128 * 3 * 3
    assert s.flops() == 1_849_688_064
    assert shapes.get_shape("lenet_5x5").flops() == 2 * 64 * 6 * 24 * 24 * 1 * 5 * 5 == 11_059_200
    grouped = shapes.ConvShape("g", (2, 8, 10, 10), (4, 2, 3, 3), groups=4)
    assert grouped.flops() == 2 * 2 * 4 * 8 * 8 * 2 * 3 * 3


def test_gpu_batch():
    for s in shapes.ALL_SHAPES:
        g = s.gpu()
        assert g.x == (shapes.GPU_BATCH,) + s.x[1:] and g.name == s.name
        assert s.x[0] in (8, 64)  # the table itself is unchanged
    s = shapes.get_shape("resnet_3x3_256")
    assert s.gpu().flops() == s.flops() * 4
    assert s.with_batch(1).out == (1, 256, 14, 14)


def test_bytes_moved():
    relu = shapes.get_shape("relu_vgg")
    n = 8 * 64 * 56 * 56
    assert relu.bytes_moved("fwd") == 2 * n * 4
    assert relu.bytes_moved("bwd") == 3 * n * 4
    assert relu.bytes_moved("fwd", np.float64) == 2 * n * 8
    pool = shapes.get_shape("pool2x2_vgg")
    m = 8 * 64 * 28 * 28
    assert pool.bytes_moved("fwd") == n * 4 + m * 4 + m * 8 == 11_239_424
    assert pool.bytes_moved("bwd") == m * 4 + m * 8 + n * 4
    conv = shapes.get_shape("resnet_1x1_256_64")
    assert conv.bytes_moved("fwd") == (8 * 256 * 56 * 56 + 64 * 256 + 8 * 64 * 56 * 56) * 4
    with pytest.raises(ValueError):
        relu.bytes_moved("bwd_data")


def test_random_inputs_seeded():
    s = shapes.get_shape("lenet_5x5")
    x, w, b, g = s.random_inputs(seed=3)
    assert (x.shape, w.shape, b.shape, g.shape) == (s.x, s.weight, s.bias, s.out)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in (x, w, b, g))
    x2 = s.random_inputs(seed=3)[0]
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, s.random_inputs(seed=4)[0])
    p = shapes.get_shape("pool3x3s2_stem").with_batch(1)
    px, pg = p.random_inputs(dtype=np.float64)
    assert px.shape == p.x and pg.shape == p.out and px.dtype == np.float64


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        shapes.ConvShape("bad", (1, 3, 8, 8), (4, 2, 3, 3))  # C / groups != weight's C
    with pytest.raises(ValueError):
        shapes.ConvShape("bad", (1, 3, 2, 2), (4, 3, 3, 3))  # empty output


# ------------------------------------------------------------------------------------------------
# loop references (float64), written independently of peers.py


def _pad4(padding, x_hw, w_hw, stride, dilation):
    return peers._padding4(padding, x_hw, w_hw, peers._pair(stride, "s"), peers._pair(dilation, "d"))


def _padded(x, w, stride, padding, dilation):
    """x zero-padded, with the strides, dilations and (top, left) padding the loops need."""
    N, C, H, W = x.shape
    _, _, R, S = w.shape
    t, bo, l, r = _pad4(padding, (H, W), (R, S), stride, dilation)
    xp = np.zeros((N, C, H + t + bo, W + l + r))
    xp[:, :, t : t + H, l : l + W] = x
    return xp, peers._pair(stride, "s"), peers._pair(dilation, "d"), (t, l)


def loop_conv(x, w, b, stride, padding, dilation, groups):
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    xp, (sh, sw), (dh, dw), _ = _padded(x, w, stride, padding, dilation)
    P = (xp.shape[2] - dh * (R - 1) - 1) // sh + 1
    Q = (xp.shape[3] - dw * (S - 1) - 1) // sw + 1
    Kg = K // groups
    y = np.zeros((N, K, P, Q))
    for n in range(N):
        for k in range(K):
            c0 = (k // Kg) * Cg
            for p in range(P):
                for q in range(Q):
                    acc = 0.0
                    for c in range(Cg):
                        for i in range(R):
                            for j in range(S):
                                acc += xp[n, c0 + c, p * sh + i * dh, q * sw + j * dw] * w[k, c, i, j]
                    y[n, k, p, q] = acc + (0.0 if b is None else b[k])
    return y


def loop_conv_backward(g, x, w, stride, padding, dilation, groups):
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    xp, (sh, sw), (dh, dw), (t, l) = _padded(x, w, stride, padding, dilation)
    gxp = np.zeros_like(xp)
    gw = np.zeros(w.shape)
    Kg = K // groups
    _, _, P, Q = g.shape
    for n in range(N):
        for k in range(K):
            c0 = (k // Kg) * Cg
            for p in range(P):
                for q in range(Q):
                    for c in range(Cg):
                        for i in range(R):
                            for j in range(S):
                                hh, ww = p * sh + i * dh, q * sw + j * dw
                                gxp[n, c0 + c, hh, ww] += g[n, k, p, q] * w[k, c, i, j]
                                gw[k, c, i, j] += g[n, k, p, q] * xp[n, c0 + c, hh, ww]
    return gxp[:, :, t : t + H, l : l + W], gw, g.sum(axis=(0, 2, 3))


# (x shape, weight shape, stride, padding, dilation, groups)
CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1, 1, 1),
    ((2, 3, 9, 8), (4, 3, 3, 2), 2, 0, 1, 1),
    ((1, 4, 9, 9), (6, 2, 3, 3), (2, 1), (1, 2), (2, 1), 2),
    ((2, 2, 6, 7), (3, 2, 2, 3), (1, 2), ((0, 1), (2, 0)), 1, 1),  # asymmetric padding
    ((1, 3, 6, 5), (2, 3, 3, 3), 2, "same", 1, 1),  # same: (0, 1) rows, (1, 1) columns
    ((1, 3, 7, 5), (2, 3, 3, 2), 1, "valid", 1, 1),
    ((2, 4, 5, 5), (3, 4, 1, 1), 1, 0, 1, 1),  # pointwise shortcut
    ((2, 4, 5, 5), (4, 1, 1, 1), 2, 0, 1, 4),  # depthwise 1x1 stride 2
    ((1, 1, 28, 28), (2, 1, 5, 5), 1, 0, 1, 1),  # P*Q = 576: the per-image path by default
]


@pytest.fixture(params=["default", "per_image", "whole_batch"])
def gemm_layout(request, monkeypatch):
    """Run each case through both of the im2col peer's GEMM layouts."""
    if request.param == "per_image":
        monkeypatch.setattr(peers, "_PER_IMAGE_MIN_PQ", 0)
    elif request.param == "whole_batch":
        monkeypatch.setattr(peers, "_PER_IMAGE_MIN_PQ", 10**9)
    return request.param


def _case(xs, ws, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_forward_matches_loops(case, gemm_layout):
    xs, ws, stride, padding, dilation, groups = case
    x, w, b = _case(xs, ws)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    want = loop_conv(x, w, b, **kw)
    got = peers.im2col_conv2d(x, w, b, **kw)
    assert got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(peers.im2col_conv2d(x, w, **kw), want - b.reshape(-1, 1, 1), atol=1e-12)
    out = np.empty_like(want)
    assert peers.im2col_conv2d(x, w, b, **kw, out=out) is out
    np.testing.assert_allclose(out, want, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_backward_matches_loops(case, gemm_layout):
    xs, ws, stride, padding, dilation, groups = case
    x, w, _ = _case(xs, ws)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y_shape = peers.im2col_conv2d(x, w, **kw).shape
    g = np.random.default_rng(1).standard_normal(y_shape)
    want = loop_conv_backward(g, x, w, **kw)
    got = peers.im2col_conv2d_backward(g, x, w, **kw)
    for a, e, what in zip(got, want, ("grad_x", "grad_w", "grad_b")):
        assert a.shape == e.shape, what
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=what)
    only_x = peers.im2col_conv2d_backward(g, x, w, **kw, need_weight=False, need_bias=False)
    assert only_x[1] is None and only_x[2] is None
    np.testing.assert_allclose(only_x[0], want[0], atol=1e-12)
    only_w = peers.im2col_conv2d_backward(g, x, w, **kw, need_input=False, need_bias=False)
    assert only_w[0] is None and only_w[2] is None
    np.testing.assert_allclose(only_w[1], want[1], atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_backward_adjoint_identity(case):
    """conv is linear in x and in w, so <g, conv(dx, w)> = <grad_x, dx> and <g, conv(x, dw)> = <grad_w, dw>."""
    xs, ws, stride, padding, dilation, groups = case
    rng = np.random.default_rng(7)
    x, w, dx, dw = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(xs), rng.standard_normal(ws)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    g = rng.standard_normal(peers.im2col_conv2d(x, w, **kw).shape)
    gx, gw, gb = peers.im2col_conv2d_backward(g, x, w, **kw)
    np.testing.assert_allclose(np.vdot(g, peers.im2col_conv2d(dx, w, **kw)), np.vdot(gx, dx), rtol=1e-10)
    np.testing.assert_allclose(np.vdot(g, peers.im2col_conv2d(x, dw, **kw)), np.vdot(gw, dw), rtol=1e-10)
    db = rng.standard_normal(ws[0])
    lin = peers.im2col_conv2d(x, w, db, **kw) - peers.im2col_conv2d(x, w, **kw)
    np.testing.assert_allclose(np.vdot(g, lin), np.vdot(gb, db), rtol=1e-10)


def test_im2col_float32_stays_float32():
    s = shapes.get_shape("lenet_5x5").with_batch(2)
    x, w, b, g = s.random_inputs()
    y = peers.im2col_conv2d(x, w, b, **s.kwargs())
    assert y.dtype == np.float32 and y.shape == s.out
    want = loop_conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1, 0, 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert all(a.dtype == np.float32 for a in peers.im2col_conv2d_backward(g, x, w, **s.kwargs()))


def test_im2col_rejects_bad_input():
    x, w = np.zeros((1, 3, 5, 5)), np.zeros((2, 3, 3, 3))
    with pytest.raises(TypeError):
        peers.im2col_conv2d(x.astype(np.int32), w)
    with pytest.raises(ValueError):
        peers.im2col_conv2d(x, np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError):
        peers.im2col_conv2d_backward(np.zeros((1, 2, 4, 4)), x, w)


# ------------------------------------------------------------------------------------------------
# peer registry


def test_available_peers():
    names = peers.available_peers()
    assert "numpy_im2col" in names and "numpy" in names
    assert ("torch" in names) == peers.torch_available()
    npp = peers.get_peer("numpy_im2col")
    assert npp is peers.get_peer("numpy_im2col") and npp.supports("conv2d") and not npp.supports("relu")
    with pytest.raises(KeyError):
        peers.get_peer("tensorflow")


def test_peers_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pykernels import peers, shapes\n"
        "assert 'torch' not in peers.available_peers(), peers.available_peers()\n"
        "s = shapes.get_shape('lenet_5x5').with_batch(1); x, w, b, g = s.random_inputs()\n"
        "peers.get_peer('numpy_im2col').conv2d(x, w, b)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_relu_peer():
    p = peers.get_peer("numpy")
    x = np.array([[-1.0, 0.0, 2.0, np.nan]])
    y = p.relu(x)
    np.testing.assert_array_equal(y, [[0.0, 0.0, 2.0, np.nan]])
    g = np.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(p.relu_backward(g, y), [[0.0, 0.0, 3.0, 0.0]])


# ------------------------------------------------------------------------------------------------
# torch peer


def loop_max_pool(x, k, s, p):
    """Plain max-pool with PyTorch's index convention (flat offset in the H*W plane; first max wins)."""
    N, C, H, W = x.shape
    P, Q = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    y, idx = np.empty((N, C, P, Q)), np.empty((N, C, P, Q), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(P):
                for j in range(Q):
                    best, where = -np.inf, -1
                    for a in range(i * s - p, i * s - p + k):
                        for b in range(j * s - p, j * s - p + k):
                            if 0 <= a < H and 0 <= b < W and (where < 0 or x[n, c, a, b] > best):
                                best, where = x[n, c, a, b], a * W + b
                    y[n, c, i, j], idx[n, c, i, j] = best, where
    return y, idx


@pytest.fixture(scope="module")
def tp():
    pytest.importorskip("torch")
    return peers.get_peer("torch")


def _symmetric(padding):
    return not isinstance(padding, str) and not (isinstance(padding, tuple) and isinstance(padding[0], tuple))


@pytest.mark.parametrize("case", [c for c in CONV_CASES if _symmetric(c[3])], ids=str)
def test_torch_conv_matches_numpy(tp, case):
    xs, ws, stride, padding, dilation, groups = case
    x, w, b = _case(xs, ws)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    want = peers.im2col_conv2d(x, w, b, **kw)
    X, W, B = tp.asarray(x), tp.asarray(w), tp.asarray(b)
    np.testing.assert_allclose(tp.to_numpy(tp.conv2d(X, W, B, **kw)), want, rtol=1e-10, atol=1e-10)
    g = np.random.default_rng(1).standard_normal(want.shape)
    got = tp.conv2d_backward(tp.asarray(g), X, W, **kw)
    for a, e in zip(got, peers.im2col_conv2d_backward(g, x, w, **kw)):
        np.testing.assert_allclose(tp.to_numpy(a), e, rtol=1e-10, atol=1e-10)
    gx, gw, gb = tp.conv2d_backward(tp.asarray(g), X, W, **kw, need_input=False, need_bias=False)
    assert gx is None and gb is None and gw is not None


def test_torch_conv_asymmetric_padding_forward(tp):
    x, w, b = _case((1, 3, 6, 5), (2, 3, 3, 3))
    for padding in ("same", ((0, 1), (2, 0))):
        want = loop_conv(x, w, b, 2, padding, 1, 1)
        got = tp.to_numpy(tp.conv2d(tp.asarray(x), tp.asarray(w), tp.asarray(b), stride=2, padding=padding))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_torch_conv_float32_benchmark_shape(tp):
    s = shapes.get_shape("resnet_stem").with_batch(1)
    x, w, b, g = s.random_inputs()
    got = tp.to_numpy(tp.conv2d(tp.asarray(x), tp.asarray(w), tp.asarray(b), **s.kwargs()))
    assert got.dtype == np.float32 and got.shape == s.out
    np.testing.assert_allclose(got, peers.im2col_conv2d(x, w, b, **s.kwargs()), rtol=1e-3, atol=1e-3)


def test_torch_relu(tp):
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    x[0, 0, 0, :2] = 0.0
    y = tp.relu(tp.asarray(x))
    np.testing.assert_array_equal(tp.to_numpy(y), np.maximum(x, 0))
    np.testing.assert_array_equal(tp.to_numpy(tp.relu_backward(tp.asarray(g), y)), np.where(x > 0, g, 0.0))


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_torch_max_pool(tp, k, s, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8))
    want_y, want_idx = loop_max_pool(x, k, s, p)
    y, idx = tp.max_pool2d(tp.asarray(x), k, s, p, return_indices=True)
    np.testing.assert_array_equal(tp.to_numpy(y), want_y)
    np.testing.assert_array_equal(tp.to_numpy(idx), want_idx)
    assert tp.to_numpy(tp.max_pool2d(tp.asarray(x), k, s, p)).shape == want_y.shape
    g = rng.standard_normal(want_y.shape)
    want_gx = np.zeros(x.shape)
    for n in range(2):
        for c in range(3):
            np.add.at(want_gx[n, c].reshape(-1), want_idx[n, c].reshape(-1), g[n, c].reshape(-1))
    gx = tp.max_pool2d_backward(tp.asarray(g), idx, x.shape, k, s, p)
    np.testing.assert_allclose(tp.to_numpy(gx), want_gx, rtol=1e-12, atol=1e-12)
