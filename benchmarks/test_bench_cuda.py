"""GPU benchmarks: design.md's shapes at batch 32 (float32), pykernels' CUDA kernels against cuDNN
(through PyTorch, when it sees a GPU) and a straightforward CuPy im2col + matmul.

    pytest benchmarks/test_bench_cuda.py --benchmark-only        # on a machine with a GPU and CuPy

Skipped where pykernels.cuda_available() is False. Each case is timed with CUDA events
(cupyx.profiler.benchmark: median GPU time of repeated launches after a warm-up); the pytest-benchmark
figure next to it is host time including a synchronisation. Every implementation's result is then
checked against pykernels.reference in float64 (conftest.py's check_result), as on the CPU. At the end
a table of GPU medians per group with pykernels' time as a ratio of each peer's (< 1: pykernels is faster).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import pykernels as pk
from pykernels import reference
from pykernels.shapes import CONV_SHAPES, POOL_SHAPES, RELU_SHAPES

if not pk.cuda_available():
    pytest.skip(f"CUDA backend unavailable: {pk.cuda_unavailable_reason()}", allow_module_level=True)

import cupy as cp  # noqa: E402
from cupyx.profiler import benchmark as cupy_benchmark  # noqa: E402

IMPLS = ["pykernels", "torch_cudnn", "cupy_im2col"]
_GPU_MEDIANS: dict = {}  # group -> {impl: seconds}


# ---- peers -----------------------------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    torch.backends.cudnn.benchmark = True
    return torch


def _cols(x, shape):
    """im2col of x (N, C, H, W) -> (C*R*S, N*P*Q), by strided slices of the padded input per tap."""
    n, c, h, w = x.shape
    _, _, r, s = shape.weight
    (sh, sw), (ph, pw), (dh, dw) = (_pair(shape.kwargs()[k]) for k in ("stride", "padding", "dilation"))
    p, q = shape.out[2], shape.out[3]
    xp = cp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = cp.empty((c, r, s, n, p, q), x.dtype)
    for i in range(r):
        for j in range(s):
            cols[:, i, j] = xp[:, :, i * dh: i * dh + sh * (p - 1) + 1: sh,
                               j * dw: j * dw + sw * (q - 1) + 1: sw].transpose(1, 0, 2, 3)
    return cols.reshape(c * r * s, n * p * q)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _col2im(cols, shape):
    n, c, h, w = shape.x
    _, _, r, s = shape.weight
    (sh, sw), (ph, pw), (dh, dw) = (_pair(shape.kwargs()[k]) for k in ("stride", "padding", "dilation"))
    p, q = shape.out[2], shape.out[3]
    cols = cols.reshape(c, r, s, n, p, q)
    xp = cp.zeros((n, c, h + 2 * ph, w + 2 * pw), cols.dtype)
    for i in range(r):
        for j in range(s):
            xp[:, :, i * dh: i * dh + sh * (p - 1) + 1: sh,
               j * dw: j * dw + sw * (q - 1) + 1: sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return xp[:, :, ph: ph + h, pw: pw + w]


def conv_fn(impl, shape, pass_, x, w, g):
    kw = shape.kwargs()
    if impl == "pykernels":
        if pass_ == "fwd":
            return lambda: pk.conv2d(x, w, **kw)
        need = dict(need_input=pass_ == "bwd_data", need_weight=pass_ == "bwd_weight", need_bias=False)
        return lambda: pk.conv2d_backward(g, x, w, **kw, **need)[0 if pass_ == "bwd_data" else 1]
    if impl == "torch_cudnn":
        torch = _torch()
        tx, tw, tg = (torch.as_tensor(a, device="cuda") for a in (x, w, g))
        conv_kw = dict(stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"])
        if pass_ == "fwd":
            return lambda: torch.nn.functional.conv2d(tx, tw, **conv_kw)
        mask = [pass_ == "bwd_data", pass_ == "bwd_weight", False]
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, None, list(_pair(kw["stride"])), list(_pair(kw["padding"])), list(_pair(kw["dilation"])),
            False, [0, 0], 1, mask)[0 if pass_ == "bwd_data" else 1]
    k = shape.weight[0]
    wm = w.reshape(k, -1)
    if pass_ == "fwd":
        return lambda: cp.ascontiguousarray((wm @ _cols(x, shape)).reshape(k, shape.x[0], *shape.out[2:])
                                            .transpose(1, 0, 2, 3))
    gm = g.transpose(1, 0, 2, 3).reshape(k, -1)
    if pass_ == "bwd_data":
        return lambda: _col2im(wm.T @ gm, shape)
    return lambda: (gm @ _cols(x, shape).T).reshape(shape.weight)


def _time(benchmark, group, impl, fn, flops=None, nbytes=None):
    benchmark.group = group
    res = cupy_benchmark(fn, n_repeat=20, n_warmup=3)
    median = float(np.median(res.gpu_times[0]))
    _GPU_MEDIANS.setdefault(group, {})[impl] = median
    benchmark.extra_info.update(impl=impl, gpu_median_us=round(median * 1e6, 1))
    if flops:
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 2)
    if nbytes:
        benchmark.extra_info["gbps"] = round(nbytes / median / 1e9, 1)

    def synced():
        fn()
        cp.cuda.get_current_stream().synchronize()

    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)


class _OnHost:
    """An implementation's results as check_result reads them: CuPy arrays and torch tensors copied to NumPy."""

    def __init__(self, name):
        self.name = name

    @staticmethod
    def to_numpy(a):
        return a.detach().cpu().numpy() if hasattr(a, "detach") else cp.asnumpy(a)


