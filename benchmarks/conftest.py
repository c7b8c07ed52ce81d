"""Shared machinery of the pytest-benchmark suite (benchmarks/test_bench_*.py).

    pytest benchmarks/ --benchmark-only          # measure (a few minutes on 2 cores)
    pytest benchmarks/ --benchmark-disable       # run every case once, untimed (CI: keeps them working)
    pytest benchmarks/ --benchmark-only -k "resnet_3x3_128 and fwd"

Every case is one op x shape x pass (``benchmark.group``, e.g. ``conv2d-fwd-resnet_3x3_128``),
parametrised over implementations: "pykernels", "torch" (skipped when torch is absent) and the NumPy
peers (see pykernels/peers.py). Shapes come from pykernels/shapes.py (design.md's table). Inputs are
seeded float32, made and converted before timing. Each case runs about PYKERNELS_BENCH_SECONDS
(default 0.5) of rounds, at least 3 and at most 200, after one untimed warm-up call. conv2d's shapes
also run at batch 1, at batch 8 where the table's batch is not 8 (LeNet's 64), and in float64 (groups
``...-b1``, ``...-b8``, ``...-f64``).

At the end a compact table of medians, one row per group, with our ratio against torch, is printed, then
pykernels' time per image at batch 1 over its time per image at batch 8, and its float64 time over its
float32 time. Rounds run back to back here, so each call finds its data in the caches; `python -m
pykernels bench --scaling` times the same ratios between the peers' calls.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

# OpenBLAS threads spin after each NumPy matmul (the numpy_im2col peer) and slow whichever benchmark
# runs next; a short timeout stops that. Read when NumPy loads, so set before the import.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402
import pytest

from pykernels import shapes as _shapes
from pykernels.bench import OthersWatch

#: Implementations in the order of the summary table's columns.
IMPL_ORDER = ("pykernels", "torch", "numpy_im2col", "numpy")

_TARGET_S = float(os.environ.get("PYKERNELS_BENCH_SECONDS", "0.5"))
_MIN_ROUNDS, _MAX_ROUNDS = 3, 200
_THREADS = os.cpu_count() or 1
_BUSY_LIMIT = 0.10  # other processes used more than this share of the CPUs: flag the median


# ------------------------------------------------------------------------------------------------
# implementations


class _PykernelsImpl:
    """pykernels itself, with the peers' interface (asarray / to_numpy / supports)."""

    name = "pykernels"

    def __init__(self, module):
        self._m = module

    def supports(self, op):
        return hasattr(self._m, op)

    def asarray(self, a):
        return np.ascontiguousarray(a)

    def to_numpy(self, a):
        return None if a is None else np.asarray(a)

    def __getattr__(self, op):
        return getattr(self._m, op)


@functools.lru_cache(maxsize=None)
def _load_impl(name):
    """The implementation called ``name``, or a string saying why it cannot be used here."""
    if name == "pykernels":
        try:
            import pykernels

            pykernels.relu(np.zeros((1, 1, 1, 1), np.float32))  # the compiled extension is there
        except (ImportError, AttributeError) as e:
            return f"pykernels' extension is not usable (build it: tools/dev_install.sh): {e}"
        return _PykernelsImpl(pykernels)
    from pykernels import peers

    if name == "torch":
        if not peers.torch_available():
            return "torch is not installed"
        import torch

        torch.set_num_threads(_THREADS)  # the same thread count for every run of the suite
    return peers.get_peer(name)


@pytest.fixture
def impl(request):
    """Indirectly parametrised with an implementation name; skips when it is unavailable."""
    got = _load_impl(request.param)
    if isinstance(got, str):
        pytest.skip(got)
    return got


def require(impl, op):
    if not impl.supports(op):
        pytest.skip(f"{impl.name} has no {op}")


# ------------------------------------------------------------------------------------------------
# inputs


@functools.lru_cache(maxsize=4)
def inputs(name, seed=0, batch=None, dtype="float32"):
    """Seeded inputs of the table's shape ``name``, at its batch or ``batch``, float32 unless ``dtype`` says
    otherwise (cached: every impl gets the same)."""
    # kept writable (torch.from_numpy warns on read-only arrays); no op may write into its inputs
    shape = _shapes.get_shape(name)
    if batch is not None:
        shape = shape.with_batch(batch)
    return shape.random_inputs(seed=seed, dtype=np.dtype(dtype))


