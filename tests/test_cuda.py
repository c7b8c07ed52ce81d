"""The CUDA backend (_pykernels_cuda) on CuPy arrays.

Two parts:
  * binding checks that need the compiled module but no GPU: arrays described by a fake
    __cuda_array_interface__ go through every host-side check of csrc/bindings/cuda_module.cpp (dtype,
    shape, contiguity, overlap, read-only, non-CuPy arguments) and get the CPU bindings' exceptions;
    with valid arguments and no usable GPU the call fails with RuntimeError, never a crash;
  * GPU tests, skipped with pykernels.cuda_unavailable_reason() where there is no GPU or no CuPy:
    the reference suite of test_ops_vs_reference.py (its named and Hypothesis cases) on CuPy arrays in
    float16, float32 and float64, determinism bit for bit, 64-bit index paths, non-blocking streams with
    other work queued, no hidden synchronisation, device mismatch and mixed-array errors, the layers on
    CuPy, and `python -m pykernels check --device cuda`.
The kernels themselves are also run on the CPU, in an emulator, by csrc/cuda/emu/run_tests.sh.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pykernels as pk
from pykernels import reference as ref

try:
    import _pykernels_cuda as C
except ImportError:  # built without nvcc
    C = None

needs_module = pytest.mark.skipif(C is None, reason="the CUDA extension _pykernels_cuda is not built (no nvcc)")
GPU = pk.cuda_available()
needs_gpu = pytest.mark.skipif(not GPU, reason=f"CUDA backend unavailable: {pk.cuda_unavailable_reason()}")

if GPU:
    import cupy as cp
    from test_ops_vs_reference import (CONV_CASES, POOL_CASES, SETTINGS, conv_configs, conv_kwargs, pool_configs,
                                       pool_data, pool_kwargs, relu_data)

DTYPES = [np.float16, np.float32, np.float64]
DTYPE_IDS = ["f16", "f32", "f64"]
NO_PAD = (0, 0, 0, 0)


# ============================================================================ bindings, no GPU needed

class FakeDeviceArray:
    """An object with a __cuda_array_interface__ (no memory behind it: only host-side checks may run)."""

    def __init__(self, shape, typestr="<f4", ptr=1 << 20, strides=None, readonly=False, version=3, mask=None):
        self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr=typestr, data=(ptr, readonly),
                                             strides=strides, version=version, stream=None, mask=mask)


def fake(shape, typestr="<f4", slot=1, **kw):
    """Fake arrays in disjoint 64 MiB slots, so that they never overlap unless a test says so."""
    return FakeDeviceArray(shape, typestr, ptr=slot << 26, **kw)


def conv_fakes(typestr="<f4"):
    return fake((2, 3, 7, 7), typestr, 1), fake((4, 3, 3, 3), typestr, 2), fake((2, 4, 5, 5), typestr, 3)


def call_conv(x, w, b, y):
    C.conv2d_forward(x, w, b, y, (1, 1), NO_PAD, (1, 1), 1, stream=0)


@needs_module
def test_module_reports_its_build():
    assert C.runtime_version >= 12000
    assert C.architectures  # the CMAKE_CUDA_ARCHITECTURES it was compiled for
    assert isinstance(C.driver_version(), int)


@needs_module
def test_cuda_available_says_why_not():
    if GPU:
        assert pk.cuda_unavailable_reason() is None
    else:
        reason = pk.cuda_unavailable_reason()
        assert isinstance(reason, str) and reason


@needs_module
@pytest.mark.parametrize("typestr, name", [("<i4", "int32"), ("<i8", "int64"), ("<c8", "complex64"), ("|b1", "bool"),
                                           ("<u2", "uint16")])
def test_binding_rejects_dtype(typestr, name):
    x, w, y = conv_fakes()
    with pytest.raises(TypeError, match=f"x must be float16, float32 or float64, got dtype {name}"):
        call_conv(fake((2, 3, 7, 7), typestr, 1), w, None, y)


@needs_module
def test_binding_rejects_mixed_dtypes_and_big_endian():
    x, w, y = conv_fakes()
    with pytest.raises(TypeError, match="weight must have dtype float32, got float64"):
        call_conv(x, fake((4, 3, 3, 3), "<f8", 2), None, y)
    with pytest.raises(TypeError, match="out must have dtype float32, got float16"):
        call_conv(x, w, None, fake((2, 4, 5, 5), "<f2", 3))
    with pytest.raises(TypeError, match="big-endian"):
        call_conv(fake((2, 3, 7, 7), ">f4", 1), w, None, y)


@needs_module
def test_binding_rejects_host_and_foreign_objects():
    x, w, y = conv_fakes()
    with pytest.raises(TypeError, match="x is a numpy.ndarray in host memory"):
        call_conv(np.zeros((2, 3, 7, 7), np.float32), w, None, y)
    with pytest.raises(TypeError, match="weight must be a CuPy array"):
        call_conv(x, [[1.0]], None, y)
    with pytest.raises(TypeError, match="masked"):
        call_conv(x, w, None, FakeDeviceArray((2, 4, 5, 5), ptr=3 << 26, mask=1))


@needs_module
def test_binding_rejects_misaligned_data():
    # The kernels would load and store misaligned elements (the CPU emulator's UBSan showed it); on a GPU that
    # is a fault that poisons the CUDA context.
    x, w, y = conv_fakes()
    with pytest.raises(ValueError, match=r"the data of x \(address \d+\) is not aligned to its 4-byte elements"):
        call_conv(FakeDeviceArray((2, 3, 7, 7), ptr=(1 << 26) + 2), w, None, y)
    with pytest.raises(ValueError, match="the data of out .* 8-byte elements"):
        C.relu_forward(fake((5,), "<f8", 1), FakeDeviceArray((5,), "<f8", ptr=(2 << 26) + 4), stream=0)
    with pytest.raises(ValueError, match="the data of indices .* 8-byte elements"):
        C.max_pool2d_forward(fake((1, 1, 4, 4), "<f4", 1), fake((1, 1, 2, 2), "<f4", 2),
                             FakeDeviceArray((1, 1, 2, 2), "<i8", ptr=(3 << 26) + 4), (2, 2), (2, 2), NO_PAD,
                             (1, 1), False, stream=0)


SHAPE_ERROR_CASES = [
    # (entry point, [(shape, dtype) or None per array argument], trailing arguments)
    ("conv2d_forward", [((2, 3, 7, 7), "f4"), ((4, 3, 3, 3), "f4"), None, ((2, 4, 5, 6), "f4")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_forward", [((3, 7, 7), "f4"), ((4, 3, 3, 3), "f4"), None, ((2, 4, 5, 5), "f4")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_forward", [((2, 3, 7, 7), "f8"), ((4, 3, 3, 3), "f8"), ((5,), "f8"), ((2, 4, 5, 5), "f8")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_forward", [((2, 3, 7, 7), "f4"), ((4, 3, 3, 3), "f4"), None, ((2, 4, 5, 5), "f4")],
     ((1, 1), NO_PAD, (1, 1), 2)),
    ("conv2d_forward", [((2, 4, 7, 7), "f4"), ((4, 3, 3, 3), "f4"), None, ((2, 4, 5, 5), "f4")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_forward", [((2, 3, 2, 2), "f4"), ((4, 3, 3, 3), "f4"), None, ((2, 4, 1, 1), "f4")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_forward", [((2, 3, 7, 7), "f4"), ((4, 3, 3, 3), "f4"), None, ((2, 4, 5, 5), "f4")],
     ((0, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_forward", [((2, 3, 7, 7), "f4"), ((4, 3, 3, 3), "f8"), None, ((2, 4, 5, 5), "f4")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_backward_input", [((2, 4, 5, 5), "f4"), ((4, 3, 3, 3), "f4"), ((2, 3, 7, 8), "f4")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_backward_weight", [((2, 4, 5, 5), "f8"), ((2, 3, 7, 7), "f8"), ((4, 3, 3, 2), "f8")],
     ((1, 1), NO_PAD, (1, 1), 1)),
    ("conv2d_backward_bias", [((2, 4, 5, 5), "f4"), ((3,), "f4")], ()),
    ("relu_forward", [((2, 3), "f4"), ((3, 2), "f4")], ()),
    ("relu_backward", [((2, 3), "f4"), ((3, 2), "f4"), ((2, 3), "f4")], ()),
    ("relu_backward", [((2, 3), "f4"), ((2, 3), "f8"), ((2, 3), "f4")], ()),
    ("max_pool2d_forward", [((1, 1, 4, 4), "f4"), ((1, 1, 2, 2), "f4"), ((1, 1, 2, 3), "i8")],
     ((2, 2), (2, 2), NO_PAD, (1, 1), False)),
    ("max_pool2d_forward", [((1, 1, 4, 4), "f4"), ((1, 1, 2, 2), "f4"), None],
     ((2, 2), (2, 2), (5, 5, 0, 0), (1, 1), False)),
    ("max_pool2d_backward", [((1, 1, 2, 2), "f4"), ((1, 1, 2, 2), "i4"), ((1, 1, 4, 4), "f4")],
     ((2, 2), (2, 2), NO_PAD, (1, 1), False)),
    ("max_pool2d_backward", [((1, 1, 2, 2), "f4"), ((1, 1, 2, 3), "i8"), ((1, 1, 4, 4), "f4")],
     ((2, 2), (2, 2), NO_PAD, (1, 1), False)),
]


@needs_module
@pytest.mark.parametrize("case", range(len(SHAPE_ERROR_CASES)))
def test_binding_errors_match_the_cpu_bindings(case):
    """The same bad arguments give the same exception type and message on both extensions."""
    import _pykernels_cpu

    entry, arrays, rest = SHAPE_ERROR_CASES[case]
    host = [None if a is None else np.zeros(a[0], np.dtype(a[1])) for a in arrays]
    device = [None if a is None else fake(a[0], "<" + a[1], slot=i + 1) for i, a in enumerate(arrays)]
    with pytest.raises((ValueError, TypeError)) as cpu:
        getattr(_pykernels_cpu, entry)(*host, *rest)
    with pytest.raises((ValueError, TypeError)) as gpu:
        getattr(C, entry)(*device, *rest, stream=0)
    assert type(gpu.value) is type(cpu.value)
    assert str(gpu.value) == str(cpu.value)


@needs_module
def test_binding_checks_contiguity_writability_and_overlap():
    x, w, y = conv_fakes()
    transposed = fake((2, 3, 7, 7), slot=1, strides=(4, 8, 24 * 7, 24))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        call_conv(transposed, w, None, y)
    with pytest.raises(ValueError, match="out must be writeable"):
        call_conv(x, w, None, fake((2, 4, 5, 5), slot=3, readonly=True))
    with pytest.raises(ValueError, match="out overlaps the memory of x"):
        call_conv(x, w, None, FakeDeviceArray((2, 4, 5, 5), ptr=(1 << 26) + 64))
    # in place is fine for relu (same buffer), a shifted view is not
    with pytest.raises(ValueError, match="out overlaps the memory of x"):
        C.relu_forward(fake((8,), slot=1), FakeDeviceArray((8,), ptr=(1 << 26) + 4), stream=0)


@needs_module
def test_binding_accepts_contiguous_strides_and_size_one_dims():
    """Explicit C-contiguous strides (any stride on a size-1 dimension) pass the host checks; what
    follows is the device check, which fails here without a GPU (RuntimeError) or with fake pointers
    on a GPU (ValueError) -- never a crash."""
    x = fake((1, 3, 7, 7), slot=1, strides=(999, 196, 28, 4))
    w, y = fake((4, 3, 3, 3), slot=2), fake((1, 4, 5, 5), slot=3)
    with pytest.raises((RuntimeError, ValueError)) as info:
        call_conv(x, w, None, y)
    if not GPU:
        assert isinstance(info.value, RuntimeError)
    else:
        assert "does not point to CUDA memory" in str(info.value) or "not in GPU memory" in str(info.value)


@needs_module
def test_binding_needs_a_stream_keyword():
    x, w, y = conv_fakes()
    with pytest.raises(TypeError):
        C.conv2d_forward(x, w, None, y, (1, 1), NO_PAD, (1, 1), 1)  # no stream=


@pytest.mark.skipif(os.environ.get("PYKERNELS_EMU_TESTS") != "1" or shutil.which("g++") is None,
                    reason="the CPU-emulator run of the CUDA kernels (about 2 minutes) is opt-in: "
                           "PYKERNELS_EMU_TESTS=1, needs g++")
def test_cuda_kernels_in_cpu_emulator(tmp_path):
    """csrc/cuda/emu/run_tests.sh: the kernels and launchers themselves, compiled by g++ for the CPU
    emulator with ASan/UBSan, against double-precision loops (no GPU, no nvcc)."""
    script = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emu" / "run_tests.sh"
    if not script.exists():
        pytest.skip("not a source checkout")
    done = subprocess.run(["bash", str(script), "12"], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYKERNELS_EMU_BUILD": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert " 0 failures" in done.stdout


def test_import_and_cpu_work_without_a_gpu():
    """pykernels imports and runs on NumPy whatever the CUDA situation; the reason is a sentence."""
    code = ("import numpy as np, pykernels as pk; "
            "print(pk.cuda_available(), pk.cuda_unavailable_reason()); "
            "print(pk.relu(np.array([-1.0, 2.0])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[0. 2.]" in out


# ============================================================================ on a GPU

def to_gpu(a):
    return cp.asarray(a)


def tolerance(dtype, terms: int) -> float:
    base = {np.float16: 3e-3, np.float32: 1e-4, np.float64: 1e-10}[np.dtype(dtype).type]
    return base * max(1.0, math.sqrt(terms / 1000.0))


def assert_close(got, want, dtype, terms, what=""):
    assert isinstance(got, cp.ndarray), f"{what}: expected a CuPy array, got {type(got)}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.size == 0:
        return
    got = cp.asnumpy(got).astype(np.float64)
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max())
    tol = tolerance(dtype, terms) * scale
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} (max|ref| {scale:.3g}, {terms} terms)"


def conv_inputs(cfg, dtype, seed, use_bias=True):
    """Host inputs rounded to dtype (the reference sees exactly the values the GPU sees)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["x_shape"]).astype(dtype)
    w = rng.standard_normal(cfg["w_shape"]).astype(dtype)
    b = rng.standard_normal(cfg["w_shape"][0]).astype(dtype) if use_bias else None
    return x, w, b


