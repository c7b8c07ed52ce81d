"""max_pool2d forward (with indices) and backward on design.md's pooling shapes."""

import numpy as np
import pytest

from pykernels import reference
from pykernels.shapes import POOL_SHAPES

IMPLS = ["pykernels", "torch"]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: s.name)
def test_max_pool2d(bench, impl, shape, pass_):
    bench.require(impl, "max_pool2d" if pass_ == "fwd" else "max_pool2d_backward")
    arrays = bench.inputs(shape.name)
    x, g = (impl.asarray(a) for a in arrays)
    x64, g64 = (a.astype(np.float64) for a in arrays)
    kw = shape.kwargs()
    if pass_ == "fwd":
        def fn():
            return impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)

        group = f"max_pool2d-fwd-{shape.name}"
        result = bench.run(impl, fn, group=group, nbytes=shape.bytes_moved("fwd"), shape=shape)
        y, idx = result
        want_y, want_idx = reference.max_pool2d(x64, shape.kernel_size, **kw)
        bench.check_result(impl, y, group, lambda: want_y)
        np.testing.assert_array_equal(impl.to_numpy(idx), want_idx, err_msg=f"{impl.name}: {group} indices")
    else:
        _, idx = impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)  # outside the timing

        def fn():
            return impl.max_pool2d_backward(g, idx, shape.x, shape.kernel_size, **kw)

        group = f"max_pool2d-bwd-{shape.name}"
        result = bench.run(impl, fn, group=group, nbytes=shape.bytes_moved("bwd"), shape=shape)
        bench.check_result(impl, result, group, lambda: reference.max_pool2d_backward(
            g64, reference.max_pool2d(x64, shape.kernel_size, **kw)[1], shape.x, shape.kernel_size, **kw))
