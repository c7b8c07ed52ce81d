"""max_pool2d forward (with indices) and backward on design.md's pooling shapes."""

import numpy as np
import pytest

from pykernels import reference
from pykernels.shapes import POOL_SHAPES

IMPLS = ["pykernels", "torch"]


_REFERENCE: dict = {}


def _reference(shape, x):
    """pykernels.reference's (y, indices) on x in float64: made once per shape for every implementation and pass
    (the cases of one shape run one after another)."""
    if shape.name not in _REFERENCE:
        _REFERENCE.clear()
        _REFERENCE[shape.name] = reference.max_pool2d(x.astype(np.float64), shape.kernel_size, **shape.kwargs())
    return _REFERENCE[shape.name]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: s.name)
def test_max_pool2d(bench, impl, shape, pass_):
    bench.require(impl, "max_pool2d" if pass_ == "fwd" else "max_pool2d_backward")
    arrays = bench.inputs(shape.name)
    x, g = (impl.asarray(a) for a in arrays)
    kw = shape.kwargs()
    if pass_ == "fwd":
        def fn():
            return impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)

        group = f"max_pool2d-fwd-{shape.name}"
        result = bench.run(impl, fn, group=group, nbytes=shape.bytes_moved("fwd"), shape=shape)
        y, idx = result
        want_y, want_indices = _reference(shape, arrays[0])
        bench.check_result(impl, y, group, lambda: want_y)
        np.testing.assert_array_equal(impl.to_numpy(idx), want_indices, err_msg=f"{impl.name}: {group} indices")
    else:
        _, idx = impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)  # outside the timing

        def fn():
            return impl.max_pool2d_backward(g, idx, shape.x, shape.kernel_size, **kw)

        group = f"max_pool2d-bwd-{shape.name}"
        result = bench.run(impl, fn, group=group, nbytes=shape.bytes_moved("bwd"), shape=shape)
        bench.check_result(impl, result, group, lambda: reference.max_pool2d_backward(
            arrays[1].astype(np.float64), _reference(shape, arrays[0])[1], shape.x, shape.kernel_size, **kw))
