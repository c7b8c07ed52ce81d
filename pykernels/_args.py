"""Normalise and validate the arguments of every op, compute output shapes, build the error messages.

One place for all of it, so NumPy and CuPy arrays (and every op) get the same rules and the same
words. Only shapes and Python scalars live here: nothing in this file touches array data.
The C++ side re-checks the invariants it relies on (csrc/common/shapes.hpp); this file exists so the
user sees a message in terms of the arguments they passed.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import numpy as np

# Parameters are bounded so that every product the kernels form stays far from int64 overflow;
# tensors likewise (2^56 elements leaves room for byte offsets).
MAX_PARAMETER = 2**31 - 1
MAX_ELEMENTS = 2**56

Pair = tuple[int, int]
Padding4 = tuple[int, int, int, int]  # (top, bottom, left, right)


def _int(value, name: str) -> int:
    # bool is an int subclass, but stride=True is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if abs(value) > MAX_PARAMETER:
        raise ValueError(f"{name} = {value} is out of range (at most {MAX_PARAMETER})")
    return value


def flag(value, name: str) -> bool:
    """A yes/no argument: a bool, a NumPy bool or the int 0 or 1 (a string such as 'no' would read as true)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def pair(value, name: str, *, minimum: int = 1) -> Pair:
    """int or (h, w) -> (h, w), each >= minimum."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        h, w = (_int(v, name) for v in value)
    else:
        h = w = _int(value, name)
    if h < minimum or w < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return h, w


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'SAME': output = ceil(size / stride); an odd total puts the extra cell at the end."""
    span = dilation * (kernel - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _padding_forms(name: str, padding) -> str:
    return f"{name} must be an int, a pair, ((top, bottom), (left, right)), 'same' or 'valid'; got {padding!r}"


def padding4(padding, name: str, in_hw: Pair, kernel_hw: Pair, stride: Pair, dilation: Pair) -> Padding4:
    """Every padding form -> (top, bottom, left, right).

    int | (ph, pw) | ((top, bottom), (left, right)) | 'valid' | 'same' (TensorFlow's rule).
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0, 0, 0
        if mode == "same":
            top, bottom = same_padding(in_hw[0], kernel_hw[0], stride[0], dilation[0])
            left, right = same_padding(in_hw[1], kernel_hw[1], stride[1], dilation[1])
            return top, bottom, left, right
        raise ValueError(_padding_forms(name, padding))
    if isinstance(padding, (tuple, list)):
        if len(padding) != 2:
            raise ValueError(_padding_forms(name, padding))
        if all(isinstance(p, (tuple, list)) for p in padding):
            (top, bottom), (left, right) = (pair(p, name, minimum=0) for p in padding)
        else:
            (top, left) = pair(tuple(padding), name, minimum=0)
            bottom, right = top, left
    else:
        top = left = pair(padding, name, minimum=0)[0]
        bottom, right = top, left
    return top, bottom, left, right


def check_shape(shape, name: str, what: str = "(N, C, H, W)") -> tuple[int, ...]:
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape):
        raise TypeError(f"{name} must be a shape of ints {what}, got {tuple(shape)!r}")
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-D {what}, got shape {shape}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"{name} shape {shape} has too many elements (more than 2^56)")
    return shape


def _check_spatial_input(shape, name: str) -> None:
    n, c, h, w = shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"{name} must have at least one channel, row and column, got shape {shape}")


def _window_output(size: int, pad_begin: int, pad_end: int, kernel: int, stride: int, dilation: int,
                   ceil_mode: bool = False) -> int:
    """Output length along one axis; <= 0 when the window does not fit (PyTorch's ceil_mode rule)."""
    span = dilation * (kernel - 1) + 1
    padded = size + pad_begin + pad_end
    # Floor division: <= 0 where the window is longer than the padded input, except with ceil_mode, whose
    # windows may run up to stride - 1 cells past the end from the first one on (PyTorch's rule too)
    out = (padded - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # the last window would start inside the end padding
    return out


def check_elements(shape, name: str = "output") -> tuple[int, ...]:
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"the {name} shape {tuple(shape)} has too many elements (more than 2^56)")
    return tuple(shape)


class ConvGeometry(NamedTuple):
    x_shape: tuple[int, int, int, int]
    weight_shape: tuple[int, int, int, int]
    out_shape: tuple[int, int, int, int]
    stride: Pair
    padding: Padding4
    dilation: Pair
    groups: int

    def kernel_args(self):
        """The trailing arguments of every _pykernels_* conv entry point."""
        return self.stride, self.padding, self.dilation, self.groups


def _conv2d_geometry(x_shape, weight_shape, stride, padding, dilation, groups, x_name: str) -> ConvGeometry:
    x_shape = check_shape(x_shape, x_name)
    weight_shape = check_shape(weight_shape, "weight", "(K, C/groups, R, S)")
    groups = _int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    stride = pair(stride, "stride")
    dilation = pair(dilation, "dilation")
    n, c, h, w = x_shape
    k, c_per_group, r, s = weight_shape
    _check_spatial_input(x_shape, x_name)
    if r < 1 or s < 1 or k < 1:
        raise ValueError(f"weight must have at least one output channel, row and column, got shape {weight_shape}")
    if c % groups or k % groups:
        raise ValueError(
            f"groups = {groups} must divide the input channels of {x_name} {x_shape} ({c}) and the output "
            f"channels of weight {weight_shape} ({k})")
    if c_per_group * groups != c:
        raise ValueError(
            f"weight {weight_shape} expects {c_per_group * groups} input channels (C/groups = {c_per_group}, "
            f"groups = {groups}), but {x_name} {x_shape} has {c}")
    pad = padding4(padding, "padding", (h, w), (r, s), stride, dilation)
    p = _window_output(h, pad[0], pad[1], r, stride[0], dilation[0])
    q = _window_output(w, pad[2], pad[3], s, stride[1], dilation[1])
    if p < 1 or q < 1:
        raise ValueError(
            f"weight: kernel {r}x{s} with dilation {dilation} spans "
            f"{dilation[0] * (r - 1) + 1}x{dilation[1] * (s - 1) + 1}, larger than the padded input "
            f"{h + pad[0] + pad[1]}x{w + pad[2] + pad[3]} of {x_name} {x_shape} (padding {pad})")
    out_shape = check_elements((n, k, p, q))
    # The kernels' im2col workspace for one image: (C/groups * R * S) x (P * Q).
    check_elements((c_per_group * r * s, p * q), "im2col workspace")
    return ConvGeometry(x_shape, weight_shape, out_shape, stride, pad, dilation, groups)


class PoolGeometry(NamedTuple):
    x_shape: tuple[int, int, int, int]
    out_shape: tuple[int, int, int, int]
    kernel_size: Pair
    stride: Pair
    padding: Padding4
    dilation: Pair
    ceil_mode: bool

    def kernel_args(self):
        """The trailing arguments of every _pykernels_* max_pool2d entry point."""
        return self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode


def _first_overlapping_window_failure(size, pad_begin, kernel, stride, dilation, count):
    """Index of the first window none of whose taps lands in [0, size), or None.

    Windows starting inside the input always see it; one starting past the end never does. One
    starting in the begin padding reaches the input unless its taps stop short (worst for window 0)
    or, when dilation > size, jump over it (then check those few windows one by one).
    """
    def misses(o):
        start = o * stride - pad_begin
        j = 0 if start >= 0 else -(start // dilation)  # first tap at or after 0: ceil(-start / dilation)
        return not (j < kernel and start + j * dilation < size)

    if misses(0):
        return 0
    first_past_end = -(-(size + pad_begin) // stride)  # first o with start >= size
    if dilation > size:
        for o in range(1, min(count, -(-pad_begin // stride))):
            if misses(o):
                return o
    return first_past_end if first_past_end < count else None


def _pool2d_geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode, x_name: str) -> PoolGeometry:
    x_shape = check_shape(x_shape, x_name)
    kernel = pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else pair(stride, "stride")
    dilation = pair(dilation, "dilation")
    ceil_mode = flag(ceil_mode, "ceil_mode")
    n, c, h, w = x_shape
    _check_spatial_input(x_shape, x_name)
    pad = padding4(padding, "padding", (h, w), kernel, stride, dilation)
    p = _window_output(h, pad[0], pad[1], kernel[0], stride[0], dilation[0], ceil_mode)
    q = _window_output(w, pad[2], pad[3], kernel[1], stride[1], dilation[1], ceil_mode)
    if p < 1 or q < 1:
        raise ValueError(
            f"kernel_size {kernel} with dilation {dilation} is larger than the padded input "
            f"{h + pad[0] + pad[1]}x{w + pad[2] + pad[3]} of {x_name} {x_shape} (padding {pad})")
    for axis, size, begin, end, k, s, d, count in (("H", h, pad[0], pad[1], kernel[0], stride[0], dilation[0], p),
                                                   ("W", w, pad[2], pad[3], kernel[1], stride[1], dilation[1], q)):
        bad = _first_overlapping_window_failure(size, begin, k, s, d, count)
        if bad is not None:
            raise ValueError(
                f"padding ({begin}, {end}) along {axis} is so large that pooling window {bad} lies wholly in the "
                f"padding ({x_name} {x_shape}, kernel_size {kernel}, stride {stride}, dilation {dilation})")
    out_shape = check_elements((n, c, p, q))
    return PoolGeometry(x_shape, out_shape, kernel, stride, pad, dilation, ceil_mode)


# ---- the geometry of every call, remembered ----------------------------------------------------------------
# Working out a geometry costs about 4 us of Python, as much as a small layer's whole kernel, and a network
# asks for the same few again and again. Only arguments made of exact ints, strs, None and tuples of them
# (and a bool ceil_mode) are remembered: those compare equal only when they mean the same thing, where
# True == 1 and 2.0 == 2 would let stride=True or stride=2.0 find the entry of a valid call instead of
# raising. Anything else takes the uncached path, and errors are never remembered. (_fast.py remembers
# whole calls on the same rule.)

def plain_arguments(value) -> bool:
    """Whether `value` is an exact int, str or None, or a tuple of such values and tuples."""
    kind = type(value)
    if kind is int or kind is str or value is None:
        return True
    if kind is not tuple:
        return False
    for v in value:  # a loop, not all() over a generator: this runs on every call (about 1 us saved)
        kind = type(v)
        if not (kind is int or kind is str or v is None or (kind is tuple and plain_arguments(v))):
            return False
    return True


_cached_conv2d_geometry = functools.lru_cache(maxsize=512)(_conv2d_geometry)
_cached_pool2d_geometry = functools.lru_cache(maxsize=512)(_pool2d_geometry)


def conv2d_geometry(x_shape, weight_shape, *, stride, padding, dilation, groups, x_name: str = "x") -> ConvGeometry:
    args = (x_shape, weight_shape, stride, padding, dilation, groups, x_name)
    if plain_arguments(args):
        return _cached_conv2d_geometry(*args)
    return _conv2d_geometry(*args)


def pool2d_geometry(x_shape, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    x_name: str = "x") -> PoolGeometry:
    args = (x_shape, kernel_size, stride, padding, dilation, ceil_mode, x_name)
    if plain_arguments(args[:5]) and type(ceil_mode) is bool and type(x_name) is str:
        return _cached_pool2d_geometry(*args)
    return _pool2d_geometry(*args)