def check_conv_on_gpu(cfg, dtype, seed, use_bias=True):
    kw = conv_kwargs(cfg)
    x, w, b = conv_inputs(cfg, dtype, seed, use_bias)
    f64 = lambda a: None if a is None else a.astype(np.float64)
    want = ref.conv2d(f64(x), f64(w), f64(b), **kw)
    y = pk.conv2d(to_gpu(x), to_gpu(w), None if b is None else to_gpu(b), **kw)
    _, cg, r, s = cfg["w_shape"]
    assert_close(y, want, dtype, cg * r * s + 1, f"conv2d {cfg}")
    go = np.random.default_rng(seed + 1).standard_normal(want.shape).astype(dtype)
    gx, gw, gb = pk.conv2d_backward(to_gpu(go), to_gpu(x), to_gpu(w), **kw)
    rx, rw, rb = ref.conv2d_backward(f64(go), f64(x), f64(w), **kw)
    n, k = cfg["x_shape"][0], cfg["w_shape"][0]
    npq = n * want.shape[2] * want.shape[3]
    assert_close(gx, rx, dtype, (k // cfg["groups"]) * r * s, f"grad_x {cfg}")
    assert_close(gw, rw, dtype, npq, f"grad_weight {cfg}")
    assert_close(gb, rb, dtype, npq, f"grad_bias {cfg}")


def check_pool_on_gpu(cfg, dtype, seed, kind):
    x = pool_data(cfg["x_shape"], dtype, seed, kind)
    kw = pool_kwargs(cfg)
    try:
        want_y, want_i = ref.max_pool2d(x.astype(np.float64), **kw)
    except ValueError:
        assume(False)
    y, idx = pk.max_pool2d(to_gpu(x), **kw, return_indices=True)
    assert isinstance(y, cp.ndarray) and y.dtype == np.dtype(dtype) and idx.dtype == np.int64
    np.testing.assert_array_equal(cp.asnumpy(y), want_y.astype(dtype), err_msg=f"values {cfg}")
    np.testing.assert_array_equal(cp.asnumpy(idx), want_i, err_msg=f"indices {cfg}")
    np.testing.assert_array_equal(cp.asnumpy(pk.max_pool2d(to_gpu(x), **kw)), cp.asnumpy(y))
    go = np.random.default_rng(seed + 1).standard_normal(want_y.shape).astype(dtype)
    gx = pk.max_pool2d_backward(to_gpu(go), idx, x.shape, **kw)
    want_gx = ref.max_pool2d_backward(go.astype(np.float64), want_i, x.shape, **kw)
    kh, kwid = ref._pair(cfg["kernel_size"])
    assert_close(gx, want_gx, dtype, kh * kwid, f"max_pool2d_backward {cfg}")


# ---- the reference suite -------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CONV_CASES) if GPU else ["-"])
def test_conv2d_named_on_gpu(name, dtype):
    check_conv_on_gpu(CONV_CASES[name], dtype, zlib.crc32(name.encode()))
    check_conv_on_gpu(CONV_CASES[name], dtype, 7, use_bias=False)


@needs_gpu
@pytest.mark.parametrize("name", ["gemm_k70_c37_n3", "gemm_k70_c37_strided", "depthwise", "same_dilated",
                                  "asym_padding_strided_dilated", "resnet_1x1_256_64_small"])
def test_conv2d_64bit_indexing_on_gpu(name, request):
    request.addfinalizer(lambda: C.set_force_int64_indexing(False))
    C.set_force_int64_indexing(True)
    check_conv_on_gpu(CONV_CASES[name], np.float32, 3)
    check_conv_on_gpu(CONV_CASES[name], np.float64, 4)


if GPU:
    @settings(SETTINGS, max_examples=60)
    @given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), use_bias=st.booleans(), seed=st.integers(0, 2**31))
    def test_conv2d_random_on_gpu(cfg, dtype, use_bias, seed):
        check_conv_on_gpu(cfg, dtype, seed, use_bias)

    @settings(SETTINGS, max_examples=120)
    @given(cfg=pool_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
           kind=st.sampled_from(["normal", "ties", "specials"]))
    def test_max_pool2d_random_on_gpu(cfg, dtype, seed, kind):
        check_pool_on_gpu(cfg, dtype, seed, kind)


