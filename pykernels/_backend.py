"""Pick the backend from the arrays: NumPy -> _pykernels_cpu, CuPy -> _pykernels_cuda.

Also the per-array checks every op shares: array type (no silent host/device copies), dtype,
contiguity (inputs are copied once when needed; outputs must already be contiguous), and the
allocation of results with the input's array type.
The compiled modules are top-level (not inside this package) so the source folder ./pykernels of a
clone and the installed package find the same extension (design.md, Build).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

try:
    import _pykernels_cpu as _cpu
    _CPU_IMPORT_ERROR = None
except ImportError as exc:  # not built: say how to build it when an op is first called
    _cpu = None
    _CPU_IMPORT_ERROR = exc


def _ignored_settings():
    """(setting, why) for each PYKERNELS_* environment setting the CPU extension reads but cannot take: it then
    runs its default silently, so a typo (PYKERNELS_CONV_ALGORITHM=GEMM kept Winograd) would go unseen."""
    env = os.environ
    isa = env.get("PYKERNELS_CPU_ISA")
    if isa and isa != _cpu.active_isa():  # it caps the choice at a build this CPU runs
        why = "is not supported by this CPU" if isa in ("portable", "avx2", "avx512") else \
            "is not portable, avx2 or avx512"
        yield f"PYKERNELS_CPU_ISA={isa!r}", f"{why}: running {_cpu.active_isa()!r}"
    algorithm = env.get("PYKERNELS_CONV_ALGORITHM")
    if algorithm and algorithm not in ("gemm", "auto"):
        yield f"PYKERNELS_CONV_ALGORITHM={algorithm!r}", "is not 'gemm' or 'auto': Winograd stays on where it applies"
    cache = env.get("PYKERNELS_CPU_CACHE_MB")
    if cache and not (cache.isascii() and cache.isdigit()):  # digits only, as block_cache.cpp reads it
        yield f"PYKERNELS_CPU_CACHE_MB={cache!r}", "is not a whole number of MB: the default cap, 1024 MB, applies"


if _cpu is not None:
    for _setting, _why in _ignored_settings():
        warnings.warn(f"{_setting} {_why}", RuntimeWarning, stacklevel=2)

_cuda = None
_CUDA_REASON = None  # why CUDA is unavailable, once probed

#: NumPy results of at least this many bytes go on blocks the CPU module keeps for reuse (its `empty`;
#: csrc/cpu/block_cache.hpp): glibc maps every allocation this large afresh, and the page faults cost
#: 2 ms per 51 MB result. Smaller ones come from NumPy, whose heap already reuses them.
POOLED_RESULT_BYTES = 32 << 20


def _probe_cuda():
    """Import the CUDA extension and CuPy lazily; remember why not when either is missing.

    The extension's own (static) CUDA runtime is asked first, so a missing or too old NVIDIA driver is
    named as such; then CuPy, which allocates the arrays and owns the current device and stream.
    """
    global _cuda, _CUDA_REASON
    if _cuda is not None or _CUDA_REASON is not None:
        return
    try:
        import _pykernels_cuda as module
    except ImportError as exc:
        _CUDA_REASON = f"the CUDA extension _pykernels_cuda is not installed ({exc}); build with nvcc present"
        return
    try:
        count = module.device_count()
    except RuntimeError as exc:
        driver = "" if module.driver_version() else "; no NVIDIA driver was found"
        _CUDA_REASON = f"{exc}{driver}"
        return
    try:
        import cupy
        count = min(count, cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # ImportError, or CUDARuntimeError when CuPy's runtime finds no GPU
        _CUDA_REASON = (f"CuPy is missing or finds no GPU ({type(exc).__name__}: {exc}); "
                        "install it with pip install 'pykernels[cuda]'")
        return
    if count < 1:
        _CUDA_REASON = "no CUDA GPU is visible"
        return
    _cuda = module


def cuda_available() -> bool:
    """True when CuPy arrays can run on the CUDA kernels."""
    _probe_cuda()
    return _cuda is not None


def cuda_unavailable_reason() -> str | None:
    """Why cuda_available() is False (None when it is True)."""
    _probe_cuda()
    return _CUDA_REASON


def _is_cupy(a) -> bool:
    # Checked by module name so that CuPy is never imported for NumPy work.
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "__cuda_array_interface__")


def array_kind(*named) -> str:
    """'numpy' or 'cupy' for (name, array) pairs (None arrays skipped); TypeError on anything else
    or on a mix, which would otherwise mean a silent copy between host and device."""
    kinds = {}
    for name, a in named:
        if a is None:
            continue
        if isinstance(a, np.ma.MaskedArray):  # the kernels would read the masked values and drop the mask
            raise TypeError(f"{name} is a masked array, whose mask pykernels would ignore; pass "
                            f"{name}.filled(value) or np.ma.getdata({name})")
        if isinstance(a, np.ndarray):
            kinds[name] = "numpy"
        elif _is_cupy(a):
            kinds[name] = "cupy"
        else:
            raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__module__}.{type(a).__name__}")
    found = set(kinds.values())
    if len(found) > 1:
        where = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"arguments mix NumPy and CuPy arrays ({where}); move them to one device first")
    return found.pop() if found else "numpy"


_FLOAT_DTYPES = {"numpy": (np.dtype(np.float32), np.dtype(np.float64)),
                 "cupy": (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))}


def common_dtype(kind: str, *named) -> np.dtype:
    """The float dtype all (name, array) pairs share; TypeError naming the offender otherwise."""
    first_name, dtype = None, None
    for name, a in named:
        if a is None:
            continue
        dt = np.dtype(a.dtype)
        if dt not in _FLOAT_DTYPES[kind]:
            allowed = ", ".join(t.name for t in _FLOAT_DTYPES[kind])
            hint = " (float16 runs on CUDA only)" if dt == np.float16 else ""
            if dt.isnative is False and dt.newbyteorder("=") in _FLOAT_DTYPES[kind]:
                hint = f" ({dt.newbyteorder('=').name} in the other byte order: pass {name}.astype('={dt.char}'))"
            raise TypeError(f"{name} must have dtype {allowed}; got {dt}{hint}")
        if dtype is None:
            first_name, dtype = name, dt
        elif dt != dtype:
            raise TypeError(f"{name} has dtype {dt} but {first_name} has {dtype}; pass arrays of one dtype")
    return dtype


def module(kind: str):
    """The extension module that runs arrays of this kind."""
    if kind == "cupy":
        _probe_cuda()
        if _cuda is None:
            raise RuntimeError(f"CuPy arrays need the CUDA backend, which is unavailable: {_CUDA_REASON}")
        return _cuda
    if _cpu is None:
        raise ImportError(
            "pykernels' compiled module _pykernels_cpu is not installed; run `pip install .` from the "
            f"source tree ({_CPU_IMPORT_ERROR})")
    return _cpu


def xp_of(kind: str):
    if kind == "cupy":
        import cupy
        return cupy
    return np


def contiguous(a):
    """C-contiguous version of an input (copied once if needed, e.g. transposed or negatively strided)."""
    if a is None or a.flags.c_contiguous:
        return a
    return xp_of("cupy" if _is_cupy(a) else "numpy").ascontiguousarray(a)


def output(out, name: str, kind: str, shape, dtype):
    """`out` checked against what the op will write, or a fresh array of the inputs' kind."""
    shape = tuple(shape)
    if out is None:
        dtype = np.dtype(dtype)
        if kind == "numpy":
            return numpy_result(shape, math.prod(shape), dtype)
        return xp_of(kind).empty(shape, dtype=dtype)
    if array_kind((name, out)) != kind:
        raise TypeError(f"{name} must be a {'CuPy' if kind == 'cupy' else 'NumPy'} array like the inputs")
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(out.shape)}")
    if np.dtype(out.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {np.dtype(out.dtype)}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (the result is written into it in place)")
    if kind == "numpy" and not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return out


def numpy_result(shape, count: int, dtype: np.dtype):
    """A fresh NumPy result of `count` values; from POOLED_RESULT_BYTES on, on the CPU module's kept blocks."""
    if count * dtype.itemsize >= POOLED_RESULT_BYTES:
        return module("numpy").empty(shape, dtype)
    return np.empty(shape, dtype)


def empty_cache() -> int:
    """Free the CPU memory kept for reuse: every thread's scratch buffers (once no kernel call is in flight;
    calls made meanwhile wait) and the unused blocks of large NumPy results; the number of bytes released."""
    return module("numpy").empty_cache()


def run(kind: str, entry: str, *args) -> None:
    """Call one extension entry point; CUDA entry points also get CuPy's current stream."""
    mod = module(kind)
    if kind == "cupy":
        import cupy
        getattr(mod, entry)(*args, stream=cupy.cuda.get_current_stream().ptr)
    else:
        getattr(mod, entry)(*args)
