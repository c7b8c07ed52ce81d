"""conv2d forward, backward-data and backward-weight on every shape of design.md's table, and on the layers
beyond it (pykernels/shapes.py MORE_CONV_SHAPES: depthwise and grouped layers, summed directly, a 5x5
layer whose backward-data runs as the transposed convolution, and a CIFAR ResNet's stride-2 layer whose
forward runs channels-last)."""

import pytest

from pykernels.shapes import CONV_SHAPES, MORE_CONV_SHAPES

IMPLS = ["pykernels", "torch", "numpy_im2col"]
PASSES = ["fwd", "bwd_data", "bwd_weight"]


def _time_pass(bench, impl, shape, pass_):
    op = "conv2d" if pass_ == "fwd" else "conv2d_backward"
    bench.require(impl, op)
    x, w, _, g = (impl.asarray(a) for a in bench.inputs(shape.name))
    kw = shape.kwargs()
    if pass_ == "fwd":
        def fn():
            return impl.conv2d(x, w, **kw)
        expected = shape.out
    elif pass_ == "bwd_data":
        def fn():
            return impl.conv2d_backward(g, x, w, **kw, need_input=True, need_weight=False, need_bias=False)[0]
        expected = shape.x
    else:
        def fn():
            return impl.conv2d_backward(g, x, w, **kw, need_input=False, need_weight=True, need_bias=False)[1]
        expected = shape.weight
    result = bench.run(impl, fn, group=f"conv2d-{pass_}-{shape.name}", flops=shape.flops(), shape=shape)
    bench.check_shape(impl, result, expected)


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
