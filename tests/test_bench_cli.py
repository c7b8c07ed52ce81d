"""Tests of `python -m pykernels bench` (pykernels/bench.py and its subcommand in pykernels/__main__.py).

Kept fast: the command-line runs use design.md's small lenet_5x5 / relu shapes with `--batch 1..2`,
`--repeat 2..3` and `--min-time 0`, so every case takes milliseconds.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pykernels import _backend, bench, peers, shapes
from _cli import run_main  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK = ["--repeat", "3", "--min-time", "0"]
HAS_TORCH = peers.torch_available()


def _table_rows(out: str):
    """The table's rows as lists of cells, after its header line (which is checked here)."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["op", "shape", "pass", "impl"])
    assert lines[header].split() == ["op", "shape", "pass", "impl", "median", "ms", "rate", "ratio", "calls"]
    rows = []
    for line in lines[header + 1:]:
        if not line.strip():
            continue
        cells = line.split()
        if cells[0] not in bench.OPS:
            break  # the footer
        rows.append(cells)
    return rows


def _hide_modules(monkeypatch, top: str) -> None:
    """Make `import top` (and every already-imported `top.x`) raise ImportError, as if not installed."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, top, None)


# ---- the table ---------------------------------------------------------------------------------------


def test_conv_table_has_a_row_per_impl_and_pass_with_numbers(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "conv2d", "--shape", "lenet_5x5", "--batch", "2"] + QUICK)
    assert rc == 0, err
    assert "ratio = peer median / pykernels median: > 1 means pykernels is faster" in out
    rows = _table_rows(out)
    impls = ["pykernels", "torch", "numpy_im2col"]
    assert [(r[2], r[3]) for r in rows] == [(p, i) for p in ("fwd", "bwd_data", "bwd_weight") for i in impls]
    for cells in rows:
        op, shape, pass_, impl, median, rate, unit, ratio, calls = cells
        assert (op, shape) == ("conv2d", "lenet_5x5")
        if impl == "torch" and not HAS_TORCH:
            assert median == "-" and ratio == "-"
            continue
        assert float(median.rstrip("*~")) > 0
        assert float(rate) > 0 and unit == "GFLOP/s"
        assert int(calls) >= 3
        if impl == "pykernels":
            assert ratio == "-"
        else:
            assert ratio.endswith("x") and float(ratio.rstrip("x!")) > 0
    if not HAS_TORCH:
        assert "note: torch is not installed" in out


def test_relu_and_pool_tables_report_gb_per_s(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu,max_pool2d", "--batch", "1"] + QUICK)
    assert rc == 0, err
    rows = _table_rows(out)
    expected = [("relu", "relu_vgg", p, i) for p in ("fwd", "bwd") for i in ("pykernels", "torch", "numpy")]
    expected += [("max_pool2d", s.name, p, i) for s in shapes.POOL_SHAPES for p in ("fwd", "bwd")
                 for i in ("pykernels", "torch")]
    assert [tuple(r[:4]) for r in rows] == expected
    assert all(r[6] == "GB/s" for r in rows if r[4] != "-")


def test_pass_bwd_means_both_backward_passes_for_conv(capsys):
    rc, out, err = run_main(capsys, ["bench", "--shape", "lenet_5x5", "--pass", "bwd", "--batch", "1"] + QUICK)
    assert rc == 0, err
    assert sorted({r[2] for r in _table_rows(out)}) == ["bwd_data", "bwd_weight"]


def test_missing_peer_prints_a_dash_row_and_our_numbers(capsys, monkeypatch):
    monkeypatch.setattr(peers, "torch_available", lambda: False)
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--pass", "fwd", "--batch", "1"] + QUICK)
    assert rc == 0, err
    rows = {r[3]: r for r in _table_rows(out)}
    assert rows["torch"][4:] == ["-"] * 4
    assert float(rows["pykernels"][4].rstrip("*~")) > 0
    assert rows["numpy"][7].endswith("x")
    assert "note: torch is not installed" in out


def test_scaling_times_batch_1_batch_8_and_float64_in_the_same_rounds(capsys, tmp_path):
    # lenet_5x5 at --batch 2: a batch-8 row too (the case's batch is not 8), which the batch-1 row is
    # compared with; float64 is compared with pykernels' own float32 row at batch 2.
    path = tmp_path / "scaling.json"
    rc, out, err = run_main(capsys, ["bench", "--shape", "lenet_5x5", "--pass", "fwd,bwd_weight", "--batch", "2",
                                     "--scaling", "--json", str(path)] + QUICK)
    assert rc == 0, err
    assert "pykernels_b1, pykernels_f64: pykernels at batch 1, in float64, in the same rounds" in out
    assert "torch_b1, torch_f64: torch likewise; ratio = its median / pykernels_b1's, pykernels_f64's" in out
    rows = _table_rows(out)
    # torch at batch 1 and in float64 too, where it is installed (as the tests' CI has it)
    peer_rows = ["torch_b1", "torch_f64"] if HAS_TORCH else []
    impls = ["pykernels", "torch", "numpy_im2col", "pykernels_b1", "pykernels_b8", "pykernels_f64"] + peer_rows
    assert [(r[2], r[3]) for r in rows] == [(p, i) for p in ("fwd", "bwd_weight") for i in impls]
    assert not any(r[7].endswith("!") for r in rows)  # every result agrees with pykernels'
    results = json.loads(path.read_text())["results"]
    for pass_ in ("fwd", "bwd_weight"):
        by_impl = {r["impl"]: r for r in results if r["pass"] == pass_}
        assert {i: (r["batch"], r["dtype"]) for i, r in by_impl.items()} == dict({
            "pykernels": (2, "float32"), "torch": (2, "float32"), "numpy_im2col": (2, "float32"),
            "pykernels_b1": (1, "float32"), "pykernels_b8": (8, "float32"), "pykernels_f64": (2, "float64")},
            **({"torch_b1": (1, "float32"), "torch_f64": (2, "float64")} if HAS_TORCH else {}))
        ours, b1, b8, f64 = (by_impl[i] for i in ("pykernels", "pykernels_b1", "pykernels_b8", "pykernels_f64"))
        # every row ran the same number of rounds, interleaved
        assert len({len(r["times_ms"]) for r in by_impl.values() if r["times_ms"]}) == 1
        assert b1["ratio"] == pytest.approx(b1["median_ms"] / (b8["median_ms"] / 8))
        assert b8["ratio"] == pytest.approx(b8["median_ms"] / 8 / (ours["median_ms"] / 2))
        assert f64["ratio"] == pytest.approx(f64["median_ms"] / ours["median_ms"])
        if HAS_TORCH:  # the peer's rows against pykernels' at the same batch and dtype
            assert by_impl["torch_b1"]["ratio"] == pytest.approx(by_impl["torch_b1"]["median_ms"] / b1["median_ms"])
            assert by_impl["torch_f64"]["ratio"] == pytest.approx(by_impl["torch_f64"]["median_ms"] / f64["median_ms"])
        # rates from each row's own batch: one image's flops at batch 1
        flops_1 = shapes.CONV_SHAPES[0].with_batch(1).flops()
        assert b1["gflops"] == pytest.approx(flops_1 / (b1["median_ms"] / 1e3) / 1e9)
        assert b8["gflops"] == pytest.approx(8 * flops_1 / (b8["median_ms"] / 1e3) / 1e9)


def test_scaling_leaves_out_the_rows_that_would_repeat_the_case(capsys):
    rc, out, err = run_main(capsys, ["bench", "--shape", "lenet_5x5", "--pass", "fwd", "--batch", "8",
                                     "--dtype", "float64", "--scaling"] + QUICK)
    assert rc == 0, err
    assert [r[3] for r in _table_rows(out)] == ["pykernels", "torch", "numpy_im2col", "pykernels_b1"] + (
        ["torch_b1"] if HAS_TORCH else [])
    rc, out, err = run_main(capsys, ["bench", "--op", "conv2d,relu", "--shape", "lenet_5x5,relu_vgg", "--pass", "fwd",
                                     "--batch", "1", "--scaling"] + QUICK)
    assert rc == 0, err
    assert [tuple(r[2:4]) for r in _table_rows(out) if r[3].startswith("pykernels")] == [
        ("fwd", "pykernels"), ("fwd", "pykernels_f64"), ("fwd", "pykernels")]  # relu: no scaling rows
    if HAS_TORCH:
        assert [r[3] for r in _table_rows(out) if r[3].startswith("torch_")] == ["torch_f64"]


def test_scaling_peer_rows_are_checked_against_pykernels_at_their_batch_and_dtype(capsys, monkeypatch):
    # A peer whose float64 result is off is flagged on its float64 row only; its batch-1 row is compared
    # with pykernels' batch-1 result (a different shape from the case's), and agrees.
    monkeypatch.setattr(bench, "PEERS_BY_DEVICE", {"cpu": dict(bench.PEERS_BY_DEVICE["cpu"], conv2d=("torch",))})

    def off_in_float64(x, *args, **kwargs):
        y = peers.im2col_conv2d(x, *args, **kwargs)
        return y * (1 + 1e-6) if y.dtype == np.float64 else y

    monkeypatch.setattr(peers.NumpyIm2colPeer, "conv2d", staticmethod(off_in_float64))
    monkeypatch.setattr(bench, "load_peer", lambda name, device: bench.Renamed(peers.NumpyIm2colPeer(), name))
    rc, out, err = run_main(capsys, ["bench", "--shape", "lenet_5x5", "--pass", "fwd", "--batch", "2",
                                     "--scaling"] + QUICK)
    assert rc == 0, err
    rows = {r[3]: r for r in _table_rows(out)}
    assert [i for i in rows if i.startswith("torch")] == ["torch", "torch_b1", "torch_f64"]
    assert rows["torch_f64"][7].endswith("x!") and not rows["torch_b1"][7].endswith("!")
    assert not rows["torch"][7].endswith("!")
    assert "note: torch_f64 on conv2d lenet_5x5 fwd: result differs from pykernels'" in out


def test_scaling_is_refused_without_a_conv_case_or_on_cuda(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--scaling"])
    assert rc == 2 and "--scaling applies to conv2d only" in err and "pykernels bench:" not in out
    rc, out, err = run_main(capsys, ["bench", "--device", "cuda", "--op", "conv2d", "--scaling"])
    assert rc == 2 and "--scaling" in err and "pykernels bench:" not in out


# ---- JSON and the plot -------------------------------------------------------------------------------


def test_json_has_every_row_and_the_machine(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc, out, err = run_main(capsys, ["bench", "--shape", "lenet_5x5,relu_vgg", "--batch", "1", "--json", str(path)]
                             + QUICK)
    assert rc == 0, err
    assert f"wrote {path}" in out
    doc = json.loads(path.read_text())
    meta = doc["metadata"]
    for key in ("date", "cpu_model", "threads", "numpy_version", "torch_version", "active_isa", "device", "dtype"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["threads"] == os.cpu_count() and meta["numpy_version"] == np.__version__
    assert isinstance(meta["cpu_model"], str) and meta["cpu_model"]
    assert meta["active_isa"] in ("avx512", "avx2", "portable")
    assert (meta["torch_version"] is not None) == HAS_TORCH
    # the OpenMP threads' round trip, start and end, in the JSON and the footer (a positive time with two
    # threads on cores of their own; None without OpenMP)
    trip = meta["openmp_round_trip_ns"]
    assert set(trip) == {"start", "end"}
    for value in trip.values():
        assert value is None or 0 < value < 1e8
    assert "OpenMP threads' round trip:" in out
    assert all(r["openmp_round_trip_ns"] is None or r["openmp_round_trip_ns"] > 0 for r in doc["results"])
    results = doc["results"]
    assert len(results) == len(_table_rows(out)) == 3 * 3 + 2 * 3
    for r in results:
        assert {"op", "shape", "pass", "impl", "median_ms", "times_ms", "ratio"} <= set(r)
        rate_key = "gflops" if r["op"] == "conv2d" else "gbps"
        assert rate_key in r and ({"gflops", "gbps"} - {rate_key}).isdisjoint(r)
        if r["median_ms"] is None:  # a peer that is not installed
            assert r["impl"] == "torch" and not HAS_TORCH and r["times_ms"] == [] and r["ratio"] is None
            continue
        assert len(r["times_ms"]) >= 3 and all(isinstance(t, float) and t > 0 for t in r["times_ms"])
        assert r["median_ms"] == pytest.approx(float(np.median(r["times_ms"])))
        assert r[rate_key] > 0
        if r["impl"] == "pykernels":
            assert r["ratio"] is None
        else:
            key = (r["shape"], r["pass"], "pykernels")
            ours = next(o for o in results if (o["shape"], o["pass"], o["impl"]) == key)
            assert r["ratio"] == pytest.approx(r["median_ms"] / ours["median_ms"])


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "ratios.png"
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--batch", "1", "--plot", str(png)] + QUICK)
    assert rc == 0, err
    assert f"wrote {png}" in out
    width, height = _png_size(png)
    assert width > 300 and height > 200
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0  # not blank


def test_plot_draws_the_peers_ratios_not_pykernels_own_scaling_rows(capsys, tmp_path):
    # pykernels_b1/_b8/_f64's ratios are pykernels against itself (> 1: slower), the axis says "peer time /
    # pykernels time (> 1: pykernels is faster)": only the peers' rows, torch_b1 and torch_f64 among them.
    path = tmp_path / "scaling.json"
    rc, out, err = run_main(capsys, ["bench", "--shape", "lenet_5x5", "--pass", "fwd", "--batch", "2", "--scaling",
                                     "--json", str(path)] + QUICK)
    assert rc == 0, err
    shape = shapes.CONV_SHAPES[0].with_batch(2)
    rows = [bench.Row(bench.Case(r["op"], shape, r["pass"]), r["impl"], ratio=r["ratio"])
            for r in json.loads(path.read_text())["results"]]
    ratios = bench.peer_ratios(rows)
    assert list(ratios) == ["lenet_5x5 fwd"]
    by_peer = {r.impl: r.ratio for r in rows if r.impl in ratios["lenet_5x5 fwd"]}
    assert ratios["lenet_5x5 fwd"] == by_peer
    assert set(by_peer) == {"numpy_im2col"} | ({"torch", "torch_b1", "torch_f64"} if HAS_TORCH else set())


def test_plot_without_matplotlib_names_the_demo_extra_before_timing(capsys, monkeypatch, tmp_path):
    _hide_modules(monkeypatch, "matplotlib")
    png = tmp_path / "ratios.png"
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--batch", "1", "--plot", str(png)] + QUICK)
    assert rc == 2
    assert 'pip install "pykernels[demo]"' in err and "matplotlib" in err and "--plot" in err
    assert "Traceback" not in err and "pykernels bench:" not in out  # nothing was timed
    assert not png.exists()


# ---- bad requests ------------------------------------------------------------------------------------


def test_unknown_shape_is_an_argparse_error_listing_the_names(capsys):
    rc, out, err = run_main(capsys, ["bench", "--shape", "resnet_3x3_1024"])
    assert rc == 2
    assert "--shape" in err and "resnet_3x3_1024" in err
    for s in shapes.ALL_SHAPES:
        assert s.name in err


def test_unknown_op_is_an_argparse_error(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu,softmax"])
    assert rc == 2
    assert "--op" in err and "softmax" in err and "conv2d" in err and "max_pool2d" in err


def test_shape_of_another_op_is_refused(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--shape", "resnet_stem"])
    assert rc == 2
    assert "resnet_stem is a conv2d shape" in err and "Traceback" not in err


def test_pass_that_applies_to_nothing_is_refused(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--pass", "bwd_weight"])
    assert rc == 2 and "--pass bwd_weight applies to none" in err


@pytest.mark.parametrize("name", ["", "a folder"])
def test_json_needs_a_file_name(capsys, tmp_path, name):
    # a folder had been found out only when the results were written, after the whole run (--plot, whose
    # name is checked alike, needs matplotlib first)
    path = str(tmp_path) if name else ""
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--repeat", "1", "--min-time", "0", "--json", path])
    assert rc == 2 and f"--json: {path!r} is not a file name" in err and out == "", err


def test_the_batch_guard_counts_scaling_float64_inputs(capsys, monkeypatch):
    # a float32 input of a quarter of the machine's memory passes the guard; with --scaling its float64
    # copy is twice that, and the guard had counted float32's size (a machine of 64 MiB: a small run if not)
    memory = 64 << 20
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: memory // 4096 if name == "SC_PHYS_PAGES" else
                        4096 if name == "SC_PAGE_SIZE" else real_sysconf(name))
    per_image = 3 * 224 * 224  # resnet_stem's input
    batch = memory // (4 * per_image * 4)
    rc, out, err = run_main(capsys, ["bench", "--shape", "resnet_stem", "--pass", "fwd", "--batch", str(batch),
                                     "--scaling"])
    assert rc == 2 and f"--batch {batch}: an input alone takes" in err and out == "", err


def test_a_batch_larger_than_memory_is_refused_before_any_timing(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--batch", "99999999999"])
    assert rc == 2 and "--batch 99999999999: an input alone takes" in err and "GiB" in err and out == ""


def test_check_refuses_a_negative_seed(capsys):
    rc, out, err = run_main(capsys, ["check", "--seed", "-1"])
    assert rc == 2 and "--seed: must be an integer in [0, 2**32)" in err


def test_float16_needs_cuda(capsys):
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--dtype", "float16"])
    assert rc == 2 and "float16 runs on CUDA only" in err


@pytest.mark.skipif(_backend.cuda_available(), reason="the CUDA backend is available here")
def test_device_cuda_without_the_backend_exits_2_with_the_reason(capsys):
    rc, out, err = run_main(capsys, ["bench", "--device", "cuda", "--op", "relu"])
    assert rc == 2
    assert "--device cuda" in err and "CUDA backend is unavailable" in err
    assert _backend.cuda_unavailable_reason() in err
    assert "pykernels bench:" not in out


def test_help_documents_the_options(capsys):
    rc, out, err = run_main(capsys, ["bench", "--help"])
    assert rc == 0
    for flag in ("--op", "--shape", "--pass", "--device", "--dtype", "--repeat", "--min-time", "--json",
                 "--plot", "--batch", "--scaling"):
        assert flag in out, flag
    assert "> 1: pykernels is faster" in out


# ---- the pieces --------------------------------------------------------------------------------------


def test_select_cases_orders_and_sizes_the_shapes():
    cases = bench.select_cases(None, ["pool2x2_vgg", "lenet_5x5"], None, "cpu", None)
    assert [(c.op, c.shape.name, c.pass_) for c in cases] == [
        ("conv2d", "lenet_5x5", "fwd"), ("conv2d", "lenet_5x5", "bwd_data"), ("conv2d", "lenet_5x5", "bwd_weight"),
        ("max_pool2d", "pool2x2_vgg", "fwd"), ("max_pool2d", "pool2x2_vgg", "bwd")]
    assert cases[0].shape == shapes.get_shape("lenet_5x5")  # the table's CPU batch
    gpu = bench.select_cases(["relu"], None, ["fwd"], "cuda", None)
    assert [c.shape.x for c in gpu] == [(shapes.GPU_BATCH,) + shapes.get_shape("relu_vgg").x[1:]]
    assert {c.shape.batch for c in bench.select_cases(None, None, None, "cpu", 3)} == {3}
    assert len(bench.select_cases(None, None, None, "cpu", None)) == 7 * 3 + 1 * 2 + 2 * 2


def test_layers_beyond_the_table_run_only_when_named():
    names = [s.name for s in shapes.MORE_CONV_SHAPES]
    assert not {c.shape.name for c in bench.select_cases(None, None, None, "cpu", None)} & set(names)
    cases = bench.select_cases(None, ["resnext_3x3_256_g32", "vgg_3x3_64"], ["fwd"], "cpu", None)
    assert [c.shape.name for c in cases] == ["vgg_3x3_64", "resnext_3x3_256_g32"]  # the table's first
    assert cases[1].shape.groups == 32 and bench.op_of_shape("depthwise_3x3_128") == "conv2d"
    with pytest.raises(bench.BenchError, match="is a conv2d shape"):
        bench.select_cases(["relu"], ["conv_5x5_64"], None, "cpu", None)


class _FakeTimer:
    def __init__(self, name, log, seconds):
        self.name, self.log, self.s = name, log, seconds

    def seconds(self, fn):
        self.log.append(self.name)
        fn()
        return self.s


def test_time_interleaved_alternates_implementations_for_at_least_repeat_rounds():
    log = []
    entries = [(_FakeTimer("ours", log, 1e-3), lambda: None), (_FakeTimer("peer", log, 2e-3), lambda: None),
               (_FakeTimer("numpy", log, 3e-3), lambda: None)]
    times = bench.time_interleaved(entries, repeat=2, min_time=0)
    assert log == ["ours", "peer", "ours", "numpy", "peer", "numpy"] * 2
    assert times == [[1e-3] * 4, [2e-3] * 4, [3e-3] * 4]
    assert bench.time_interleaved([], repeat=4, min_time=10) == []


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_balanced_order_puts_each_implementation_after_every_other_once(n):
    order = bench.balanced_order(n)
    assert sorted(set(order)) == list(range(n))
    pairs = [(order[i - 1], order[i]) for i in range(len(order))] if n > 1 else []  # cyclic: last, then first
    assert sorted(pairs) == sorted((a, b) for a in range(n) for b in range(n) if a != b)


def test_results_differ_catches_a_wrong_peer():
    a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 1, 3, 4)
    assert bench.results_differ(a, a + 1e-6, np.float32) is None
    assert "differs" in bench.results_differ(a, a + 0.1, np.float32)
    idx = np.arange(12).reshape(a.shape)
    assert "indices" in bench.results_differ((a, idx), (a, idx[..., ::-1]), np.float32)
    assert "shape" in bench.results_differ(a, a[..., :2], np.float32)


@pytest.mark.parametrize("geometry", [
    dict(stride=1, padding=1), dict(stride=2, padding=3), dict(stride=(2, 1), padding=((0, 2), (1, 0))),
    dict(stride=1, padding="same", dilation=2), dict(stride=1, padding=0, groups=2),
], ids=str)
def test_cupy_im2col_peer_matches_the_numpy_peer(geometry):
    """The GPU peer is array-module generic: checked here with NumPy against peers.NumpyIm2colPeer."""
    rng = np.random.default_rng(0)
    groups = geometry.get("groups", 1)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 4 // groups, 3, 3))
    b = rng.standard_normal(6)
    ours, ref = bench.CupyIm2colPeer(xp=np), peers.get_peer("numpy_im2col")
    y = ours.conv2d(x, w, b, **geometry)
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, **geometry), rtol=1e-12, atol=1e-12)
    assert y.flags.c_contiguous
    g = rng.standard_normal(y.shape)
    for got, want in zip(ours.conv2d_backward(g, x, w, **geometry), ref.conv2d_backward(g, x, w, **geometry)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_cupy_relu_peer_matches_numpy():
    x = np.array([[-1.0, 0.0, 2.0, np.nan]])
    g = np.array([[1.0, 2.0, 3.0, 4.0]])
    peer = bench.CupyPeer(xp=np)
    np.testing.assert_array_equal(peer.relu(x), np.maximum(x, 0))
    np.testing.assert_array_equal(peer.relu_backward(g, peer.relu(x)), [[0.0, 0.0, 3.0, 0.0]])


def test_openblas_restart_only_for_the_command_and_only_with_the_numpy_matmul_peer(monkeypatch):
    monkeypatch.delenv(bench.OPENBLAS_ENV[0], raising=False)
    conv = bench.select_cases(["conv2d"], ["lenet_5x5"], ["fwd"], "cpu", 1)
    relu = bench.select_cases(["relu"], None, None, "cpu", 1)
    assert bench.needs_quiet_openblas(conv, "cpu") and not bench.needs_quiet_openblas(relu, "cpu")
    assert not bench.needs_quiet_openblas(conv, "cuda")
    monkeypatch.setenv(bench.OPENBLAS_ENV[0], "4")
    assert not bench.needs_quiet_openblas(conv, "cpu")
    assert not bench._started_as_bench_command()  # pytest is not `python -m pykernels bench`


def test_command_line_restarts_with_quiet_openblas(tmp_path):
    """`python -m pykernels bench` from the clone's root sets OPENBLAS_THREAD_TIMEOUT before NumPy loads."""
    path = tmp_path / "b.json"
    env = {k: v for k, v in os.environ.items() if k != bench.OPENBLAS_ENV[0]}
    proc = subprocess.run(
        [sys.executable, "-m", "pykernels", "bench", "--shape", "lenet_5x5", "--pass", "fwd", "--batch", "1",
         "--repeat", "2", "--min-time", "0", "--json", str(path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("pykernels bench:") == 1  # the header once: printed after the restart only
    meta = json.loads(path.read_text())["metadata"]
    assert meta["environment"].get(bench.OPENBLAS_ENV[0]) == bench.OPENBLAS_ENV[1]


def test_command_ends_quietly_when_its_reader_goes_away():
    # `python -m pykernels bench | head -1`: the rows come after half a second of timing, when the pipe has no
    # reader any more; the command ends with exit status 1 and no traceback.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykernels", "bench", "--op", "relu", "--pass", "fwd", "--batch", "1", "--repeat", "2",
         "--min-time", "0.5"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("pykernels bench:")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_peer_that_computes_something_else_is_flagged_and_one_that_fails_is_a_dash(capsys, monkeypatch):
    monkeypatch.setattr(peers.NumpyPeer, "relu", staticmethod(lambda x, *, out=None: x + 1))

    def refuse(self, *args, **kwargs):
        raise NotImplementedError("not today")

    monkeypatch.setattr(peers.TorchPeer, "relu", refuse)
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--pass", "fwd", "--batch", "1"] + QUICK)
    assert rc == 0, err
    rows = {r[3]: r for r in _table_rows(out)}
    assert rows["numpy"][7].endswith("x!")
    assert "note: numpy on relu relu_vgg fwd: result differs from pykernels'" in out
    if HAS_TORCH:
        assert rows["torch"][4:] == ["-"] * 4
        assert "note: torch cannot run relu relu_vgg fwd: NotImplementedError: not today" in out


def test_cases_timed_while_the_threads_share_no_cache_are_marked(capsys, monkeypatch):
    # the round trip as measured around each case: 80 ns (shared L3) then 400 ns (cores on different L3s)
    trips = iter([80.0, 80.0, 80.0, 400.0, 80.0, 80.0, 80.0, 80.0])
    monkeypatch.setattr(bench, "openmp_round_trip_ns", lambda: next(trips))
    rc, out, err = run_main(capsys, ["bench", "--op", "relu", "--pass", "fwd,bwd"] + QUICK)
    assert rc == 0, err
    rows = _table_rows(out)
    marked = [r for r in rows if r[4].endswith("~")]
    # metadata's start reading, then before and after each case: the second case (bwd) saw 400 ns
    assert {r[2] for r in marked} == {"bwd"} and len(marked) == len([r for r in rows if r[2] == "bwd"])
    assert "~ the OpenMP threads' round trip was over 200 ns around this case (up to 400 ns)" in out
    assert "OpenMP threads' round trip: 80 ns at the start, 80 ns at the end" in out
