"""`python -m pykernels bench`: time pykernels against the installed peers on design.md's shapes.

Every case (op x shape x pass) is timed in this one process: the inputs are made once, each
implementation is warmed up, then the implementations take turns, one call at a time, so that whatever
else the machine does hits all of them alike, in an order in which each directly follows every other
equally often (balanced_order: pykernels, torch, pykernels, numpy, torch, numpy, and again). What the
previous call left behind differs by implementation, in the caches and in the OpenMP threads (asleep
after NumPy's single-threaded 0.5 ms, still spinning after a parallel call). A fixed order, and also a
rotation of the starting implementation (which put pykernels after NumPy in two rounds of three),
biased the short cases: relu forward took 99 us against torch's 92 us in that rotation, 63-67 us
against 69 us each alone.
A round is one pass over that order; rounds go on until --repeat rounds are done and the case has run
for --min-time seconds. The table gives each implementation's median time, its rate (GFLOP/s for
conv2d from shapes.ConvShape.flops(), GB/s for relu and max_pool2d from bytes_moved()), the ratio peer
median / pykernels median (above 1 pykernels is faster than that peer) and its number of timed calls.
With --scaling, conv2d's cases also time pykernels at batch 1 and in float64 in the same rounds (rows
pykernels_b1 and pykernels_f64; pykernels_b8 too where the case's batch is not 8): batch 1's ratio is its
time per image over batch 8's, float64's its time over float32's, so that the bounds on those are checked
within one run, with the same peers' calls between, not across runs the host may have slowed differently.
PyTorch, when installed, runs there too (rows torch_b1 and torch_f64, their ratio PyTorch's time over
pykernels' at that batch and dtype): what a user of either library gets at batch 1 and in float64.

Peers (pykernels/peers.py): on the CPU, PyTorch (when installed; torch.set_num_threads(os.cpu_count()),
the thread count pykernels' OpenMP uses too), NumPy im2col + matmul for conv2d and NumPy ufuncs for
relu. On CUDA (CuPy arrays, batch 32): PyTorch CUDA (cuDNN, cudnn.benchmark on) when torch.cuda is
available, CuPy im2col + matmul (cuBLAS) for conv2d and CuPy ufuncs for relu; every call is timed with
CUDA events recorded on the stream that implementation launches on (CuPy's or torch's current stream).
On the CPU, with the NumPy im2col peer, the command restarts itself once with OPENBLAS_THREAD_TIMEOUT=4
(see OPENBLAS_ENV: OpenBLAS' spinning threads would otherwise slow whichever call comes next). It also
measures the OpenMP threads' round trip (openmp_round_trip_ns) at the start and end and around each
case, and marks with ~ the cases during which the threads' cores shared no cache (SPLIT_CACHE_NS).

This module is self-contained: benchmarks/conftest.py (pytest-benchmark) lives outside the installed
package, so its timing helpers cannot be imported from here; both read shapes and peers from
pykernels.shapes and pykernels.peers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from ._cli_types import non_negative_float, positive_int
from . import _backend, peers, shapes

OPS = ("conv2d", "relu", "max_pool2d")
SHAPES_BY_OP = {"conv2d": shapes.CONV_SHAPES, "relu": shapes.RELU_SHAPES, "max_pool2d": shapes.POOL_SHAPES}
PASSES_BY_OP = {"conv2d": ("fwd", "bwd_data", "bwd_weight"), "relu": ("fwd", "bwd"), "max_pool2d": ("fwd", "bwd")}
ALL_PASSES = ("fwd", "bwd_data", "bwd_weight", "bwd")
#: The peers each op is compared with, per device, in the table's order.
PEERS_BY_DEVICE = {
    "cpu": {"conv2d": ("torch", "numpy_im2col"), "relu": ("torch", "numpy"), "max_pool2d": ("torch",)},
    "cuda": {"conv2d": ("torch", "cupy_im2col"), "relu": ("torch", "cupy"), "max_pool2d": ("torch",)},
}
OURS = "pykernels"
#: --scaling's rows: pykernels again, in the same rounds, at batch 1 and in float64 (conv2d on the CPU),
#: for the CPU targets on those: batch 1 at most 1.5x slower per image than batch 8, float64 at least
#: half float32's speed. Where the case's batch is not 8 (lenet_5x5's 64, --batch), a batch-8 row too.
OURS_BATCH1, OURS_BATCH8, OURS_FLOAT64 = "pykernels_b1", "pykernels_b8", "pykernels_f64"
#: pykernels' rows; every other row is a peer's, its ratio that peer's time over pykernels'.
OURS_ROWS = (OURS, OURS_BATCH1, OURS_BATCH8, OURS_FLOAT64)
SCALING_BATCH = 8
SCALING_BOUNDS = {OURS_BATCH1: 1.5, OURS_FLOAT64: 2.0}
#: --scaling's peer rows: that peer at batch 1 and in float64 in the same rounds, compared with pykernels' rows
#: there (the peer's time / pykernels'), as the peers' own rows are with pykernels' at the case's batch.
SCALING_PEER = "torch"
PEER_BATCH1, PEER_FLOAT64 = f"{SCALING_PEER}_b1", f"{SCALING_PEER}_f64"
#: The row each row's ratio is taken against, where not pykernels' own. Batch 1's is batch 8's where that
#: row ran (else the case's own batch is 8, and pykernels' row is it); the peer rows' only their counterpart.
RATIO_BASE = {OURS_BATCH1: OURS_BATCH8, PEER_BATCH1: OURS_BATCH1, PEER_FLOAT64: OURS_FLOAT64}

DEFAULT_REPEAT = 10
DEFAULT_MIN_TIME = 1.5  # seconds per case: the full CPU table takes about a minute on 2 cores
WARMUP_CALLS, WARMUP_SECONDS = 2, 0.05  # untimed calls per implementation before a case's rounds
BUSY_LIMIT = 0.10  # other processes used more than this share of the CPUs during a case: flag it
#: OpenMP threads' round trip (openmp_round_trip_ns) above which a case is flagged: their cores share no cache.
SPLIT_CACHE_NS = 200.0
#: OpenBLAS (NumPy's matmul, so the numpy_im2col peer) leaves its worker threads spinning for about
#: 2**28 cycles after each call; interleaved on the same cores, that spinning made the next pykernels
#: call 2x and the next torch call 5x slower (resnet_3x3_128 fwd, 2 cores). OPENBLAS_THREAD_TIMEOUT=4
#: (2**4 cycles, OpenBLAS's minimum) lets them sleep at once, at no measurable cost to NumPy; OpenBLAS
#: reads it only when it loads, with NumPy, so the command line sets it and restarts itself once.
OPENBLAS_ENV = ("OPENBLAS_THREAD_TIMEOUT", "4")
#: Largest relative difference from pykernels' result before a peer's row is flagged "!".
AGREE_RTOL = {"float16": 2e-2, "float32": 1e-3, "float64": 1e-9}


class BenchError(Exception):
    """A request bench cannot serve (bad option combination, missing extra): message, exit code 2."""


# ------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Time pykernels against every installed peer on design.md's benchmark shapes, interleaved in one\n"
        "process after warm-up; print medians, GFLOP/s (conv2d) or GB/s (relu, max_pool2d) and the\n"
        "ratio peer time / pykernels time (> 1: pykernels is faster).")
    parser.add_argument("--op", dest="ops", action="extend", type=_op_list, metavar="OP",
                        help=f"{'|'.join(OPS)}; repeat or comma-separate (default: all)")
    parser.add_argument("--shape", dest="shapes", action="extend", type=_shape_list, metavar="NAME",
                        help="a design.md shape name; repeat or comma-separate (default: all of the ops': "
                             f"{', '.join(s.name for s in shapes.ALL_SHAPES)}); or, only when named, one of "
                             f"the conv2d layers beyond the table: "
                             f"{', '.join(s.name for s in shapes.MORE_CONV_SHAPES)}")
    parser.add_argument("--pass", dest="passes", action="extend", type=_pass_list, metavar="PASS",
                        help=f"{'|'.join(ALL_PASSES)}; repeat or comma-separate (default: all that apply; "
                             "for conv2d, bwd means bwd_data and bwd_weight)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: NumPy arrays; cuda: CuPy arrays, batch 32 (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64", "float16"), default="float32",
                        help="float32 (default) or float64; float16 with --device cuda only")
    parser.add_argument("--repeat", type=positive_int, default=DEFAULT_REPEAT, metavar="N",
                        help=f"at least N timed rounds per case (default {DEFAULT_REPEAT})")
    parser.add_argument("--min-time", type=non_negative_float, default=DEFAULT_MIN_TIME, metavar="SECONDS",
                        help="keep adding rounds until a case has run this long, all implementations "
                             f"together (default {DEFAULT_MIN_TIME})")
    parser.add_argument("--batch", type=positive_int, metavar="N",
                        help="run every shape with batch N instead of design.md's (the table's CPU batch, or 32 "
                             "with --device cuda); for quick checks and tests: the numbers are then not "
                             "the table's")
    parser.add_argument("--scaling", action="store_true",
                        help=f"conv2d on the CPU: also time pykernels at batch 1 ({OURS_BATCH1}) and in float64 "
                             f"({OURS_FLOAT64}) in the same rounds, their ratio being their time per image over "
                             f"pykernels' at batch {SCALING_BATCH} ({OURS_BATCH8}, where the case's batch is not) "
                             f"and in float32 (bounds: at most 1.5x and 2x); and {SCALING_PEER}, if installed, "
                             f"there too ({PEER_BATCH1}, {PEER_FLOAT64}: its time over pykernels')")
    parser.add_argument("--json", metavar="FILE", help="also write the results and the machine's details as JSON")
    parser.add_argument("--plot", metavar="PNG", help="draw the peers' ratios per shape and pass (needs matplotlib)")


def _comma_list(text: str, valid, what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}")
    for item in items:
        if item not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {item!r}; choose from {', '.join(valid)}")
    return items


def _op_list(text: str) -> List[str]:
    return _comma_list(text, OPS, "op")


def _shape_list(text: str) -> List[str]:
    return _comma_list(text, [s.name for s in shapes.ALL_SHAPES + shapes.MORE_CONV_SHAPES], "shape")


def _pass_list(text: str) -> List[str]:
    return _comma_list(text.replace("-", "_"), ALL_PASSES, "pass")


# ------------------------------------------------------------------------------------------------
# what to run


@dataclass(frozen=True)
class Case:
    op: str
    shape: object  # shapes.ConvShape / ReluShape / PoolShape, batch already chosen
    pass_: str

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape.name} {self.pass_}"

    def work(self, dtype):
        """(amount, unit) of one call: FLOPs for conv2d, bytes for relu and max_pool2d."""
        if self.op == "conv2d":
            return self.shape.flops(), "GFLOP/s"
        return self.shape.bytes_moved(self.pass_, dtype), "GB/s"


#: Shapes timed only when named (--shape), after the table's, per op.
NAMED_ONLY_BY_OP = {"conv2d": shapes.MORE_CONV_SHAPES, "relu": (), "max_pool2d": ()}


def op_of_shape(name: str) -> str:
    for op in OPS:
        if any(s.name == name for s in SHAPES_BY_OP[op] + NAMED_ONLY_BY_OP[op]):
            return op
    raise KeyError(name)


def select_cases(ops, shape_names, passes, device: str, batch: Optional[int]) -> List[Case]:
    """The cases in the table's order: op, then design.md's shape order, then pass."""
    for name in shape_names or ():
        if ops and op_of_shape(name) not in ops:
            raise BenchError(f"--shape {name} is a {op_of_shape(name)} shape, but --op asks for {', '.join(ops)}")
    wanted_ops = set(ops or (OPS if not shape_names else [op_of_shape(n) for n in shape_names]))
    cases = []
    for op in OPS:
        if op not in wanted_ops:
            continue
        for shape in SHAPES_BY_OP[op] + (NAMED_ONLY_BY_OP[op] if shape_names else ()):
            if shape_names and shape.name not in shape_names:
                continue
            shape = _sized(shape, device, batch)
            cases += [Case(op, shape, p) for p in passes_for(op, passes)]
    if not cases:
        raise BenchError(f"--pass {','.join(passes)} applies to none of the chosen ops "
                         "(conv2d: fwd, bwd_data, bwd_weight, bwd = both; relu and max_pool2d: fwd, bwd)")
    return cases


def passes_for(op: str, wanted) -> List[str]:
    applicable = PASSES_BY_OP[op]
    if not wanted:
        return list(applicable)
    return [p for p in applicable if p in wanted or (p.startswith("bwd_") and "bwd" in wanted)]


def _sized(shape, device: str, batch: Optional[int]):
    if batch is not None:
        return shape.with_batch(batch)
    return shape.gpu() if device == "cuda" else shape


# ------------------------------------------------------------------------------------------------
# implementations: pykernels and the peers, one interface (asarray / to_numpy / supports / ops)


class Renamed:
    """An implementation timed under another row name (--scaling's peer rows)."""

    def __init__(self, impl, name: str):
        self._impl = impl
        self.name = name

    def __getattr__(self, attr):
        return getattr(self._impl, attr)


class Ours:
    """pykernels itself, with the peers' interface."""

    def __init__(self, xp=np, name: str = OURS):
        import pykernels

        self._pk = pykernels
        self._xp = xp
        self.name = name  # OURS, or one of --scaling's rows

    def supports(self, op: str) -> bool:
        return hasattr(self._pk, op)

    def asarray(self, a):
        return self._xp.ascontiguousarray(self._xp.asarray(a))

    def to_numpy(self, a):
        return None if a is None else _host(a)

    def __getattr__(self, op):
        return getattr(self._pk, op)


def _host(a):
    """A NumPy copy of a CuPy array; NumPy arrays as they are."""
    return np.asarray(a) if isinstance(a, np.ndarray) else a.get()


class _ArrayModulePeer:
    """A peer written against an array module ``xp`` (CuPy by default; the tests use NumPy)."""

    name = ""
    ops = frozenset()

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    def supports(self, op: str) -> bool:
        return op in self.ops

    def asarray(self, a):
        return self.xp.ascontiguousarray(self.xp.asarray(a))

    def to_numpy(self, a):
        return None if a is None else _host(a)


class CupyPeer(_ArrayModulePeer):
    """ReLU with CuPy ufuncs (the GPU twin of peers.NumpyPeer)."""

    name = "cupy"
    ops = peers.RELU_OPS

    def relu(self, x, *, out=None):
        return self.xp.maximum(x, 0, out=out)

    def relu_backward(self, grad_out, y):
        return self.xp.where(y > 0, grad_out, grad_out.dtype.type(0))


class CupyIm2colPeer(_ArrayModulePeer):
    """conv2d as im2col + one matmul per group over the whole batch, on CuPy arrays (cuBLAS).

    The GPU twin of peers.NumpyIm2colPeer; written against an array module ``xp`` (CuPy by default)
    with nothing CuPy-only in it, so the tests check it with NumPy.
    """

    name = "cupy_im2col"
    ops = peers.CONV_OPS

    def _cols(self, x, g):
        """The patch matrix (G, Cg*R*S, N*P*Q): one copy of a strided view of the padded x."""
        xp = self.xp
        if g.padded:
            x = xp.pad(x, ((0, 0), (0, 0), (g.pt, g.pb), (g.pl, g.pr)))
        x = xp.ascontiguousarray(x)
        sn, sc, sh, sw = x.strides
        view = xp.lib.stride_tricks.as_strided(
            x, shape=(g.C, g.R, g.S, g.N, g.P, g.Q),
            strides=(sc, sh * g.dh, sw * g.dw, sn, sh * g.sh, sw * g.sw))
        return xp.ascontiguousarray(view).reshape(g.G, g.Cg * g.R * g.S, g.N * g.P * g.Q)

    def _col2im(self, dcols, g):
        """Adjoint of _cols: scatter-add (G, Cg*R*S, N*P*Q) into a contiguous (N, C, H, W)."""
        xp = self.xp
        d = dcols.reshape(g.C, g.R, g.S, g.N, g.P, g.Q)
        grad = xp.zeros((g.N, g.C, g.Hp, g.Wp), dtype=dcols.dtype)
        for r in range(g.R):
            h0 = r * g.dh
            for s in range(g.S):
                w0 = s * g.dw
                grad[:, :, h0:h0 + g.sh * (g.P - 1) + 1:g.sh, w0:w0 + g.sw * (g.Q - 1) + 1:g.sw] += \
                    d[:, r, s].transpose(1, 0, 2, 3)
        return xp.ascontiguousarray(grad[:, :, g.pt:g.pt + g.H, g.pl:g.pl + g.W])

    def conv2d(self, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, out=None):
        g = peers._ConvGeom(x.shape, weight.shape, stride, padding, dilation, groups)
        y = self.xp.matmul(weight.reshape(g.G, g.Kg, g.Cg * g.R * g.S), self._cols(x, g))
        y = y.reshape(g.K, g.N, g.P, g.Q)
        if bias is not None:
            y += bias.reshape(g.K, 1, 1, 1)
        y = y.transpose(1, 0, 2, 3)
        if out is not None:
            out[...] = y
            return out
        return self.xp.ascontiguousarray(y)

    def conv2d_backward(self, grad_out, x, weight, *, stride=1, padding=0, dilation=1, groups=1,
                        need_input=True, need_weight=True, need_bias=True):
        xp = self.xp
        g = peers._ConvGeom(x.shape, weight.shape, stride, padding, dilation, groups)
        go = xp.ascontiguousarray(grad_out.transpose(1, 0, 2, 3)).reshape(g.G, g.Kg, g.N * g.P * g.Q)
        gx = gw = gb = None
        if need_input:
            wt = weight.reshape(g.G, g.Kg, g.Cg * g.R * g.S).transpose(0, 2, 1)
            gx = self._col2im(xp.matmul(wt, go), g)
        if need_weight:
            gw = xp.matmul(go, self._cols(x, g).swapaxes(-1, -2)).reshape(weight.shape)
        if need_bias:
            gb = grad_out.sum(axis=(0, 2, 3))
        return gx, gw, gb


def _torch_cuda_peer():
    """peers.TorchPeer on CUDA tensors that share CuPy's memory (DLPack, no copy)."""

    class TorchCudaPeer(peers.TorchPeer):
        def asarray(self, a):
            if isinstance(a, self.torch.Tensor):
                return a.contiguous()
            return self.torch.from_dlpack(a).contiguous()

    return TorchCudaPeer()


def load_peer(name: str, device: str):
    """The peer ``name`` for ``device``, or a string saying why it cannot run here."""
    if name == "torch":
        if not peers.torch_available():
            return "torch is not installed"
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        if device == "cpu":
            return peers.get_peer("torch")
        if not torch.cuda.is_available():
            return "torch has no CUDA here (a CPU-only build, or no GPU)"
        torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm during warm-up
        return _torch_cuda_peer()
    if name == "cupy_im2col":
        return CupyIm2colPeer()
    if name == "cupy":
        return CupyPeer()
    return peers.get_peer(name)


# ------------------------------------------------------------------------------------------------
# one case: the call to time, the timers, the interleaved rounds


def make_call(impl, case: Case, inputs) -> Callable[[], object]:
    """A no-argument function running ``case`` with ``impl``; inputs converted here, outside timing."""
    shape, pass_ = case.shape, case.pass_
    if case.op == "conv2d":
        x, w, _, g = (impl.asarray(a) for a in inputs)
        kw = shape.kwargs()
        if pass_ == "fwd":
            return lambda: impl.conv2d(x, w, **kw)
        which = 0 if pass_ == "bwd_data" else 1
        need = dict(need_input=which == 0, need_weight=which == 1, need_bias=False)
        return lambda: impl.conv2d_backward(g, x, w, **kw, **need)[which]
    x, g = (impl.asarray(a) for a in inputs)
    if case.op == "relu":
        if pass_ == "fwd":
            return lambda: impl.relu(x)
        y = impl.relu(x)
        return lambda: impl.relu_backward(g, y)
    kw = shape.kwargs()
    if pass_ == "fwd":
        return lambda: impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)
    _, idx = impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)
    return lambda: impl.max_pool2d_backward(g, idx, shape.x, shape.kernel_size, **kw)


