"""Large NumPy results live on blocks the CPU module keeps for reuse (csrc/cpu/block_cache.hpp).

What a user relies on: such a result is an ordinary writeable C-contiguous array; its memory is reused
only once the result and every view of it are gone; pykernels.empty_cache() gives the unused blocks
back; PYKERNELS_CPU_CACHE_MB=0 keeps none. Results below the threshold are plain NumPy arrays.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import _pykernels_cpu
import pykernels as pk
from pykernels import _backend
from pykernels import reference as ref

BIG = _backend.POOLED_RESULT_BYTES


def big_relu_input(seed=0):
    """A float32 input whose relu result is just over the pooling threshold."""
    n = BIG // 4 + (1 << 18)
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32) - 0.25


def test_large_result_is_an_ordinary_array_with_right_values():
    x = big_relu_input()
    y = pk.relu(x)
    assert y.nbytes >= BIG and y.base is not None  # on a kept block
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    y[:3] = 7.0  # writeable in place
    assert pickle.loads(pickle.dumps(y[:5])).tolist() == y[:5].tolist()


def test_small_result_is_a_plain_numpy_array():
    y = pk.relu(np.arange(-3.0, 5.0))
    assert y.base is None and y.flags.owndata


def test_block_is_reused_only_after_every_view_is_gone():
    _pykernels_cpu.empty_cache()
    x = big_relu_input(1)
    y = pk.relu(x)
    address = y.ctypes.data
    view = y[10:20]
    expected = view.copy()
    del y
    assert _pykernels_cpu.cached_bytes() == 0  # the view still holds the block
    other = pk.relu(-x)  # same size: would take a kept block, and must not take the view's
    assert other.ctypes.data != address
    assert not np.shares_memory(other, view)
    np.testing.assert_array_equal(view, expected)
    del view
    assert _pykernels_cpu.cached_bytes() >= BIG  # now it is back
    again = pk.relu(x)
    assert again.ctypes.data == address  # and the next result of that size reuses it
    np.testing.assert_array_equal(again, np.maximum(x, 0))


def test_conv2d_and_pool_results_on_kept_blocks_match_the_reference():
    """Through the ops that allocate large results: conv2d forward (51 MB float64), and reused blocks give
    the same answers as fresh ones (no stale values: every element is written)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 230, 230))
    w = rng.standard_normal((64, 3, 3, 3))
    want = ref.conv2d(x, w, padding=1)
    for _ in range(2):
        y = pk.conv2d(x, w, padding=1)
        assert y.nbytes >= BIG
        np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)
        y.fill(np.nan)  # a poisoned block goes back; the next result must overwrite all of it
        del y


def test_empty_cache_frees_the_unused_blocks():
    y = pk.relu(big_relu_input(3))
    del y
    assert _pykernels_cpu.cached_bytes() >= BIG
    released = pk.empty_cache()
    assert released >= BIG
    assert _pykernels_cpu.cached_bytes() == 0


def run_with_cache_cap(cap_mb: str, code: str) -> None:
    """Runs `code` in a fresh interpreter whose block cache is capped at PYKERNELS_CPU_CACHE_MB=cap_mb (the
    cap is read once, at import)."""
    env = dict(os.environ, PYKERNELS_CPU_CACHE_MB=cap_mb)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_cache_cap_zero_keeps_nothing():
    run_with_cache_cap("0", (
        "import numpy as np, pykernels as pk, _pykernels_cpu as C\n"
        f"y = pk.relu(np.ones({BIG // 8 + 1}))\n"
        "assert y.nbytes >= pk._backend.POOLED_RESULT_BYTES\n"
        "del y\n"
        "assert C.cached_bytes() == 0, C.cached_bytes()\n"
    ))


def test_cache_over_its_cap_frees_the_oldest_blocks():
    run_with_cache_cap("5", (
        "import numpy as np, _pykernels_cpu as C\n"
        "MiB = 1 << 20\n"
        "a = C.empty([2 * MiB], np.dtype(np.uint8)); b = C.empty([2 * MiB], np.dtype(np.uint8))\n"
        "c = C.empty([4 * MiB], np.dtype(np.uint8)); kept = c.ctypes.data\n"
        "del a, b\n"
        "assert C.cached_bytes() == 4 * MiB, C.cached_bytes()\n"
        "del c  # 8 MiB unused against a cap of 5: the two older blocks go\n"
        "assert C.cached_bytes() == 4 * MiB, C.cached_bytes()\n"
        "assert C.empty([4 * MiB], np.dtype(np.uint8)).ctypes.data == kept\n"
    ))


@pytest.mark.parametrize("cap_mb,kept_mib", [("-5", 1024), ("17592186044416", 1200)])
def test_cache_cap_out_of_range(cap_mb, kept_mib):
    # "-5" (strtoull's 2^64 - 5) had meant no cap: now the default, 1024 MB, of 300 unused 4 MiB blocks; 2^44
    # MB had wrapped round to a cap of 0, keeping nothing: now no cap, all 1200 MiB kept.
    run_with_cache_cap(cap_mb, (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import numpy as np, _pykernels_cpu as C\n"
        "blocks = [C.empty([4 << 20], np.dtype(np.uint8)) for _ in range(300)]\n"
        "del blocks\n"
        f"assert C.cached_bytes() == {kept_mib} << 20, C.cached_bytes()\n"
    ))


def test_empty_rejects_bad_shapes():
    with pytest.raises(ValueError, match="negative"):
        _pykernels_cpu.empty([2, -1], np.dtype(np.float32))
    with pytest.raises(ValueError, match="too many"):
        _pykernels_cpu.empty([1 << 40, 1 << 40], np.dtype(np.float32))


def test_empty_takes_numbers_only():
    # uninitialised memory under an object array would be freed as garbage pointers
    with pytest.raises(TypeError, match="float or integer"):
        _pykernels_cpu.empty([3, 4], np.dtype(object))