#: Suffixes of the groups that time a conv2d shape at another batch or in float64, and their batch/dtype.
_VARIANT_BATCH = {"b1": 1, "b8": 8}
_VARIANT_DTYPE = {"f64": "float64"}


def variant(suffix):
    """(batch or None for the table's, dtype) of a group suffix: "" (the table's case), "b1", "b8", "f64"."""
    return _VARIANT_BATCH.get(suffix), _VARIANT_DTYPE.get(suffix, "float32")


# ------------------------------------------------------------------------------------------------
# timing and the summary


@dataclass
class _Row:
    group: str
    impl: str
    median_s: float
    rate: float  # GFLOP/s or GB/s
    unit: str  # "GF/s" (GFLOP/s) or "GB/s"
    others: float = None  # share of the CPUs other processes used meanwhile (None: unknown)


_RESULTS: list = []


def run_benchmark(benchmark, impl, fn, *, group, flops=None, nbytes=None, shape=None):
    """Time ``fn()`` (no arguments; inputs already converted) and record rates in extra_info.

    With --benchmark-disable, fn runs exactly once. Returns fn's result (of the last call).
    """
    benchmark.group = group
    info = benchmark.extra_info
    info.update(impl=impl.name, threads=_THREADS)
    if shape is not None:
        info["shape"] = shape.name
    if flops is not None:
        info["gflop"] = flops / 1e9
    if nbytes is not None:
        info["mbytes"] = nbytes / 1e6

    if benchmark.disabled:
        return benchmark.pedantic(fn, rounds=1, iterations=1)

    t0 = time.perf_counter()
    fn()  # warm-up (first-call setup such as oneDNN primitive creation) and calibration
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(_MAX_ROUNDS, max(_MIN_ROUNDS, math.ceil(_TARGET_S / once))))
    watch = OthersWatch()
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if once < 0.05 else 0)
    others = watch.share()
    if others is not None:
        info["others_cpu_share"] = round(others, 3)

    median = benchmark.stats.stats.median
    if flops is not None:
        info["gflops_median"] = round(flops / median / 1e9, 2)
        _RESULTS.append(_Row(group, impl.name, median, flops / median / 1e9, "GF/s", others))
    elif nbytes is not None:
        info["gbps_median"] = round(nbytes / median / 1e9, 2)
        _RESULTS.append(_Row(group, impl.name, median, nbytes / median / 1e9, "GB/s", others))
    else:
        _RESULTS.append(_Row(group, impl.name, median, float("nan"), "", others))
    return result


def check_shape(impl, result, expected_shape):
    """The result has the expected shape: enough to keep --benchmark-disable runs honest."""
    got = tuple(impl.to_numpy(result).shape)
    assert got == tuple(expected_shape), f"{impl.name}: result shape {got}, expected {tuple(expected_shape)}"


#: The float64 reference's result per group, computed once (the group's implementations run one after another).
_TRUTH: dict = {}


def check_result(impl, result, group, truth, dtype="float32"):
    """The result agrees with ``truth()`` (pykernels.reference in float64 on the same inputs, made once per
    group): to 2e-3 of its largest value in float32 (Winograd's float32 error is about 1e-5 of it), 1e-9 in
    float64. A shape check alone passed a kernel that returned zeros; this holds the peers to it too."""
    if group not in _TRUTH:
        _TRUTH.clear()
        _TRUTH[group] = np.asarray(truth(), dtype=np.float64)
    want = _TRUTH[group]
    got = impl.to_numpy(result)
    assert got.shape == want.shape, f"{impl.name}: result shape {got.shape}, expected {want.shape}"
    scale = max(float(np.abs(want).max()), np.finfo(np.float64).tiny)
    error = float(np.abs(got.astype(np.float64) - want).max()) / scale
    assert error <= (1e-9 if np.dtype(dtype) == np.float64 else 2e-3), \
        f"{impl.name}: {group} is off the reference by {error:.2e} of its largest value"