class CpuTimer:
    @staticmethod
    def seconds(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class CupyEventTimer:
    """CUDA events recorded on CuPy's current stream around the call; waits for the end event."""

    def __init__(self):
        import cupy

        self.cupy = cupy
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def seconds(self, fn) -> float:
        stream = self.cupy.cuda.get_current_stream()
        self.start.record(stream)
        fn()
        self.end.record(stream)
        self.end.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3


class TorchEventTimer:
    """CUDA events recorded on torch's current stream (the stream torch launches on)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def seconds(self, fn) -> float:
        stream = self.torch.cuda.current_stream()
        self.start.record(stream)
        fn()
        self.end.record(stream)
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def timer_for(impl, device: str):
    if device == "cpu":
        return CpuTimer()
    return TorchEventTimer() if impl.name == "torch" else CupyEventTimer()


def warm_up(fn) -> object:
    """Untimed calls (first-call setup, caches, cuDNN autotuning); returns the last result."""
    t0 = time.perf_counter()
    for i in range(100):
        result = fn()
        if i + 1 >= WARMUP_CALLS and time.perf_counter() - t0 >= WARMUP_SECONDS:
            break
    return result


def balanced_order(n: int) -> List[int]:
    """A cyclic order of the entries 0 .. n-1 in which each directly follows every other exactly once (an
    Eulerian circuit of the complete directed graph, by Hierholzer's algorithm): [0, 1] for two entries,
    [0, 1, 0, 2, 1, 2] for three. Repeated, the last entry is followed by the first, which closes the
    circuit. Each entry appears n - 1 times (once for n = 1)."""
    if n <= 2:
        return list(range(n))
    unused = {v: [u for u in range(n) if u != v] for v in range(n)}
    stack, circuit = [0], []
    while stack:
        v = stack[-1]
        if unused[v]:
            stack.append(unused[v].pop(0))
        else:
            circuit.append(stack.pop())
    circuit.reverse()
    return circuit[:-1]  # the circuit ends where it starts


def time_interleaved(entries, repeat: int, min_time: float) -> List[List[float]]:
    """Rounds of timed calls of the (timer, fn) entries in balanced_order until ``repeat`` rounds are done
    and ``min_time`` seconds have passed; the seconds of every call, per entry (see the module
    docstring). GC is off meanwhile."""
    times: List[List[float]] = [[] for _ in entries]
    if not entries:
        return times
    order = balanced_order(len(entries))
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        rounds = 0
        while rounds < repeat or time.perf_counter() - t0 < min_time:
            for k in order:
                timer, fn = entries[k]
                times[k].append(timer.seconds(fn))
            rounds += 1
    finally:
        if gc_was_on:
            gc.enable()
    return times


class OthersWatch:
    """Share of the machine's CPU time other processes took meanwhile (Linux /proc/stat; else None)."""

    def __init__(self):
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), time.process_time(), self._busy()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait, seconds

    def share(self):
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        ours = time.process_time() - self.cpu0
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0.0, (busy - self.busy0 - ours) / (wall * ncpu))