@needs_gpu
@pytest.mark.parametrize("kind", ["normal", "ties", "specials"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(POOL_CASES) if GPU else ["-"])
def test_max_pool2d_named_on_gpu(name, dtype, kind):
    check_pool_on_gpu(POOL_CASES[name], dtype, 21, kind)


@needs_gpu
def test_max_pool2d_64bit_indexing_on_gpu(request):
    request.addfinalizer(lambda: C.set_force_int64_indexing(False))
    C.set_force_int64_indexing(True)
    for name in ["pool3x3s2_stem_small", "ceil_asym_padding", "padding_beyond_torch_limit_dilated"]:
        check_pool_on_gpu(POOL_CASES[name], np.float32, 5, "specials")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(8, 64, 56, 56), (3, 5, 7, 11), (2, 1, 1, 17), (65536 * 2 + 3,), (1,)],
                         ids=["relu_vgg", "odd", "tail17", "flat_large_odd", "one"])
def test_relu_on_gpu(shape, dtype):
    x = relu_data(shape, dtype, 4)
    y = pk.relu(to_gpu(x))
    np.testing.assert_array_equal(cp.asnumpy(y), ref.relu(x.astype(np.float64)).astype(dtype))
    go = relu_data(shape, dtype, 5, specials=False)
    gx = pk.relu_backward(to_gpu(go), to_gpu(x))
    np.testing.assert_array_equal(cp.asnumpy(gx), ref.relu_backward(go, x).astype(dtype))
    # misaligned views take the element-wise path
    flat = to_gpu(x.reshape(-1))
    if flat.size > 1:
        view = flat[1:]
        np.testing.assert_array_equal(cp.asnumpy(pk.relu(view)), ref.relu(x.reshape(-1)[1:]).astype(dtype))
    # in place
    xx = to_gpu(x)
    assert pk.relu(xx, out=xx) is xx
    np.testing.assert_array_equal(cp.asnumpy(xx), ref.relu(x.astype(np.float64)).astype(dtype))


