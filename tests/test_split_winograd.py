"""4x4 to 6x6 kernels on the Winograd path as a 3x3 layer of four times the input channels
(csrc/cpu/split_kernel.cpp) against the float64 reference.

The kernel, zero-padded to 6x6, splits into four 3x3 pieces; each piece convolves x shifted by its offset,
which F(4x4)'s input transform reads in place.
Forward takes that path where its cost rule says so, backward-input where it runs as the transposed
convolution through the forward ('same'-like padding, 5x5 and 6x6), backward-weight where its own rule
does. Every case is checked to take the paths it is meant to test, and runs under both algorithms ('auto'
and 'gemm': the latter turns every Winograd path off) in float32 and float64.
"""

import numpy as np
import pytest

import _pykernels_cpu
import pykernels as pk
from pykernels import reference as ref

# name: (x shape, weight shape, padding, backward-input as the split transposed forward, backward-weight split)
CASES = {
    # 'same' 5x5 (conv_5x5_64's layout on a small image): forward and backward-input split
    "same_5x5": ((2, 32, 16, 17), (32, 32, 5, 5), 2, True, False),
    # asymmetric padding: the pieces start at different rows and columns of x
    "asym_pad_5x5": ((2, 32, 16, 17), (32, 32, 5, 5), ((1, 2), (0, 3)), True, False),
    # 4x6: pieces cut by the kernel's edges differently along the two axes
    "k4x6": ((3, 32, 21, 19), (32, 32, 4, 6), 1, False, False),
    # 6x6 with no padding: no zero taps, and the pieces read x without padding (backward-weight split)
    "k6x6_valid": ((3, 16, 20, 20), (16, 16, 6, 6), 0, False, True),
    # 4x4 with asymmetric padding: backward-input as the transposed convolution (16 taps), split as well
    "k4x4_asym": ((2, 32, 30, 30), (32, 32, 4, 4), ((1, 2), (1, 2)), True, False),
    # 7 images of 81 tiles: F(4x4)'s chunks of tiles span images
    "seven_images": ((7, 64, 36, 36), (32, 64, 5, 5), 2, True, True),
    # 17.7 MB of transformed filters in float32 (160 x 768 x 36): transformed block by block as the GEMMs use
    # them (winograd_streamed_filters), forward and the transposed forward alike
    "streamed_filters": ((2, 192, 14, 14), (160, 192, 5, 5), 2, True, False),
    # 64 channels in and out, as conv_5x5_64 (backward-weight split)
    "channels_64": ((2, 64, 20, 20), (64, 64, 5, 5), 2, True, True),
    # batch 1: backward-input on col2im (the transposed forward wants two images, or wide rows, or the split
    # path, which 40 channels do not take)
    "batch1": ((1, 48, 24, 24), (40, 48, 5, 5), 2, False, False),
    # batch 1 with a transposed forward that splits (48 -> 32 channels): backward-input runs as that forward
    "batch1_transposed_split": ((1, 32, 20, 21), (48, 32, 5, 5), 2, True, False),
}


def _layer(name, itemsize):
    x_shape, w_shape, padding = CASES[name][:3]
    (pt, pb), (pl, pr) = ref.normalize_padding(padding, x_shape[2:], w_shape[2:], (1, 1), (1, 1))
    return x_shape, w_shape, (1, 1), (pt, pb, pl, pr), (1, 1), 1, itemsize