# ------------------------------------------------------------------------------------------------
# results


@dataclass
class Row:
    case: Case
    impl: str
    times: List[float] = field(default_factory=list)  # seconds; empty when the impl did not run
    note: str = ""  # why it did not run, or that its result differs from pykernels'
    differs: bool = False
    others: Optional[float] = None  # others' CPU share during the case
    round_trip: Optional[float] = None  # the larger OpenMP round trip (ns) before and after the case
    ratio: Optional[float] = None  # time per image / pykernels' (all rows but pykernels'), see set_ratios
    dtype: Optional[np.dtype] = None  # this row's (--scaling's float64 row); None: the run's

    @property
    def median(self) -> Optional[float]:
        return float(np.median(self.times)) if self.times else None

    def rate(self, dtype) -> Optional[float]:
        amount, _ = self.case.work(self.dtype or dtype)
        return amount / self.median / 1e9 if self.times else None


def ratio_base(impl: str, ran) -> str:
    """The row `impl`'s ratio is taken against (RATIO_BASE), given the rows that `ran`."""
    base = RATIO_BASE.get(impl, OURS)
    return OURS if base == OURS_BATCH8 and base not in ran else base


def set_ratios(rows: List[Row]) -> None:
    """ratio = time per image / pykernels' time per image, for every other row of one case that ran (peer
    median / pykernels median for the peers, which run pykernels' batch); --scaling's rows against their
    own base (RATIO_BASE): batch 1 against batch 8, the peer's batch-1 and float64 rows against pykernels'."""
    per_image = {r.impl: r.median / r.case.shape.batch for r in rows if r.median is not None}
    for r in rows:
        base = ratio_base(r.impl, per_image)
        if r.impl != OURS and r.impl in per_image and base in per_image:
            r.ratio = per_image[r.impl] / per_image[base]


