"""ReLU forward and backward on design.md's ReLU shapes."""

import numpy as np
import pytest

from pykernels import reference
from pykernels.shapes import RELU_SHAPES

IMPLS = ["pykernels", "torch", "numpy"]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", RELU_SHAPES, ids=lambda s: s.name)
def test_relu(bench, impl, shape, pass_):
    bench.require(impl, "relu" if pass_ == "fwd" else "relu_backward")
    arrays = bench.inputs(shape.name)
    x, g = (impl.asarray(a) for a in arrays)
    if pass_ == "fwd":
        def fn():
            return impl.relu(x)

        def truth():
            return reference.relu(arrays[0].astype(np.float64))
    else:
        y = impl.relu(x)  # made once, outside the timed region

        def fn():
            return impl.relu_backward(g, y)

        def truth():
            return reference.relu_backward(arrays[1].astype(np.float64), reference.relu(arrays[0].astype(np.float64)))
    group = f"relu-{pass_}-{shape.name}"
    result = bench.run(impl, fn, group=group, nbytes=shape.bytes_moved(pass_), shape=shape)
    bench.check_result(impl, result, group, truth)
