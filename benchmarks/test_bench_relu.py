"""ReLU forward and backward on design.md's ReLU shapes."""

import pytest

from pykernels.shapes import RELU_SHAPES

IMPLS = ["pykernels", "torch", "numpy"]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", RELU_SHAPES, ids=lambda s: s.name)
def test_relu(bench, impl, shape, pass_):
    bench.require(impl, "relu" if pass_ == "fwd" else "relu_backward")
    x, g = (impl.asarray(a) for a in bench.inputs(shape.name))
    if pass_ == "fwd":
        def fn():
            return impl.relu(x)
    else:
        y = impl.relu(x)  # made once, outside the timed region

        def fn():
            return impl.relu_backward(g, y)
    result = bench.run(impl, fn, group=f"relu-{pass_}-{shape.name}", nbytes=shape.bytes_moved(pass_), shape=shape)
    bench.check_shape(impl, result, shape.x)