def results_differ(ours, theirs, dtype) -> Optional[str]:
    """None when ``theirs`` matches ``ours`` (host arrays, or tuples of them) within dtype's tolerance."""
    ours_t = ours if isinstance(ours, tuple) else (ours,)
    theirs_t = theirs if isinstance(theirs, tuple) else (theirs,)
    for a, b in zip(ours_t, theirs_t):
        if a.shape != b.shape:
            return f"result shape {b.shape}, pykernels' {a.shape}"
        if a.dtype.kind in "iu":
            if not np.array_equal(a, b):
                return "indices differ from pykernels'"
            continue
        scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-30)
        rel = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)) / scale
        if not rel <= AGREE_RTOL[np.dtype(dtype).name]:
            return f"result differs from pykernels' by {rel:.1e} of its largest value"
    return None


def scaling_variants(case: Case, dtype, xp=np, peer=None) -> list:
    """--scaling's rows for one case, as (impl, case, dtype): pykernels at batch 1, at batch 8 where the
    case's batch is another, and in float64 (conv2d only; none that would repeat the case itself); and
    `peer` (an implementation object, if given) at batch 1 and in float64 where pykernels has those rows."""
    if case.op != "conv2d":
        return []
    variants = []
    for name, batch in ((OURS_BATCH1, 1), (OURS_BATCH8, SCALING_BATCH)):
        if case.shape.batch != batch and case.shape.batch != 1:
            variants.append((Ours(xp, name), Case(case.op, case.shape.with_batch(batch), case.pass_), dtype))
    if np.dtype(dtype) != np.float64:
        variants.append((Ours(xp, OURS_FLOAT64), case, np.dtype(np.float64)))
    if peer is not None:
        ours = {impl.name: (c, dt) for impl, c, dt in variants}
        for name, counterpart in ((PEER_BATCH1, OURS_BATCH1), (PEER_FLOAT64, OURS_FLOAT64)):
            if counterpart in ours:
                variants.append((Renamed(peer, name),) + ours[counterpart])
    return variants


