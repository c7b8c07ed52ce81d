"""Scratch buffers that each thread keeps between kernel calls (csrc/cpu/scratch_buffers.hpp).

What a user relies on: pykernels.empty_cache() gives back every thread's scratch memory (the transformed
filters, Winograd's work buffers, im2col columns), that of threads that have ended and of OpenMP's
workers too, and returns the bytes it released; it waits for kernel calls in flight instead of freeing
memory under them, so calls from other threads meanwhile give the same bits as ever.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import _pykernels_cpu
import pykernels as pk
from pykernels import reference as ref

# A 3x3 layer that takes Winograd (transformed filters, V and M kept per thread) and a strided 7x7 one
# whose backward passes go through im2col columns and padded copies of x.
WINOGRAD = dict(x=(2, 64, 28, 28), w=(64, 64, 3, 3), stride=1, padding=1)
STRIDED = dict(x=(1, 3, 45, 47), w=(8, 3, 7, 7), stride=2, padding=3)


def layer(spec, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(spec["x"]).astype(np.float32)
    w = rng.standard_normal(spec["w"]).astype(np.float32)
    return x, w, dict(stride=spec["stride"], padding=spec["padding"])


def test_empty_cache_frees_the_scratch_buffers_and_calls_after_it_agree():
    x, w, args = layer(WINOGRAD, 0)
    y = pk.conv2d(x, w, **args)
    held = _pykernels_cpu.scratch_bytes()
    assert held >= 36 * 64 * 64 * 4  # at least the transformed filters (36 x 64 x 64 float32 values)
    released = pk.empty_cache()
    assert released >= held
    assert _pykernels_cpu.scratch_bytes() == 0
    again = pk.conv2d(x, w, **args)
    assert np.array_equal(again, y)
    np.testing.assert_allclose(again, ref.conv2d(x, w, **args), rtol=1e-4, atol=1e-3)
    assert _pykernels_cpu.scratch_bytes() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_empty_cache_gives_the_scratch_memory_back_to_the_system():
    # glibc kept the pages of freed buffers of a few MB in its heap: 16 MB reported freed, RSS unchanged.
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    x, w, args = layer(WINOGRAD, 4)
    xs, ws, args_s = layer(STRIDED, 5)
    for _ in range(2):  # the second round's buffers come from the heap once glibc's mmap threshold has risen
        pk.empty_cache()
        y = pk.conv2d(x, w, **args)
        pk.conv2d_backward(y, x, w, **args)
        ys = pk.conv2d(xs, ws, **args_s)
        pk.conv2d_backward(ys, xs, ws, **args_s)
    before = rss()
    released = pk.empty_cache()
    assert released > 4 << 20
    assert before - rss() >= released // 2, (before - rss(), released)


def test_empty_cache_frees_the_buffers_of_a_thread_that_has_ended():
    x, w, args = layer(STRIDED, 1)
    gy = np.random.default_rng(2).standard_normal(pk.conv2d(x, w, **args).shape).astype(np.float32)
    pk.empty_cache()
    held_in_worker = []

    def work():
        pk.conv2d_backward(gy, x, w, **args)
        held_in_worker.append(_pykernels_cpu.scratch_bytes())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert held_in_worker[0] > 0
    left = _pykernels_cpu.scratch_bytes()  # what the worker's OpenMP threads, if any, still hold
    assert pk.empty_cache() >= left
    assert _pykernels_cpu.scratch_bytes() == 0


def test_empty_cache_during_calls_on_other_threads_changes_no_result():
    cases = []
    for seed, spec in enumerate((WINOGRAD, STRIDED)):
        x, w, args = layer(spec, seed)
        gy = np.random.default_rng(seed + 10).standard_normal(pk.conv2d(x, w, **args).shape).astype(np.float32)
        cases.append((x, w, gy, args, pk.conv2d(x, w, **args), pk.conv2d_backward(gy, x, w, **args)))
    stop = threading.Event()
    calls, mismatches, failures = [0], [], []

    def run(case):
        x, w, gy, args, y, grads = case
        try:
            while not stop.is_set():
                if not np.array_equal(pk.conv2d(x, w, **args), y):
                    mismatches.append("forward")
                if not all(np.array_equal(a, b) for a, b in zip(pk.conv2d_backward(gy, x, w, **args), grads)):
                    mismatches.append("backward")
                calls[0] += 1
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(cases[i % 2],)) for i in range(3)]
    for t in threads:
        t.start()
    releases, released, start = 0, 0, time.perf_counter()
    try:
        while time.perf_counter() - start < 1.5 or calls[0] < 30:
            released += pk.empty_cache()
            releases += 1
            time.sleep(0.001)
            assert time.perf_counter() - start < 60, "kernel calls starved"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures and not mismatches, (failures, mismatches[:5])
    assert releases > 10 and calls[0] >= 30
    assert released > 0  # buffers really were freed between calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the 'fork' start method is Linux's default")
def test_a_child_forked_during_a_call_on_another_thread_can_empty_the_cache():
    # The child inherited the count of calls in flight, whose threads it does not have: its empty_cache()
    # waited for them for ever (17 children of 20).
    script = textwrap.dedent("""
        import multiprocessing as mp, threading, time, numpy as np, pykernels as pk
        rng = np.random.default_rng(0)
        x = rng.standard_normal((8, 64, 56, 56), dtype=np.float32)
        w = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)
        small = x[:1, :, :16, :16].copy()
        want = pk.conv2d(small, w, padding=1).tobytes()
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                pk.conv2d(x, w, padding=1)
        thread = threading.Thread(target=busy)
        thread.start()
        time.sleep(0.05)
        def child(queue):
            pk.empty_cache()
            queue.put(pk.conv2d(small, w, padding=1).tobytes() == want)
        ctx = mp.get_context("fork")
        try:
            for _ in range(4):
                queue = ctx.Queue()
                p = ctx.Process(target=child, args=(queue,), daemon=True)
                p.start()
                assert queue.get(timeout=10), "the child's result differs"
                p.join(10)
        finally:
            stop.set()
            thread.join()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
