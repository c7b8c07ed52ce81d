"""The functional API: conv2d, relu, max_pool2d and their backward passes.

Each function validates its arguments (_args), picks the backend from the arrays (_backend), makes
inputs contiguous, allocates the result with the input's array type, and runs one extension call; plain
NumPy calls whose shapes and window arguments an earlier call has vetted go the short way first (_fast).
Layout NCHW, weights (K, C/groups, R, S), cross-correlation (no kernel flip).
"""

from __future__ import annotations

import numpy as np

from . import _args, _backend, _fast


_NUMPY_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_ndarray = np.ndarray
_INT64 = np.dtype(np.int64)
_OPTIONAL_ARRAYS = ("bias",)  # the array arguments that may be None


def _kind_and_dtype(*named):
    """(kind, dtype) shared by (name, array) pairs; TypeError otherwise."""
    # The common case first, in few steps (small layers are dominated by the per-call Python): NumPy
    # arrays of one float dtype. Anything else, including every error, takes the checks below.
    dtype = None
    for name, a in named:
        if a is None and name in _OPTIONAL_ARRAYS:
            continue
        if type(a) is not np.ndarray or (dtype is not None and a.dtype != dtype):
            break
        dtype = a.dtype
    else:
        if dtype in _NUMPY_FLOATS:
            return "numpy", dtype
    for name, a in named:
        if a is None and name not in _OPTIONAL_ARRAYS:
            raise TypeError(f"{name} must be a NumPy or CuPy array, got None")
    kind = _backend.array_kind(*named)
    return kind, _backend.common_dtype(kind, *named)


def _contiguous(*arrays):
    # Called after the shape checks: a huge broadcast view must get a ValueError, not a copy attempt.
    return [_backend.contiguous(a) for a in arrays]


def _check_shape(a, name: str, shape) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


# ---- conv2d --------------------------------------------------------------------------------------------

def _conv_plan(x, weight, stride, padding, dilation, groups):
    """_fast's plan for a conv2d layer (forward and backward share it: its kernel arguments)."""
    return _fast.plan("conv", (x.shape, weight.shape), (stride, padding, dilation, groups))


def _remember_conv(geo, stride, padding, dilation, groups):
    _fast.remember("conv", (geo.x_shape, geo.weight_shape), (stride, padding, dilation, groups), geo.out_shape,
                   geo.kernel_args())


def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, out=None):
    """2-D cross-correlation of x (N, C, H, W) with weight (K, C/groups, R, S), plus bias (K,).

    stride, dilation: int or (h, w). padding: int, (ph, pw), ((top, bottom), (left, right)), 'valid'
    or 'same' (TensorFlow's rule: output = ceil(input / stride), odd total padding puts the extra
    row/column at the bottom/right). Returns y (N, K, P, Q), written into `out` when given.
    """
    if out is None and type(x) is _ndarray and type(weight) is _ndarray and (bias is None or type(bias) is _ndarray):
        plan = _conv_plan(x, weight, stride, padding, dilation, groups)
        if plan is not None:
            y = _backend.numpy_result(plan.out_shape, plan.out_count, x.dtype)
            try:
                _fast.cpu.conv2d_forward(x, weight, bias, y, *plan.kernel_args)
                return y
            except _fast.REFUSED:
                pass  # the checks below say why, or copy a non-contiguous input
    kind, dtype = _kind_and_dtype(("x", x), ("weight", weight), ("bias", bias))
    geo = _args.conv2d_geometry(x.shape, weight.shape, stride=stride, padding=padding, dilation=dilation,
                                groups=groups)
    if bias is not None and tuple(bias.shape) != (geo.weight_shape[0],):
        raise ValueError(f"bias must have shape ({geo.weight_shape[0]},) (weight's output channels), "
                         f"got {tuple(bias.shape)}")
    y = _backend.output(out, "out", kind, geo.out_shape, dtype)
    x, weight, bias = _contiguous(x, weight, bias)
    _backend.run(kind, "conv2d_forward", x, weight, bias, y, *geo.kernel_args())
    if kind == "numpy":
        _remember_conv(geo, stride, padding, dilation, groups)
    return y