def run_case(case: Case, impls, device: str, dtype, repeat: int, min_time: float, xp=np,
             variants=()) -> List[Row]:
    """Time one case with every implementation (``impls``: name -> impl object or reason string), and
    the ``variants`` (scaling_variants) in the same rounds."""
    inputs = {}  # (shape, dtype) -> the inputs, on the device

    def inputs_for(c: Case, dt):
        key = (c.shape, np.dtype(dt).name)
        if key not in inputs:
            inputs[key] = tuple(xp.asarray(a) for a in c.shape.random_inputs(seed=0, dtype=dt))
        return inputs[key]

    runs = [(name, impl, case, dtype) for name, impl in impls.items()]
    runs += [(impl.name, impl, c, dt) for impl, c, dt in variants]
    rows, entries, results = [], [], []
    for name, impl, c, dt in runs:
        row = Row(c, name, dtype=np.dtype(dt))
        rows.append(row)
        prepared = prepare(impl, c, inputs_for(c, dt))
        if isinstance(prepared, str):
            row.note = prepared
            continue
        fn, result = prepared
        entries.append((timer_for(impl, device), fn))
        results.append((row, result))
    _note_differences(results)
    watch = OthersWatch() if device == "cpu" else None
    trips = [openmp_round_trip_ns()] if device == "cpu" else []
    for (row, _), times in zip(results, time_interleaved(entries, repeat, min_time)):
        row.times = times
    others = watch.share() if watch else None
    trips = [t for t in trips + ([openmp_round_trip_ns()] if device == "cpu" else []) if t is not None]
    for row in rows:
        row.others = others if row.times else None
        row.round_trip = max(trips) if row.times and trips else None
    set_ratios(rows)
    return rows


def prepare(impl, case: Case, inputs):
    """(the call to time, its warm-up result on the host), or a string saying why ``impl`` cannot run."""
    if isinstance(impl, str):
        return impl
    op = case.op if case.pass_ == "fwd" else f"{case.op}_backward"
    if not impl.supports(op):
        return f"{impl.name} has no {op}"
    try:
        fn = make_call(impl, case, inputs)
        return fn, _to_host(impl, warm_up(fn))
    except (NotImplementedError, TypeError, ValueError, RuntimeError, MemoryError) as exc:
        return f"{impl.name} cannot run {case.label}: {type(exc).__name__}: {exc}"


def _to_host(impl, result):
    if isinstance(result, tuple):
        return tuple(impl.to_numpy(r) for r in result)
    return impl.to_numpy(result)