class _Bench:
    """What a benchmark module needs, handed out as the ``bench`` fixture (no conftest imports)."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    inputs = staticmethod(inputs)
    variant = staticmethod(variant)
    require = staticmethod(require)
    check_shape = staticmethod(check_shape)
    check_result = staticmethod(check_result)

    def run(self, impl, fn, **kw):
        return run_benchmark(self.benchmark, impl, fn, **kw)


@pytest.fixture
def bench(impl, benchmark):
    # `impl` first: an unavailable implementation skips before the benchmark fixture exists (no
    # "fixture was not used" warning); `benchmark` here lets --benchmark-only see these cases.
    return _Bench(benchmark)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    impls = [i for i in IMPL_ORDER if any(r.impl == i for r in _RESULTS)]
    by_group: dict = {}
    for r in _RESULTS:
        by_group.setdefault(r.group, {})[r.impl] = r
    tr = terminalreporter
    tr.section(f"pykernels benchmark medians (ms; rate in brackets; {_THREADS} threads)")
    head = f"{'group':<42}" + "".join(f"{i:>24}" for i in impls) + f"{'torch/ours':>12}"
    tr.write_line(head)
    for group in sorted(by_group, key=_group_key):
        row = by_group[group]
        cells = ""
        for i in impls:
            r = row.get(i)
            if r is None:
                cells += f"{'-':>24}"
                continue
            mark = "*" if r.others is not None and r.others > _BUSY_LIMIT else " "
            cells += f"{r.median_s * 1e3:9.3f}{mark}({r.rate:6.1f} {r.unit})".rjust(24)
        ratio = ""
        if "pykernels" in row and "torch" in row:
            ratio = f"{row['torch'].median_s / row['pykernels'].median_s:.2f}x"
        tr.write_line(f"{group:<42}{cells}{ratio:>12}")
    tr.write_line("torch/ours > 1 means pykernels is faster than torch in this run.")
    _write_scaling(tr, by_group)
    noisy = [r for r in _RESULTS if r.others is not None and r.others > _BUSY_LIMIT]
    if noisy:
        worst = max(r.others for r in noisy)
        tr.write_line(f"* {len(noisy)} of {len(_RESULTS)} cases ran while other processes used more than "
                      f"{_BUSY_LIMIT:.0%} of the CPUs (up to {worst:.0%}): those medians are not trustworthy; "
                      "rerun on an idle machine.", yellow=True, bold=True)


def _split_group(group):
    """(op, pass, shape name, variant suffix or "") of a group name."""
    op, pass_, rest = group.split("-", 2)
    name, _, variant = rest.partition("-")
    return op, pass_, name, variant


def _write_scaling(tr, by_group):
    """pykernels' batch-1 and float64 ratios, where this run timed them and the table's case."""
    lines = []
    for group in sorted(by_group, key=_group_key):
        _, _, name, variant = _split_group(group)
        ours = by_group[group].get("pykernels")
        if variant or ours is None:
            continue
        batch = _shapes.get_shape(name).x[0]
        # batch 1 against batch 8: this group where the table's batch is 8, else its -b8 group
        per8 = by_group.get(group if batch == 8 else f"{group}-b8", {}).get("pykernels")
        b1 = by_group.get(f"{group}-b1", {}).get("pykernels")
        f64 = by_group.get(f"{group}-f64", {}).get("pykernels")
        cells = [f"{b1.median_s / (per8.median_s / 8):.2f}" if b1 and per8 else "-",
                 f"{f64.median_s / ours.median_s:.2f}" if f64 else "-"]
        if cells != ["-", "-"]:
            lines.append(f"{group:<42}" + "".join(f"{c:>24}" for c in cells))
    if lines:
        tr.section("pykernels at batch 1 and in float64 (back to back)")
        tr.write_line(f"{'group':<42}{'b1 / b8, per image':>24}{'float64 / float32':>24}")
        for line in lines:
            tr.write_line(line)


def _group_key(group):
    """Sort by op, then by the table's shape order, then by pass, then variant."""
    op, pass_, name, variant = _split_group(group)
    order = {s.name: i for i, s in enumerate(_shapes.ALL_SHAPES)}
    passes = {"fwd": 0, "bwd_data": 1, "bwd_weight": 2, "bwd": 1}
    return (op, order.get(name, 99), passes.get(pass_, 9), variant)
