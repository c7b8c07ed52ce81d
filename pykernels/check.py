"""`python -m pykernels check`: a self-test to run after installing.

Every op and gradient against pykernels.reference (NumPy float64), with random values (--seed), on fixed
shapes that cover the awkward corners (odd sizes, strides, asymmetric and 'same' padding, dilation, groups,
ceil_mode) and reach every kind of CPU kernel (direct sums, the GEMM by rows and wide rows, Winograd F(4x4)
and F(2x2) in all three passes, 5x5 split into 3x3 Winograd, depthwise and grouped layers, pointwise, the
max-pool's gathered rows); prints a table of op, dtype, worst relative error and pass/fail, and exits 1 on
any failure. The test suite (tests/) checks far more shapes and asserts each path is taken.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import ops, reference

# Worst error allowed relative to max |reference| (float32 sums of a few hundred products).
TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10, np.float16: 1e-2}

# (x shape, weight shape, stride, padding, dilation, groups)
CONV_CASES = [
    ((2, 3, 11, 9), (4, 3, 3, 3), 1, 1, 1, 1),
    ((1, 4, 13, 10), (6, 2, 3, 2), 2, ((1, 2), (0, 1)), 2, 2),
    ((3, 6, 8, 7), (6, 1, 3, 3), 1, "same", 1, 6),
    ((2, 5, 15, 15), (7, 5, 4, 4), 3, "same", 1, 1),
    ((2, 8, 7, 9), (5, 8, 1, 1), 1, 0, 1, 1),
    ((1, 3, 20, 20), (8, 3, 7, 7), 2, 3, 1, 1),
    ((2, 1, 12, 12), (3, 1, 3, 3), 1, "valid", 3, 1),
    # (a fourth fuzzing round found the cases above reached the direct sums and the GEMM only)
    ((2, 16, 12, 12), (16, 16, 3, 3), 1, 1, 1, 1),  # Winograd F(4x4): forward and backward-input
    ((4, 64, 12, 12), (64, 64, 3, 3), 1, 1, 1, 1),  # ... and backward-weight
    ((1, 64, 7, 7), (64, 64, 3, 3), 1, 1, 1, 1),  # F(2x2); backward-weight's sums in registers
    ((2, 16, 14, 14), (16, 16, 5, 5), 1, 2, 1, 1),  # 5x5 as 3x3 Winograd; backward-input as the transposed forward
    ((2, 32, 9, 9), (16, 32, 1, 1), 1, 0, 1, 1),  # pointwise: the GEMM reads x in place
    ((2, 32, 10, 10), (32, 1, 3, 3), 1, 1, 1, 32),  # depthwise
    ((2, 32, 9, 9), (32, 4, 3, 3), 1, 1, 1, 8),  # small groups
    ((2, 8, 40, 40), (16, 8, 3, 3), 2, 1, 1, 1),  # strided: wide rows read in place
]
# (x shape, kernel_size, stride, padding, dilation, ceil_mode)
POOL_CASES = [
    ((2, 3, 11, 9), 2, 2, 0, 1, False),
    ((1, 4, 12, 13), 3, 2, 1, 1, True),
    ((2, 2, 9, 10), (3, 2), (2, 1), ((2, 0), (1, 1)), 2, False),
    ((1, 3, 5, 6), 2, 2, 1, 1, True),
    ((2, 2, 14, 14), 3, 2, "same", 1, False),
    ((2, 3, 8, 40), 2, 2, 0, 1, False),  # 20 windows a row: the backward's gathered rows
]


def _relative_error(got, want) -> float:
    """max |got - want| / max |want|; infinite when NaNs are not in the same places (NaN must propagate)."""
    got = np.asarray(got, dtype=np.float64)
    if want.size == 0:
        return 0.0
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(got), nan):
        return float("inf")
    got, want = got[~nan], want[~nan]
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def _results(dtype, xp, rng):
    """Yields (op name, worst relative error) per op for one dtype."""
    to_dev = (lambda a: xp.asarray(a.astype(dtype))) if xp is not np else (lambda a: a.astype(dtype))
    to_host = (lambda a: a.get()) if xp is not np else (lambda a: a)
    worst = {}

    def record(name, err):
        worst[name] = max(worst.get(name, 0.0), err)

    for x_shape, w_shape, stride, padding, dilation, groups in CONV_CASES:
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        x = rng.standard_normal(x_shape)
        w = rng.standard_normal(w_shape)
        b = rng.standard_normal(w_shape[0])
        want = reference.conv2d(x, w, b, **kw)
        record("conv2d", _relative_error(to_host(ops.conv2d(to_dev(x), to_dev(w), to_dev(b), **kw)), want))
        g = rng.standard_normal(want.shape)
        gx, gw, gb = ops.conv2d_backward(to_dev(g), to_dev(x), to_dev(w), **kw)
        rx, rw, rb = reference.conv2d_backward(g, x, w, **kw)
        record("conv2d_backward grad_x", _relative_error(to_host(gx), rx))
        record("conv2d_backward grad_weight", _relative_error(to_host(gw), rw))
        record("conv2d_backward grad_bias", _relative_error(to_host(gb), rb))

    x = rng.standard_normal((3, 5, 7, 9))
    x[0, 0, 0, :3] = [0.0, np.nan, -0.0]
    record("relu", _relative_error(to_host(ops.relu(to_dev(x))), reference.relu(x)))
    g = rng.standard_normal(x.shape)
    record("relu_backward", _relative_error(to_host(ops.relu_backward(to_dev(g), to_dev(x))),
                                            reference.relu_backward(g, x)))

    for x_shape, k, s, p, d, ceil_mode in POOL_CASES:
        kw = dict(stride=s, padding=p, dilation=d, ceil_mode=ceil_mode)
        x = rng.standard_normal(x_shape)
        x.flat[::7] = x.flat[1]  # ties
        want, want_idx = reference.max_pool2d(x, k, **kw)
        y, idx = ops.max_pool2d(to_dev(x), k, **{**kw, "return_indices": True})
        exact = np.array_equal(to_host(idx), want_idx)
        record("max_pool2d", _relative_error(to_host(y), want) if exact else float("inf"))
        g = rng.standard_normal(want.shape)
        got = ops.max_pool2d_backward(to_dev(g), idx, x_shape, k, **kw)
        record("max_pool2d_backward", _relative_error(to_host(got),
                                                      reference.max_pool2d_backward(g, want_idx, x_shape, k, **kw)))
    return worst


def run_check(device: str = "cpu", seed: int = 0, out=sys.stdout) -> bool:
    """Prints the table; True when every op passes."""
    if device == "cuda":
        from . import _backend
        if not _backend.cuda_available():
            print(f"CUDA backend unavailable: {_backend.cuda_unavailable_reason()}", file=out)
            return False
        import cupy as xp
        dtypes = (np.float32, np.float64, np.float16)
    else:
        xp = np
        dtypes = (np.float32, np.float64)
    start = time.perf_counter()
    rows, ok = [], True
    for dtype in dtypes:
        for name, err in _results(dtype, xp, np.random.default_rng(seed)).items():
            passed = err <= TOLERANCE[dtype]
            ok &= passed
            rows.append((name, np.dtype(dtype).name, err, "pass" if passed else "FAIL"))
    width = max(len(r[0]) for r in rows)
    print(f"pykernels self-test on {device}: every op against pykernels.reference (float64)", file=out)
    print(f"{'op':<{width}}  {'dtype':<8}  {'max rel err':>11}  result", file=out)
    for name, dtype, err, verdict in rows:
        print(f"{name:<{width}}  {dtype:<8}  {err:>11.2e}  {verdict}", file=out)
    failed = sum(r[3] == "FAIL" for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} passed in {time.perf_counter() - start:.2f} s", file=out)
    return ok