def _note_differences(results) -> None:
    """Flag each peer row whose result differs from pykernels' row it is compared with: the case's peers
    against pykernels', --scaling's peer rows against pykernels' at their batch and dtype."""
    by_impl = {row.impl: res for row, res in results}
    for row, res in results:
        if row.impl in OURS_ROWS:
            continue
        ours = by_impl.get(ratio_base(row.impl, by_impl))
        why = None if ours is None else results_differ(ours, res, row.dtype)
        if why:
            row.differs, row.note = True, f"{row.impl} on {row.case.label}: {why}"


# ------------------------------------------------------------------------------------------------
# the table


COLUMNS = ("op", "shape", "pass", "impl", "median ms", "rate", "ratio", "calls")


class Table:
    """The aligned text table, printed case by case while the benchmark runs."""

    def __init__(self, cases, impl_names, dtype, device: str, out=None):
        self.dtype, self.device, self.out = dtype, device, out
        self.widths = [
            max([len("op")] + [len(c.op) for c in cases]),
            max([len("shape")] + [len(c.shape.name) for c in cases]),
            max([len("pass")] + [len(c.pass_) for c in cases]),
            max([len("impl")] + [len(n) for n in impl_names]),
            11, 15, 8, 7,
        ]
        self.notes: List[str] = []
        self._last_group = None

    def _line(self, cells) -> str:
        left = [f"{c:<{w}}" for c, w in zip(cells[:4], self.widths[:4])]
        right = [f"{c:>{w}}" for c, w in zip(cells[4:], self.widths[4:])]
        return "  ".join(left + right).rstrip()

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def header(self, title_lines) -> None:
        for line in title_lines:
            self.print(line)
        self.print()
        self.print(self._line(COLUMNS))

    def rows(self, rows: List[Row]) -> None:
        group = (rows[0].case.op, rows[0].case.shape.name)
        if self._last_group is not None and group != self._last_group:
            self.print()
        self._last_group = group
        for row in rows:
            self.print(self._line(self.cells(row)))
            if row.note and row.note not in self.notes:
                self.notes.append(row.note)

    def cells(self, row: Row):
        c = row.case
        if row.median is None:
            return (c.op, c.shape.name, c.pass_, row.impl, "-", "-", "-", "-")
        marks = "*" if row.others is not None and row.others > BUSY_LIMIT else ""
        marks += "~" if row.round_trip is not None and row.round_trip > SPLIT_CACHE_NS else ""
        _, unit = c.work(self.dtype)
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x" + ("!" if row.differs else "")
        return (c.op, c.shape.name, c.pass_, row.impl, f"{row.median * 1e3:.3f}{marks}",
                f"{_three_digits(row.rate(self.dtype))} {unit}", ratio, str(len(row.times)))

    def footer(self, all_rows: List[Row], elapsed: float, meta: Optional[dict] = None) -> None:
        self.print()
        trip = (meta or {}).get("openmp_round_trip_ns")
        if trip:
            self.print(f"OpenMP threads' round trip: {_round_trip_text(trip['start'])} at the start, "
                       f"{_round_trip_text(trip['end'])} at the end ({ROUND_TRIP_NOTE}).")
        busy = [r for r in all_rows if r.others is not None and r.others > BUSY_LIMIT]
        if busy:
            self.print(f"* other processes used more than {BUSY_LIMIT:.0%} of the CPUs while this case ran "
                       f"(up to {max(r.others for r in busy):.0%}): rerun on an idle machine to trust it.")
        split = [r.round_trip for r in all_rows if r.round_trip is not None and r.round_trip > SPLIT_CACHE_NS]
        if split:
            self.print(f"~ the OpenMP threads' round trip was over {SPLIT_CACHE_NS:.0f} ns around this case (up to "
                       f"{max(split):.0f} ns): their cores shared no cache, and its times are not those of a "
                       "machine whose cores do.")
        if needs_quiet_openblas([r.case for r in all_rows], self.device):
            self.print(f"warning: {OPENBLAS_ENV[0]} was unset when NumPy loaded, so OpenBLAS threads spin after "
                       "each numpy_im2col call and slow the next call; `python -m pykernels bench` sets it, "
                       f"or run with {OPENBLAS_ENV[0]}={OPENBLAS_ENV[1]}.")
        if any(r.differs for r in all_rows):
            self.print("! this peer's result differs from pykernels' (see the notes): its time may not compare.")
        for note in self.notes:
            self.print(f"note: {note}")
        self.print(f"{len(all_rows)} rows in {elapsed:.1f} s.")