@needs_gpu
def test_empty_batch_on_gpu():
    x = cp.zeros((0, 3, 7, 7), cp.float32)
    w = cp.ones((4, 3, 3, 3), cp.float32)
    y = pk.conv2d(x, w, cp.ones(4, cp.float32), padding=1)
    assert y.shape == (0, 4, 7, 7)
    gx, gw, gb = pk.conv2d_backward(y, x, w, padding=1)
    assert gx.shape == x.shape and not cp.asnumpy(gw).any() and not cp.asnumpy(gb).any()
    p, i = pk.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert p.shape == (0, 3, 4, 4)
    assert pk.max_pool2d_backward(p, i, x.shape, 3, 2, 1).shape == x.shape
    assert pk.relu(x).shape == x.shape


@needs_gpu
def test_out_and_non_contiguous_inputs_on_gpu():
    cfg = CONV_CASES["asym_padding"]
    x, w, b = conv_inputs(cfg, np.float32, 8)
    want = pk.conv2d(to_gpu(x), to_gpu(w), to_gpu(b), **conv_kwargs(cfg))
    out = cp.full(want.shape, cp.nan, cp.float32)
    assert pk.conv2d(to_gpu(x), to_gpu(w), to_gpu(b), **conv_kwargs(cfg), out=out) is out
    np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(want))
    xt = cp.asfortranarray(to_gpu(x))
    assert not xt.flags.c_contiguous
    np.testing.assert_array_equal(cp.asnumpy(pk.conv2d(xt, to_gpu(w), to_gpu(b), **conv_kwargs(cfg))),
                                  cp.asnumpy(want))


