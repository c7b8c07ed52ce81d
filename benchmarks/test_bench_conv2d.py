"""conv2d forward, backward-data and backward-weight on every shape of design.md's table, and on the layers
beyond it (pykernels/shapes.py MORE_CONV_SHAPES: depthwise and grouped layers, summed directly, a 5x5
layer whose backward-data runs as the transposed convolution, and a CIFAR ResNet's stride-2 layer whose
forward runs channels-last); the table's shapes also at batch 1 (and 8, where their batch is not 8) and
in float64, for the issue's bounds on those (conftest.py prints the ratios)."""

import numpy as np
import pytest

from pykernels import reference
from pykernels.shapes import CONV_SHAPES, MORE_CONV_SHAPES

IMPLS = ["pykernels", "torch", "numpy_im2col"]
PASSES = ["fwd", "bwd_data", "bwd_weight"]


def _time_pass(bench, impl, shape, pass_, variant=""):
    """Times one pass; a `variant` suffix ("b1", "b8", "f64": bench.variant) runs it at another batch or dtype."""
    op = "conv2d" if pass_ == "fwd" else "conv2d_backward"
    bench.require(impl, op)
    batch, dtype = bench.variant(variant)
    if batch is not None:
        shape = shape.with_batch(batch)
    arrays = bench.inputs(shape.name, batch=batch, dtype=dtype)
    x, w, _, g = (impl.asarray(a) for a in arrays)
    kw = shape.kwargs()
    if pass_ == "fwd":
        def fn():
            return impl.conv2d(x, w, **kw)
    elif pass_ == "bwd_data":
        def fn():
            return impl.conv2d_backward(g, x, w, **kw, need_input=True, need_weight=False, need_bias=False)[0]
    else:
        def fn():
            return impl.conv2d_backward(g, x, w, **kw, need_input=False, need_weight=True, need_bias=False)[1]

    def truth():  # the float64 reference, made once per group (check_result)
        x64, w64, _, g64 = (a.astype(np.float64) for a in arrays)
        if pass_ == "fwd":
            return reference.conv2d(x64, w64, **kw)
        return reference.conv2d_backward(g64, x64, w64, **kw)[0 if pass_ == "bwd_data" else 1]

    group = f"conv2d-{pass_}-{shape.name}" + (f"-{variant}" if variant else "")
    result = bench.run(impl, fn, group=group, flops=shape.flops(), shape=shape)
    bench.check_result(impl, result, group, truth, dtype)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: s.name)
def test_conv2d(bench, impl, shape, pass_):
    _time_pass(bench, impl, shape, pass_)


# numpy_im2col loops over the groups in Python (128 for the depthwise layers): not a peer worth its time here
@pytest.mark.parametrize("impl", ["pykernels", "torch"], indirect=True)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", MORE_CONV_SHAPES, ids=lambda s: s.name)
def test_conv2d_beyond_the_table(bench, impl, shape, pass_):
    _time_pass(bench, impl, shape, pass_)


def _variants(shape):
    return ["b1"] + (["b8"] if shape.x[0] != 8 else []) + ["f64"]


@pytest.mark.parametrize("impl", ["pykernels", "torch"], indirect=True)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape, variant", [(s, v) for s in CONV_SHAPES for v in _variants(s)],
                         ids=lambda p: p if isinstance(p, str) else p.name)
def test_conv2d_at_batch_1_and_in_float64(bench, impl, shape, variant, pass_):
    _time_pass(bench, impl, shape, pass_, variant)