def _three_digits(value: float) -> str:
    """123.4, 12.3, 1.23, 0.0123: never 0.0 for a small positive rate."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def title_lines(meta: dict, repeat: int, min_time: float, scaling: bool = False) -> List[str]:
    where = meta["gpu"] if meta["device"] == "cuda" else meta["cpu_model"]
    threads = f"{meta['threads']} threads"
    if meta["device"] == "cpu":
        threads += f" (pykernels OpenMP {meta['pykernels_openmp_threads']}, torch {meta['torch_threads'] or '-'})"
    isa = f", ISA {meta['active_isa']}" if meta["device"] == "cpu" else ""
    return [
        f"pykernels bench: {meta['device']}, {meta['dtype']}, {where}, {threads}{isa}",
        f"medians of >= {repeat} interleaved rounds (>= {min_time:g} s per case) after warm-up; "
        "rate: GFLOP/s (conv2d) or GB/s (relu, max_pool2d)",
        "ratio = peer median / pykernels median: > 1 means pykernels is faster than that peer",
    ] + ([f"{OURS_BATCH1}, {OURS_FLOAT64}: pykernels at batch 1, in float64, in the same rounds; ratio = time per "
          f"image / pykernels' at batch {SCALING_BATCH} ({OURS_BATCH8} where the case's batch is another), in "
          f"float32 (bounds: <= {SCALING_BOUNDS[OURS_BATCH1]:g}x, <= {SCALING_BOUNDS[OURS_FLOAT64]:g}x)",
          f"{PEER_BATCH1}, {PEER_FLOAT64}: {SCALING_PEER} likewise; ratio = its median / {OURS_BATCH1}'s, "
          f"{OURS_FLOAT64}'s (> 1: pykernels is faster)"]
         if scaling else [])


# ------------------------------------------------------------------------------------------------
# metadata, JSON and the plot


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def metadata(device: str, dtype, impls) -> dict:
    torch_mod = sys.modules.get("torch")
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "dtype": np.dtype(dtype).name,
        "cpu_model": cpu_model(),
        "threads": os.cpu_count(),
        "pykernels_openmp_threads": None,
        "torch_threads": torch_mod.get_num_threads() if torch_mod else None,
        "pykernels_version": _pykernels_version(),
        "active_isa": None,
        "numpy_version": np.__version__,
        "torch_version": getattr(torch_mod, "__version__", None) if torch_mod else None,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "environment": {k: os.environ[k] for k in (OPENBLAS_ENV[0], "OMP_NUM_THREADS", "PYKERNELS_CPU_ISA")
                        if k in os.environ},
        "peers": {name: (impl if isinstance(impl, str) else "available") for name, impl in impls.items()
                  if name != OURS},
        "gpu": None,
    }
    try:
        import _pykernels_cpu

        meta["active_isa"] = _pykernels_cpu.active_isa()
        meta["pykernels_openmp_threads"] = _pykernels_cpu.openmp_threads()
    except (ImportError, AttributeError):
        pass
    if device == "cpu":
        meta["openmp_round_trip_ns"] = {"start": openmp_round_trip_ns(), "end": None}
    if device == "cuda":
        meta.update(_cuda_metadata())
    return meta


#: What the OpenMP round trip says about a table (see openmp_round_trip_ns).
ROUND_TRIP_NOTE = ("about 80 ns on this project's VM where its two cores share an L3; about 400 ns where the host "
                   "has put them on different ones, and Winograd passes then run up to 1.5-2x slower")


def openmp_round_trip_ns() -> Optional[float]:
    """Nanoseconds for two of pykernels' OpenMP threads (0 and 1) to pass a cache line there and back, or None.

    Recorded at the start and the end of a run (it can change in between on a VM): whether the threads
    share a cache changes what the CPU tables mean.
    """
    try:
        import _pykernels_cpu

        value = _pykernels_cpu.openmp_round_trip_ns()
    except (ImportError, AttributeError):
        return None
    return None if value != value else round(value, 1)  # NaN: one thread


def _round_trip_text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} ns"


def _pykernels_version() -> str:
    import pykernels

    return pykernels.__version__


def _cuda_metadata() -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    meta = {"gpu": name.decode() if isinstance(name, bytes) else str(name), "cupy_version": cupy.__version__,
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion()}
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and torch_mod.cuda.is_available():
        meta["cudnn_version"] = torch_mod.backends.cudnn.version()
    return meta


def row_record(row: Row, dtype) -> dict:
    c = row.case
    amount, unit = c.work(row.dtype or dtype)
    rate_key = "gflops" if unit == "GFLOP/s" else "gbps"
    return {
        "op": c.op, "shape": c.shape.name, "pass": c.pass_, "impl": row.impl,
        "x_shape": list(c.shape.x), "batch": c.shape.batch, "dtype": np.dtype(row.dtype or dtype).name,
        "median_ms": None if row.median is None else row.median * 1e3,
        "times_ms": [t * 1e3 for t in row.times],
        rate_key: row.rate(dtype),
        "ratio": row.ratio,
        "calls": len(row.times),
        "others_cpu_share": row.others,
        "openmp_round_trip_ns": row.round_trip,
        "note": row.note or None,
    }


def write_json(path: str, meta: dict, rows: List[Row], dtype, settings: dict) -> None:
    doc = {"metadata": dict(meta, **settings),
           "ratio_definition": "time per image / pykernels' time per image: for a peer, at pykernels' batch, "
                               "its median_ms / pykernels' median_ms (> 1: pykernels is faster); --scaling's "
                               f"rows against another: {', '.join(f'{k} against {v}' for k, v in RATIO_BASE.items())} "
                               f"({OURS_BATCH1} against pykernels where the case's batch is {SCALING_BATCH})",
           "results": [row_record(r, dtype) for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def require_matplotlib():
    """matplotlib's Figure class, or BenchError naming the demo extra."""
    from .demo import MissingExtra, _require

    try:
        return _require("matplotlib.figure", "--plot").Figure
    except MissingExtra as exc:
        raise BenchError(str(exc)) from None


def peer_ratios(rows: List[Row]) -> dict:
    """The peers' ratios (peer time / pykernels'), as "shape pass" -> {peer: ratio} in the table's order. Not
    --scaling's pykernels rows: their ratio is pykernels' own time against batch 8's or float32's (> 1 is
    slower), which the plot's axis would read the other way."""
    ratios: dict = {}
    for r in rows:
        by_peer = ratios.setdefault(f"{r.case.shape.name} {r.case.pass_}", {})
        if r.impl not in OURS_ROWS and r.ratio is not None:
            by_peer[r.impl] = r.ratio
    return ratios


def write_plot(path: str, rows: List[Row], meta: dict) -> None:
    """Bars of peer/pykernels ratios per shape and pass (one colour per peer), log scale, a line at 1."""
    Figure = require_matplotlib()
    ratios = peer_ratios(rows)
    peer_names = list(dict.fromkeys(p for by_peer in ratios.values() for p in by_peer))
    colours = {p: f"C{i}" for i, p in enumerate(peer_names)}
    fig = Figure(figsize=(min(18.0, max(6.0, 0.5 * len(ratios) + 2)), 5.5))
    ax = fig.subplots()
    for i, by_peer in enumerate(ratios.values()):
        width = 0.8 / max(1, len(by_peer))
        for k, (peer, ratio) in enumerate(by_peer.items()):
            ax.bar(i + (k - (len(by_peer) - 1) / 2) * width, ratio, width, color=colours[peer])
    _log_ratio_axis(ax, [v for by_peer in ratios.values() for v in by_peer.values()])
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels(list(ratios), fontsize=7, rotation=60, ha="right")
    ax.set_xlim(-0.6, len(ratios) - 0.4)
    ax.set_ylabel("peer time / pykernels time\n(> 1: pykernels is faster)")
    where = meta["gpu"] if meta["device"] == "cuda" else meta["cpu_model"]
    ax.set_title(f"pykernels bench: {meta['device']}, {meta['dtype']}, {where}, {meta['date']}", fontsize=9)
    if peer_names:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colours[p], label=p) for p in peer_names], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _log_ratio_axis(ax, values) -> None:
    """Log y axis with ticks at powers of two (labelled 0.25x ... 16x) and a line at 1."""
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=1)
    lo = min(values + [1.0]) / 1.3
    hi = max(values + [1.0]) * 1.3
    ax.set_ylim(lo, hi)
    ticks = [2.0 ** e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}x" for t in ticks])
    ax.minorticks_off()