# ---- determinism, streams, synchronisation --------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_is_bitwise_deterministic(dtype):
    rng = np.random.default_rng(9)
    # Long reductions (split-K over N*P*Q), 128x128 and 32x256 tiles, a strided backward-input.
    for x_shape, w_shape, kw in [((16, 64, 28, 28), (64, 64, 3, 3), dict(padding=1)),
                                 ((32, 3, 56, 56), (16, 3, 7, 7), dict(stride=2, padding=3)),
                                 ((8, 32, 14, 14), (32, 1, 3, 3), dict(padding=1, groups=32))]:
        x = to_gpu(rng.standard_normal(x_shape).astype(dtype))
        w = to_gpu(rng.standard_normal(w_shape).astype(dtype))
        y = pk.conv2d(x, w, **kw)
        go = to_gpu(rng.standard_normal(y.shape).astype(dtype))
        first = [cp.asnumpy(g) for g in pk.conv2d_backward(go, x, w, **kw)]
        for _ in range(2):
            again = [cp.asnumpy(g) for g in pk.conv2d_backward(go, x, w, **kw)]
            for a, b in zip(first, again):
                assert a.tobytes() == b.tobytes()
    x = to_gpu(rng.integers(-2, 3, size=(8, 16, 56, 56)).astype(dtype))  # many ties
    y, idx = pk.max_pool2d(x, 3, 1, 1, return_indices=True)  # overlapping windows: cells gather several
    go = to_gpu(rng.standard_normal(y.shape).astype(dtype))
    g1 = cp.asnumpy(pk.max_pool2d_backward(go, idx, x.shape, 3, 1, 1))
    g2 = cp.asnumpy(pk.max_pool2d_backward(go, idx, x.shape, 3, 1, 1))
    assert g1.tobytes() == g2.tobytes()