def conv2d_backward(grad_out, x, weight, *, stride=1, padding=0, dilation=1, groups=1,
                    need_input=True, need_weight=True, need_bias=True):
    """Gradients of conv2d: (grad_x, grad_weight, grad_bias); one not asked for is None.

    grad_bias is grad_out summed over N, H and W. Deterministic: the same inputs give the same bits.
    """
    if (type(grad_out) is _ndarray and type(x) is _ndarray and type(weight) is _ndarray
            and type(need_input) is type(need_weight) is type(need_bias) is bool):
        plan = _conv_plan(x, weight, stride, padding, dilation, groups)
        dtype = grad_out.dtype
        # Each extension call sees only the arrays its pass reads: x's dtype (grad_x alone), weight's (grad_w
        # alone), grad_out's shape (grad_b alone) and, with no pass asked for, grad_out's dtype are checked here.
        if (plan is not None and grad_out.shape == plan.out_shape and x.dtype == dtype and weight.dtype == dtype
                and dtype in _NUMPY_FLOATS):
            cpu = _fast.cpu
            try:
                grad_x = grad_w = grad_b = None
                if need_input:
                    grad_x = _backend.numpy_result(x.shape, x.size, dtype)
                    cpu.conv2d_backward_input(grad_out, weight, grad_x, *plan.kernel_args)
                if need_weight:
                    grad_w = _backend.numpy_result(weight.shape, weight.size, dtype)
                    cpu.conv2d_backward_weight(grad_out, x, grad_w, *plan.kernel_args)
                if need_bias:
                    grad_b = _backend.numpy_result((weight.shape[0],), weight.shape[0], dtype)
                    cpu.conv2d_backward_bias(grad_out, grad_b)
                return grad_x, grad_w, grad_b
            except _fast.REFUSED:
                pass  # the checks below say why, or copy a non-contiguous input
    kind, dtype = _kind_and_dtype(("grad_out", grad_out), ("x", x), ("weight", weight))
    need_input = _args.flag(need_input, "need_input")
    need_weight = _args.flag(need_weight, "need_weight")
    need_bias = _args.flag(need_bias, "need_bias")
    geo = _args.conv2d_geometry(x.shape, weight.shape, stride=stride, padding=padding, dilation=dilation,
                                groups=groups)
    _check_shape(grad_out, "grad_out", geo.out_shape)
    grad_out, x, weight = _contiguous(grad_out, x, weight)
    grad_x = grad_w = grad_b = None
    if need_input:
        grad_x = _backend.output(None, "grad_x", kind, geo.x_shape, dtype)
        _backend.run(kind, "conv2d_backward_input", grad_out, weight, grad_x, *geo.kernel_args())
    if need_weight:
        grad_w = _backend.output(None, "grad_weight", kind, geo.weight_shape, dtype)
        _backend.run(kind, "conv2d_backward_weight", grad_out, x, grad_w, *geo.kernel_args())
    if need_bias:
        grad_b = _backend.output(None, "grad_bias", kind, (geo.weight_shape[0],), dtype)
        _backend.run(kind, "conv2d_backward_bias", grad_out, grad_b)
    if kind == "numpy":
        _remember_conv(geo, stride, padding, dilation, groups)
    return grad_x, grad_w, grad_b


# ---- relu ----------------------------------------------------------------------------------------------

def relu(x, *, out=None):
    """max(x, 0) elementwise; relu(NaN) is NaN. `out` may be x itself (in place)."""
    # A dtype the kernels take only, and MemoryError goes to the checks below as well: a huge broadcast view
    # of int32 got MemoryError from the result's allocation instead of the checks' TypeError.
    if out is None and type(x) is _ndarray and _fast.cpu is not None and x.dtype in _NUMPY_FLOATS:
        try:
            y = _backend.numpy_result(x.shape, x.size, x.dtype)
            _fast.cpu.relu_forward(x, y)
            return y
        except (*_fast.REFUSED, MemoryError):
            pass  # the checks below say why (or raise MemoryError again), or copy a non-contiguous input
    kind, dtype = _kind_and_dtype(("x", x))
    _args.check_elements(x.shape, "x")
    y = _backend.output(out, "out", kind, x.shape, dtype)
    (x,) = _contiguous(x)
    _backend.run(kind, "relu_forward", x, y)
    return y


def relu_backward(grad_out, y):
    """grad_out where y > 0, else 0 (so 0 at y == 0). y may be relu's input or its output."""
    if type(grad_out) is _ndarray and type(y) is _ndarray and _fast.cpu is not None and grad_out.dtype in _NUMPY_FLOATS:
        try:  # see relu
            grad_x = _backend.numpy_result(grad_out.shape, grad_out.size, grad_out.dtype)
            _fast.cpu.relu_backward(grad_out, y, grad_x)
            return grad_x
        except (*_fast.REFUSED, MemoryError):
            pass  # the checks below say why (or raise MemoryError again), or copy a non-contiguous input
    kind, dtype = _kind_and_dtype(("grad_out", grad_out), ("y", y))
    _args.check_elements(grad_out.shape, "grad_out")
    _check_shape(y, "y", grad_out.shape)
    grad_out, y = _contiguous(grad_out, y)
    grad_x = _backend.output(None, "grad_x", kind, grad_out.shape, dtype)
    _backend.run(kind, "relu_backward", grad_out, y, grad_x)
    return grad_x