# ------------------------------------------------------------------------------------------------
# the command


def run_bench(args) -> int:
    try:
        return _run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    dtype = np.dtype(args.dtype)
    cases = select_cases(args.ops, args.shapes, args.passes, args.device, args.batch)
    _check_request(args, cases)
    if needs_quiet_openblas(cases, args.device) and _started_as_bench_command():
        _restart_with_quiet_openblas()
    xp = _array_module(args.device)
    impls = implementations(cases, args.device, xp)
    meta = metadata(args.device, dtype, impls)
    peer = impls.get(SCALING_PEER) if args.scaling else None
    if isinstance(peer, str):  # not installed: the reason is its own rows' note
        peer = None
    variants = {case: scaling_variants(case, dtype, xp, peer) if args.scaling else [] for case in cases}
    names = list(impls) + list(dict.fromkeys(impl.name for v in variants.values() for impl, _, _ in v))
    table = Table(cases, names, dtype, args.device)
    table.header(title_lines(meta, args.repeat, args.min_time, args.scaling))
    all_rows: List[Row] = []
    t0 = time.perf_counter()
    for case in cases:
        case_impls = {n: impls[n] for n in (OURS,) + PEERS_BY_DEVICE[args.device][case.op]}
        rows = run_case(case, case_impls, args.device, dtype, args.repeat, args.min_time, xp, variants[case])
        table.rows(rows)
        all_rows += rows
    if args.device == "cpu":
        meta["openmp_round_trip_ns"]["end"] = openmp_round_trip_ns()
    table.footer(all_rows, time.perf_counter() - t0, meta)
    if args.json:
        write_json(args.json, meta, all_rows, dtype, _settings(args))
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, all_rows, meta)
        print(f"wrote {args.plot}")
    return 0


def _check_request(args, cases) -> None:
    """Everything that can fail before any timing: dtype, device, extras, output folders."""
    if args.dtype == "float16" and args.device != "cuda":
        raise BenchError("--dtype float16 runs on CUDA only (add --device cuda)")
    if args.scaling:
        if args.device != "cpu":
            raise BenchError("--scaling runs on the CPU only: drop --device cuda")
        if not any(c.op == "conv2d" for c in cases):
            raise BenchError("--scaling applies to conv2d only, and no conv2d case is chosen")
    if args.device == "cuda" and not _backend.cuda_available():
        raise BenchError(f"--device cuda: the CUDA backend is unavailable ({_backend.cuda_unavailable_reason()}); "
                         "run without --device to benchmark the CPU kernels")
    if args.device == "cpu":
        try:
            _backend.module("numpy")
        except ImportError as exc:
            raise BenchError(str(exc)) from None
    if args.plot:
        require_matplotlib()
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        if not path or os.path.isdir(path):
            raise BenchError(f"{flag}: {path!r} is not a file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise BenchError(f"{flag}: folder {folder} does not exist")
    if args.batch is not None:  # the largest input, made for every pass, within the machine's memory
        # --scaling's float64 rows hold inputs of 8 bytes a value whatever the run's dtype
        itemsize = 8 if args.scaling else np.dtype(args.dtype).itemsize
        largest = max(math.prod(c.shape.x) for c in cases) * itemsize
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        if memory and 4 * largest > memory:
            raise BenchError(f"--batch {args.batch}: an input alone takes {largest / 2**30:.1f} GiB, with its "
                             f"result and gradients more than this machine's {memory / 2**30:.0f} GiB")


def needs_quiet_openblas(cases, device: str) -> bool:
    """True when OpenBLAS' spinning threads would skew the interleaved timings (see OPENBLAS_ENV)."""
    uses_matmul_peer = any("numpy_im2col" in PEERS_BY_DEVICE[device][c.op] for c in cases)
    return uses_matmul_peer and OPENBLAS_ENV[0] not in os.environ


def _started_as_bench_command() -> bool:
    """This process is `python -m pykernels bench ...` (not a test or another program calling main())."""
    main_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")
    return bool(sys.argv) and os.path.abspath(sys.argv[0]) == main_file and sys.argv[1:2] == ["bench"]


def _restart_with_quiet_openblas() -> None:
    """Replace this process by the same command with OPENBLAS_ENV set (once: then it is set)."""
    env = dict(os.environ)
    env[OPENBLAS_ENV[0]] = OPENBLAS_ENV[1]
    argv = getattr(sys, "orig_argv", None) or [sys.executable, "-m", "pykernels"] + sys.argv[1:]  # 3.10+
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _array_module(device: str):
    if device == "cuda":
        import cupy

        return cupy
    return np


def implementations(cases, device: str, xp) -> dict:
    """pykernels and every peer the cases need: name -> object, or the reason it is unavailable."""
    impls = {OURS: Ours(xp)}
    for case in cases:
        for name in PEERS_BY_DEVICE[device][case.op]:
            if name not in impls:
                impls[name] = load_peer(name, device)
    return impls


def _settings(args) -> dict:
    return {"repeat": args.repeat, "min_time_s": args.min_time, "batch_override": args.batch,
            "warmup": {"min_calls": WARMUP_CALLS, "min_seconds": WARMUP_SECONDS},
            "options": {k: v for k, v in sorted(vars(args).items()) if k != "command"}}