@pytest.mark.parametrize("itemsize", [4, 8], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_cases_take_the_split_path(name, itemsize):
    _, _, _, backward_input, backward_weight = CASES[name]
    layer = _layer(name, itemsize)
    assert _pykernels_cpu.conv2d_uses_split_winograd(*layer)
    assert _pykernels_cpu.conv2d_backward_weight_uses_split_winograd(*layer) == backward_weight
    # backward-input: the transposed convolution through the forward, and that forward split too
    assert _pykernels_cpu.conv2d_backward_input_uses_transposed_forward(*layer) == backward_input
    if backward_input:
        x_shape, w_shape, _, (pt, pb, pl, pr), _, _, _ = layer
        R, S = w_shape[2:]
        transposed_x = (x_shape[0], w_shape[0], x_shape[2] + pt + pb - R + 1, x_shape[3] + pl + pr - S + 1)
        transposed_pads = (R - 1 - pt, R - 1 - pb, S - 1 - pl, S - 1 - pr)
        assert _pykernels_cpu.conv2d_uses_split_winograd(transposed_x, (w_shape[1], w_shape[0], R, S), (1, 1),
                                                         transposed_pads, (1, 1), 1, itemsize)


def test_other_layers_do_not():
    def split(x_shape, w_shape, stride=(1, 1), pads=(2, 2, 2, 2), dilation=(1, 1), groups=1):
        return _pykernels_cpu.conv2d_uses_split_winograd(x_shape, w_shape, stride, pads, dilation, groups, 4)
    assert split((8, 64, 28, 28), (64, 64, 5, 5))  # conv_5x5_64
    assert not split((8, 64, 28, 28), (64, 64, 5, 5), stride=(2, 2))
    assert not split((8, 64, 28, 28), (64, 64, 5, 5), dilation=(2, 2))
    assert not split((8, 64, 28, 28), (64, 32, 5, 5), groups=2)
    assert not split((8, 64, 28, 28), (64, 64, 7, 7), pads=(3, 3, 3, 3))  # 7x7: more than four pieces
    assert not split((8, 64, 28, 28), (64, 64, 3, 3), pads=(1, 1, 1, 1))  # 3x3: Winograd itself
    assert not split((8, 8, 28, 28), (64, 8, 5, 5))  # too few input channels
    assert not split((64, 1, 28, 28), (6, 1, 5, 5), pads=(0, 0, 0, 0))  # LeNet: summed directly
    assert not split((2, 64, 7, 7), (64, 64, 5, 5))  # 7x7 images: too few 4x4 tiles
    # input channels not a multiple of the input transform's block of 16 (a block would straddle two pieces)
    assert not split((3, 20, 21, 19), (32, 20, 4, 6), pads=(1, 1, 1, 1))
    # few tiles: the 3x3 layer would take F(2x2), which reads x as it lies (no pieces)
    assert not split((1, 256, 14, 14), (256, 256, 5, 5))
    # over twice as many input channels as output channels on 64 tiles or more: the GEMM path; fewer tiles split
    assert not split((8, 192, 28, 28), (32, 192, 5, 5))
    assert not split((7, 64, 36, 36), (16, 64, 5, 5))
    assert split((1, 192, 28, 28), (32, 192, 5, 5))


def _relative_error(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


# As tests/test_winograd.py: F(4x4) rounds a few more times than direct convolution.
TOLERANCE = {np.float32: 3e-5, np.float64: 1e-12}


def _check_against_reference(name, dtypes=(np.float32, np.float64)):
    x_shape, w_shape, padding = CASES[name][:3]
    rng = np.random.default_rng(13)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    want = ref.conv2d(x, w, b, padding=padding)
    g = rng.standard_normal(want.shape)
    want_gx, want_gw, _ = ref.conv2d_backward(g, x, w, padding=padding)
    for dtype in dtypes:
        y = pk.conv2d(x.astype(dtype), w.astype(dtype), b.astype(dtype), padding=padding)
        gx, gw, _ = pk.conv2d_backward(g.astype(dtype), x.astype(dtype), w.astype(dtype), padding=padding,
                                       need_bias=False)
        assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
        assert _relative_error(y, want) < TOLERANCE[dtype], ("forward", dtype)
        assert _relative_error(gx, want_gx) < TOLERANCE[dtype], ("backward-input", dtype)
        assert _relative_error(gw, want_gw) < TOLERANCE[dtype], ("backward-weight", dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_all_passes_match_reference(algorithm, name):
    _check_against_reference(name)


@pytest.mark.parametrize("name", ["k4x6", "seven_images", "channels_64"])
def test_every_instruction_set(isa, name):
    _check_against_reference(name)


def test_deterministic():
    x_shape, w_shape, padding = CASES["seven_images"][:3]
    rng = np.random.default_rng(17)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    g = rng.standard_normal(pk.conv2d(x, w, padding=padding).shape).astype(np.float32)
    first = pk.conv2d_backward(g, x, w, padding=padding, need_bias=False)[:2] + (pk.conv2d(x, w, padding=padding),)
    again = pk.conv2d_backward(g, x, w, padding=padding, need_bias=False)[:2] + (pk.conv2d(x, w, padding=padding),)
    for a, c in zip(first, again):
        assert np.array_equal(a, c)


# A NaN or inf leaves non-finite values in every output of the tiles whose patches read it (four pieces read
# it, and zero taps meet it: 0 * inf is NaN), so the pass is recomputed on the other paths: exactly the
# outputs direct convolution reaches are non-finite.
@pytest.mark.parametrize("where", ["x_inside", "x_last", "weight", "grad_out"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["same_5x5", "k6x6_valid"])
def test_non_finite_values_reach_exactly_what_direct_convolution_reaches(name, bad, where):
    x_shape, w_shape, padding = CASES[name][:3]
    rng = np.random.default_rng(19)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    g = rng.standard_normal(ref.conv2d(x, w, padding=padding).shape)
    target, at = {"x_inside": (x, (1, 3, 7, 4)), "x_last": (x, (-1, -1, -1, -1)), "weight": (w, (2, 1, 4, 0)),
                  "grad_out": (g, (0, 1, 3, 2))}[where]
    target[at] = bad
    with np.errstate(invalid="ignore", over="ignore"):
        got = (pk.conv2d(x, w, padding=padding),) + pk.conv2d_backward(g, x, w, padding=padding, need_bias=False)[:2]
        want = (ref.conv2d(x, w, padding=padding),) + ref.conv2d_backward(g, x, w, padding=padding)[:2]
    for a, e in zip(got, want):
        assert np.array_equal(np.isnan(a), np.isnan(e))
        assert np.array_equal(np.isinf(a), np.isinf(e))
        finite = np.isfinite(e)
        if finite.any():
            assert _relative_error(np.where(finite, a, 0), np.where(finite, e, 0)) < 1e-12