def _check(bench, impl, result, group, truth):
    """A result made outside the timing against ``truth()`` (the float64 reference, made once per group)."""
    bench.check_result(_OnHost(impl), result, group, truth)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd_data", "bwd_weight"])
@pytest.mark.parametrize("shape", [s.gpu() for s in CONV_SHAPES], ids=lambda s: s.name)
def test_conv2d_gpu(bench, benchmark, impl, shape, pass_):
    arrays = shape.random_inputs(seed=0)
    x, w, _, g = (cp.asarray(a) for a in arrays)
    group, fn = f"gpu-conv2d-{pass_}-{shape.name}", conv_fn(impl, shape, pass_, x, w, g)
    _time(benchmark, group, impl, fn, flops=shape.flops())

    def truth():
        x64, w64, _, g64 = (a.astype(np.float64) for a in arrays)
        if pass_ == "fwd":
            return reference.conv2d(x64, w64, **shape.kwargs())
        return reference.conv2d_backward(g64, x64, w64, **shape.kwargs())[0 if pass_ == "bwd_data" else 1]

    _check(bench, impl, fn(), group, truth)


@pytest.mark.parametrize("impl", ["pykernels", "torch_cudnn"])
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", [s.gpu() for s in RELU_SHAPES], ids=lambda s: s.name)
def test_relu_gpu(bench, benchmark, impl, shape, pass_):
    arrays = shape.random_inputs(seed=0)
    x, g = (cp.asarray(a) for a in arrays)
    if impl == "pykernels":
        fn = (lambda: pk.relu(x)) if pass_ == "fwd" else (lambda: pk.relu_backward(g, x))
    else:
        torch = _torch()
        tx, tg = torch.as_tensor(x, device="cuda"), torch.as_tensor(g, device="cuda")
        fn = (lambda: torch.relu(tx)) if pass_ == "fwd" else (lambda: torch.ops.aten.threshold_backward(tg, tx, 0))
    group = f"gpu-relu-{pass_}-{shape.name}"
    _time(benchmark, group, impl, fn, nbytes=shape.bytes_moved(pass_))
    x64, g64 = (a.astype(np.float64) for a in arrays)
    _check(bench, impl, fn(), group,
           lambda: reference.relu(x64) if pass_ == "fwd" else reference.relu_backward(g64, reference.relu(x64)))


@pytest.mark.parametrize("impl", ["pykernels", "torch_cudnn"])
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", [s.gpu() for s in POOL_SHAPES], ids=lambda s: s.name)
def test_max_pool2d_gpu(bench, benchmark, impl, shape, pass_):
    arrays = shape.random_inputs(seed=0)
    x, g = (cp.asarray(a) for a in arrays)
    kw = dict(kernel_size=shape.kernel_size, **shape.kwargs())
    if impl == "pykernels":
        _, idx = pk.max_pool2d(x, **kw, return_indices=True)
        if pass_ == "fwd":
            fn = lambda: pk.max_pool2d(x, **kw, return_indices=True)  # noqa: E731
        else:
            fn = lambda: pk.max_pool2d_backward(g, idx, x.shape, **kw)  # noqa: E731
    else:
        torch = _torch()
        tx, tg = torch.as_tensor(x, device="cuda"), torch.as_tensor(g, device="cuda")
        tkw = dict(kernel_size=kw["kernel_size"], stride=kw["stride"] or kw["kernel_size"], padding=kw["padding"])
        _, tidx = torch.nn.functional.max_pool2d(tx, **tkw, return_indices=True)
        if pass_ == "fwd":
            fn = lambda: torch.nn.functional.max_pool2d(tx, **tkw, return_indices=True)  # noqa: E731
        else:
            fn = lambda: torch.ops.aten.max_pool2d_with_indices_backward(  # noqa: E731
                tg, tx, list(_pair(tkw["kernel_size"])), list(_pair(tkw["stride"])), list(_pair(tkw["padding"])),
                [1, 1], False, tidx)
    group = f"gpu-max_pool2d-{pass_}-{shape.name}"
    _time(benchmark, group, impl, fn, nbytes=shape.bytes_moved(pass_))
    want_y, want_indices = reference.max_pool2d(arrays[0].astype(np.float64), shape.kernel_size, **shape.kwargs())
    if pass_ == "fwd":
        y, indices = fn()
        _check(bench, impl, y, group, lambda: want_y)
        np.testing.assert_array_equal(_OnHost.to_numpy(indices), want_indices, err_msg=f"{impl}: {group} indices")
    else:
        _check(bench, impl, fn(), group, lambda: reference.max_pool2d_backward(
            arrays[1].astype(np.float64), want_indices, shape.x, shape.kernel_size, **shape.kwargs()))


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    if not _GPU_MEDIANS:
        return
    write = request.config.pluginmanager.get_plugin("terminalreporter").write_line
    write("")
    write(f"GPU medians on {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()} "
          "(pykernels time / peer time: < 1 is faster)")
    write(f"{'group':<44} {'pykernels':>10} {'cuDNN':>10} {'ratio':>6} {'im2col':>10} {'ratio':>6}")
    for group, t in sorted(_GPU_MEDIANS.items()):
        ours = t.get("pykernels", math.nan)
        cells = [f"{ours * 1e6:>8.1f}us"]
        for peer in ("torch_cudnn", "cupy_im2col"):
            theirs = t.get(peer, math.nan)
            cells += [f"{theirs * 1e6:>8.1f}us", f"{ours / theirs:>6.2f}"]
        write(f"{group:<44} " + " ".join(cells))
