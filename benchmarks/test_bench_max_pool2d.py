"""max_pool2d forward (with indices) and backward on design.md's pooling shapes."""

import pytest

from pykernels.shapes import POOL_SHAPES

IMPLS = ["pykernels", "torch"]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: s.name)
def test_max_pool2d(bench, impl, shape, pass_):
    bench.require(impl, "max_pool2d" if pass_ == "fwd" else "max_pool2d_backward")
    x, g = (impl.asarray(a) for a in bench.inputs(shape.name))
    kw = shape.kwargs()
    if pass_ == "fwd":
        def fn():
            return impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)

        result = bench.run(impl, fn, group=f"max_pool2d-fwd-{shape.name}", nbytes=shape.bytes_moved("fwd"),
                           shape=shape)
        y, idx = result
        bench.check_shape(impl, y, shape.out)
        bench.check_shape(impl, idx, shape.out)
    else:
        _, idx = impl.max_pool2d(x, shape.kernel_size, **kw, return_indices=True)  # outside the timing

        def fn():
            return impl.max_pool2d_backward(g, idx, shape.x, shape.kernel_size, **kw)

        result = bench.run(impl, fn, group=f"max_pool2d-bwd-{shape.name}", nbytes=shape.bytes_moved("bwd"),
                           shape=shape)
        bench.check_shape(impl, result, shape.x)