# ---- max_pool2d ----------------------------------------------------------------------------------------

def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, *, ceil_mode=False, return_indices=False):
    """Max over each window of x (N, C, H, W); returns y, or (y, indices) with return_indices.

    stride defaults to kernel_size. padding takes every form conv2d takes; padded cells act as -inf
    and may be larger than PyTorch allows, as long as every window overlaps the input. ceil_mode
    rounds the output size up but drops a last window that would start in the end padding.
    indices are int64 flat offsets into each H*W plane; ties go to the first maximum in row-major
    window order; NaN propagates with the index of the first NaN.
    """
    if type(x) is _ndarray and type(ceil_mode) is bool and type(return_indices) is bool:
        plan = _fast.plan("pool", (x.shape, ceil_mode), (kernel_size, stride, padding, dilation))
        if plan is not None:
            y = _backend.numpy_result(plan.out_shape, plan.out_count, x.dtype)
            indices = _backend.numpy_result(plan.out_shape, plan.out_count, _INT64) if return_indices else None
            try:
                _fast.cpu.max_pool2d_forward(x, y, indices, *plan.kernel_args)
                return (y, indices) if return_indices else y
            except _fast.REFUSED:
                pass  # the checks below say why, or copy a non-contiguous input
    kind, dtype = _kind_and_dtype(("x", x))
    return_indices = _args.flag(return_indices, "return_indices")
    geo = _args.pool2d_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    (x,) = _contiguous(x)
    y = _backend.output(None, "out", kind, geo.out_shape, dtype)
    indices = _backend.output(None, "indices", kind, geo.out_shape, np.int64) if return_indices else None
    _backend.run(kind, "max_pool2d_forward", x, y, indices, *geo.kernel_args())
    if kind == "numpy" and type(ceil_mode) is bool:
        _fast.remember("pool", (geo.x_shape, ceil_mode), (kernel_size, stride, padding, dilation), geo.out_shape,
                       geo.kernel_args())
    return (y, indices) if return_indices else y


def max_pool2d_backward(grad_out, indices, input_shape, kernel_size, stride=None, padding=0, dilation=1, *,
                        ceil_mode=False):
    """Gradient of max_pool2d w.r.t. its input of shape input_shape, from the indices it returned.

    Sums in a fixed order (no atomics): deterministic, bit for bit. Each index must name a cell of its own
    window (ValueError otherwise).
    """
    if type(grad_out) is _ndarray and type(indices) is _ndarray and type(ceil_mode) is bool:
        plan = _fast.plan("pool_backward", (ceil_mode,), (input_shape, kernel_size, stride, padding, dilation))
        if plan is not None:
            grad_x = _backend.numpy_result(plan.out_shape, plan.out_count, grad_out.dtype)
            try:
                _fast.cpu.max_pool2d_backward(grad_out, indices, grad_x, *plan.kernel_args)
                return grad_x
            except _fast.REFUSED:
                pass  # the checks below say why (an index outside its window among them)
    kind, dtype = _kind_and_dtype(("grad_out", grad_out))
    if indices is None:
        raise TypeError("indices must be a NumPy or CuPy array (as max_pool2d returns them), got None")
    if _backend.array_kind(("indices", indices)) != kind:
        raise TypeError("indices must be the same kind of array (NumPy or CuPy) as grad_out")
    if np.dtype(indices.dtype) != np.int64:
        raise TypeError(f"indices must have dtype int64 (as max_pool2d returns them), got {indices.dtype}")
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__"):
        raise TypeError(f"input_shape must be a tuple (N, C, H, W), got {input_shape!r}")
    geo = _args.pool2d_geometry(tuple(input_shape), kernel_size, stride, padding, dilation, ceil_mode,
                                x_name="input_shape")
    _check_shape(grad_out, "grad_out", geo.out_shape)
    _check_shape(indices, "indices", geo.out_shape)
    grad_out, indices = _contiguous(grad_out, indices)
    grad_x = _backend.output(None, "grad_x", kind, geo.x_shape, dtype)
    _backend.run(kind, "max_pool2d_backward", grad_out, indices, grad_x, *geo.kernel_args())
    if kind == "numpy" and type(ceil_mode) is bool:
        _fast.remember("pool_backward", (ceil_mode,), (input_shape, kernel_size, stride, padding, dilation),
                       geo.x_shape, geo.kernel_args())
    return grad_x