def _spin_kernel():
    return cp.RawKernel(r"""
    extern "C" __global__ void spin(long long cycles, float* out) {
      long long start = clock64();
      while (clock64() - start < cycles) {}
      if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.0f;
    }""", "spin")


@needs_gpu
def test_non_blocking_stream_with_queued_work():
    """Everything runs on CuPy's current stream, in order with the work queued before it there, and
    the host does not wait for it (except max_pool2d_backward, which reads its index check back)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 8, 20, 20)).astype(np.float32)
    w = rng.standard_normal((12, 8, 3, 3)).astype(np.float32)
    want = ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    spin = _spin_kernel()
    flag = cp.zeros(1, cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        xd, wd = cp.asarray(x), cp.asarray(w)

        def work():
            xd_later = cp.empty_like(xd)
            xd_later[...] = xd  # queued after whatever is on the stream
            y = pk.conv2d(xd_later, wd, padding=1)
            r = pk.relu(y)
            grads = pk.conv2d_backward(r, xd_later, wd, padding=1)
            return y, r, grads, pk.max_pool2d(r, 2)

        # A first pass loads every kernel (CUDA loads modules lazily, and a load may wait for the GPU).
        work()
        stream.synchronize()
        spin((1,), (32,), (np.int64(2_000_000_000), flag))  # about a second of queued work
        start = time.perf_counter()
        y, r, (gx, gw, gb), p = work()
        issued = time.perf_counter() - start
        assert not stream.done, "the stream finished early: the spin kernel did not queue work"
        assert issued < 0.5, f"issuing took {issued:.2f} s: something waited for the GPU"
        stream.synchronize()
    assert float(flag.get()[0]) == 1.0
    assert_close(y, want, np.float32, 73, "conv2d after queued work")
    np.testing.assert_array_equal(cp.asnumpy(r), np.maximum(cp.asnumpy(y), 0))
    assert p.shape == (4, 12, 10, 10)
    cp.cuda.Device().synchronize()


@needs_gpu
def test_results_on_two_streams_agree():
    rng = np.random.default_rng(12)
    x = cp.asarray(rng.standard_normal((8, 16, 30, 30)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((16, 16, 3, 3)).astype(np.float32))
    results = []
    for s in (cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)):
        with s:
            y = pk.conv2d(x, w, padding=1)
            results.append([cp.asnumpy(g) for g in pk.conv2d_backward(y, x, w, padding=1)])
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()


# ---- errors --------------------------------------------------------------------------------------------

@needs_gpu
def test_mixed_numpy_and_cupy_is_a_type_error():
    x = cp.zeros((1, 1, 4, 4), cp.float32)
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        pk.conv2d(x, np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        pk.relu_backward(np.zeros((2,), np.float32), cp.zeros((2,), cp.float32))
    with pytest.raises(TypeError, match="in host memory"):
        C.relu_forward(np.zeros(3, np.float32), cp.zeros(3, cp.float32), stream=0)


@needs_gpu
def test_float16_runs_on_gpu_only():
    x = cp.zeros((1, 1, 4, 4), cp.float16)
    assert pk.relu(x).dtype == cp.float16
    with pytest.raises(TypeError, match="float16 runs on CUDA only"):
        pk.relu(np.zeros((1, 1, 4, 4), np.float16))


@needs_gpu
def test_bad_indices_raise_the_cpu_message():
    x = np.random.default_rng(13).standard_normal((1, 2, 6, 6)).astype(np.float32)
    _, idx = pk.max_pool2d(x, 2, return_indices=True)
    go = np.ones((1, 2, 3, 3), np.float32)
    bad = idx.copy()
    bad[0, 1, 2, 1] = 0  # a cell of the plane outside this window
    bad[0, 1, 2, 2] = -5
    with pytest.raises(ValueError) as cpu:
        pk.max_pool2d_backward(go, bad, x.shape, 2)
    with pytest.raises(ValueError) as gpu:
        pk.max_pool2d_backward(cp.asarray(go), cp.asarray(bad), x.shape, 2)
    assert str(gpu.value) == str(cpu.value)
    assert "indices[0, 1, 2, 1] = 0" in str(gpu.value)


@needs_gpu
def test_device_mismatch_is_a_value_error():
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cp.cuda.Device(1):
        x1 = cp.ones((1, 1, 4, 4), cp.float32)
        w1 = cp.ones((1, 1, 3, 3), cp.float32)
        assert float(pk.conv2d(x1, w1).sum()) == 4 * 9.0  # right device: fine
    with cp.cuda.Device(0):
        w0 = cp.ones((1, 1, 3, 3), cp.float32)
        out0 = cp.empty((1, 1, 2, 2), cp.float32)
        with pytest.raises(ValueError, match="x is on GPU 1 but the current device is GPU 0"):
            C.conv2d_forward(x1, w0, None, out0, (1, 1), NO_PAD, (1, 1), 1,
                             stream=cp.cuda.get_current_stream().ptr)
        with pytest.raises(ValueError, match="on GPU 1"):
            pk.relu(x1)


# ---- layers and the self-test --------------------------------------------------------------------------

@needs_gpu
def test_layers_on_cupy_match_numpy():
    from pykernels.layers import SGD, Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy

    def net():
        rng = np.random.default_rng(3)
        return Sequential(Conv2D(1, 8, 3, padding="same", dtype=np.float64, rng=rng), ReLU(), MaxPool2D(2),
                          Conv2D(8, 16, 3, padding="same", dtype=np.float64, rng=rng), ReLU(), MaxPool2D(2),
                          Flatten(), Linear(16 * 2 * 2, 10, dtype=np.float64, rng=rng))

    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 1, 8, 8))
    labels = rng.integers(0, 10, size=6)
    cpu, gpu = net(), net().to(cp)
    loss_cpu, loss_gpu = SoftmaxCrossEntropy(), SoftmaxCrossEntropy()
    for model, loss, xx, yy in [(cpu, loss_cpu, x, labels), (gpu, loss_gpu, cp.asarray(x), cp.asarray(labels))]:
        out = model.forward(xx)
        loss.forward(out, yy)
        model.backward(loss.backward())
    for name, g in cpu.grads.items():
        np.testing.assert_allclose(cp.asnumpy(gpu.grads[name]), g, rtol=1e-9, atol=1e-12, err_msg=name)
    SGD(cpu, lr=0.1).step()
    SGD(gpu, lr=0.1).step()  # the optimizer updates CuPy parameters in place
    for name, p in cpu.params.items():
        assert isinstance(gpu.params[name], cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(gpu.params[name]), p, rtol=1e-9, atol=1e-12, err_msg=name)
    gpu.to(np)
    assert isinstance(next(iter(gpu.params.values())), np.ndarray)


@needs_gpu
def test_self_check_on_cuda():
    done = subprocess.run([sys.executable, "-m", "pykernels", "check", "--device", "cuda"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "float16" in done.stdout
