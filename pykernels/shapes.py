"""The benchmark shape table of design.md ("Benchmark shapes"), defined once.

Used by ``benchmarks/``, by the tests and by the ``python -m pykernels bench`` CLI. The names are the
ones used in benchmarks, issues and the compass; change a shape here and in design.md together
(``tests/test_shapes_and_peers.py`` holds a hand-copied copy of the table to catch drift).

The table gives CPU batch sizes; on the GPU every shape runs with batch :data:`GPU_BATCH` (32), see
``shape.with_batch(GPU_BATCH)`` or ``shape.gpu()``.

Work metrics:

* conv: ``flops()`` = 2 * N * K * P * Q * (C / groups) * R * S, the same for forward, backward-data
  and backward-weight (each is one GEMM of that size; bias is not counted).
* relu: ``bytes_moved(pass_)``: forward reads x and writes y; backward reads grad_out and y and
  writes grad_x.
* max-pool: forward (with indices) reads x and writes y and the int64 indices; backward reads
  grad_out and the indices and writes grad_x (a gather writes every input cell once).

Only NumPy is imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np

__all__ = [
    "GPU_BATCH",
    "INDEX_ITEMSIZE",
    "ConvShape",
    "ReluShape",
    "PoolShape",
    "CONV_SHAPES",
    "RELU_SHAPES",
    "POOL_SHAPES",
    "ALL_SHAPES",
    "get_shape",
]

#: Batch size every benchmark shape uses on the GPU (the table's x is the CPU batch).
GPU_BATCH = 32
#: Bytes per max-pool index (int64 flat offsets, PyTorch's convention).
INDEX_ITEMSIZE = 8

Shape4 = Tuple[int, int, int, int]
IntPair = Union[int, Tuple[int, int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def _out_len(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Floor-mode sliding-window output length with symmetric padding."""
    span = dilation * (kernel - 1) + 1
    return (size + 2 * pad - span) // stride + 1


class _Batchable:
    """Shared helpers: batch changes and random inputs."""

    x: Shape4

    @property
    def batch(self) -> int:
        return self.x[0]

    def with_batch(self, n: int):
        """The same shape with batch size ``n``."""
        return dataclasses.replace(self, x=(int(n),) + tuple(self.x[1:]))

    def gpu(self):
        """The shape as run on the GPU (batch :data:`GPU_BATCH`)."""
        return self.with_batch(GPU_BATCH)


@dataclass(frozen=True)
class ConvShape(_Batchable):
    """One conv2d benchmark shape. ``x`` is (N, C, H, W), ``weight`` (K, C/groups, R, S)."""

    name: str
    x: Shape4
    weight: Shape4
    stride: IntPair = 1
    padding: IntPair = 0
    dilation: IntPair = 1
    groups: int = 1

    def __post_init__(self):
        n, c, h, w = self.x
        k, cg, r, s = self.weight
        if c % self.groups or k % self.groups or cg != c // self.groups:
            raise ValueError(f"{self.name}: x {self.x} and weight {self.weight} disagree for groups={self.groups}")
        p, q = self.out_hw
        if p <= 0 or q <= 0:
            raise ValueError(f"{self.name}: empty output {p}x{q}")

    @property
    def out_hw(self) -> Tuple[int, int]:
        (sh, sw), (ph, pw), (dh, dw) = _pair(self.stride), _pair(self.padding), _pair(self.dilation)
        _, _, h, w = self.x
        _, _, r, s = self.weight
        return _out_len(h, r, sh, ph, dh), _out_len(w, s, sw, pw, dw)

    @property
    def out(self) -> Shape4:
        """Output shape (N, K, P, Q)."""
        p, q = self.out_hw
        return (self.x[0], self.weight[0], p, q)

    @property
    def bias(self) -> Tuple[int]:
        return (self.weight[0],)

    def kwargs(self) -> dict:
        """Keyword arguments for ``pykernels.conv2d`` / ``conv2d_backward`` and the peers."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def flops(self) -> int:
        """2 * N * K * P * Q * (C / groups) * R * S: one pass (fwd, bwd-data or bwd-weight)."""
        n, k, p, q = self.out
        _, cg, r, s = self.weight
        return 2 * n * k * p * q * cg * r * s

    def bytes_moved(self, pass_: str = "fwd", dtype=np.float32) -> int:
        """Compulsory traffic (each tensor read or written once), for roofline estimates.

        fwd: x + weight -> y; bwd_data: grad_out + weight -> grad_x; bwd_weight: grad_out + x -> grad_w.
        """
        x, w, y = _numel(self.x), _numel(self.weight), _numel(self.out)
        elems = {"fwd": x + w + y, "bwd_data": y + w + x, "bwd_weight": y + x + w}[_check_pass(pass_, _CONV_PASSES)]
        return elems * _itemsize(dtype)

    def random_inputs(self, seed: int = 0, dtype=np.float32):
        """Seeded (x, weight, bias, grad_out), contiguous, of ``dtype``; weights scaled He-style."""
        rng = np.random.default_rng(seed)
        _, cg, r, s = self.weight
        x = rng.standard_normal(self.x, dtype=np.float64).astype(dtype)
        w = (rng.standard_normal(self.weight) * np.sqrt(2.0 / (cg * r * s))).astype(dtype)
        b = rng.standard_normal(self.bias).astype(dtype)
        g = rng.standard_normal(self.out).astype(dtype)
        return x, w, b, g


@dataclass(frozen=True)
class ReluShape(_Batchable):
    name: str
    x: Shape4

    @property
    def out(self) -> Shape4:
        return tuple(self.x)

    def numel(self) -> int:
        return _numel(self.x)

    def bytes_moved(self, pass_: str = "fwd", dtype=np.float32) -> int:
        """fwd: read x, write y (2 tensors); bwd: read grad_out and y, write grad_x (3 tensors)."""
        tensors = {"fwd": 2, "bwd": 3}[_check_pass(pass_, _ELEMENTWISE_PASSES)]
        return tensors * self.numel() * _itemsize(dtype)

    def random_inputs(self, seed: int = 0, dtype=np.float32):
        """Seeded (x, grad_out) of ``dtype``; about half of x is negative."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal(self.x).astype(dtype), rng.standard_normal(self.x).astype(dtype)


@dataclass(frozen=True)
class PoolShape(_Batchable):
    """A max-pool benchmark shape; ``stride`` None means ``kernel_size`` (as in the API)."""

    name: str
    x: Shape4
    kernel_size: IntPair
    stride: Union[IntPair, None] = None
    padding: IntPair = 0
    dilation: IntPair = 1
    ceil_mode: bool = False

    def __post_init__(self):
        p, q = self.out_hw
        if p <= 0 or q <= 0:
            raise ValueError(f"{self.name}: empty output {p}x{q}")

    @property
    def stride_hw(self) -> Tuple[int, int]:
        return _pair(self.kernel_size if self.stride is None else self.stride)

    @property
    def out_hw(self) -> Tuple[int, int]:
        (kh, kw), (sh, sw) = _pair(self.kernel_size), self.stride_hw
        (ph, pw), (dh, dw) = _pair(self.padding), _pair(self.dilation)
        _, _, h, w = self.x
        if self.ceil_mode:
            out = []
            for size, k, s, p, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw)):
                o = (size + 2 * p - d * (k - 1) - 1 + s - 1) // s + 1
                if (o - 1) * s >= size + p:  # last window would start in the end padding
                    o -= 1
                out.append(o)
            return out[0], out[1]
        return _out_len(h, kh, sh, ph, dh), _out_len(w, kw, sw, pw, dw)

    @property
    def out(self) -> Shape4:
        p, q = self.out_hw
        return (self.x[0], self.x[1], p, q)

    def kwargs(self) -> dict:
        """Arguments after ``kernel_size`` for ``max_pool2d`` / ``max_pool2d_backward`` and the peers."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, ceil_mode=self.ceil_mode)

    def bytes_moved(self, pass_: str = "fwd", dtype=np.float32) -> int:
        """fwd: read x, write y and int64 indices; bwd: read grad_out and indices, write grad_x."""
        isz = _itemsize(dtype)
        x, y = _numel(self.x), _numel(self.out)
        if _check_pass(pass_, _ELEMENTWISE_PASSES) == "fwd":
            return x * isz + y * isz + y * INDEX_ITEMSIZE
        return y * isz + y * INDEX_ITEMSIZE + x * isz

    def random_inputs(self, seed: int = 0, dtype=np.float32):
        """Seeded (x, grad_out) of ``dtype`` (continuous values, so no ties)."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal(self.x).astype(dtype), rng.standard_normal(self.out).astype(dtype)


_CONV_PASSES = ("fwd", "bwd_data", "bwd_weight")
_ELEMENTWISE_PASSES = ("fwd", "bwd")


def _check_pass(pass_: str, allowed) -> str:
    p = pass_.replace("-", "_")
    if p not in allowed:
        raise ValueError(f"pass must be one of {allowed}, got {pass_!r}")
    return p


#: design.md "Benchmark shapes": conv2d (float32, NCHW, CPU batch).
CONV_SHAPES: Tuple[ConvShape, ...] = (
    ConvShape("lenet_5x5", (64, 1, 28, 28), (6, 1, 5, 5), stride=1, padding=0),
    ConvShape("vgg_3x3_64", (8, 64, 56, 56), (64, 64, 3, 3), stride=1, padding=1),
    ConvShape("resnet_stem", (8, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3),
    ConvShape("resnet_3x3_128", (8, 128, 28, 28), (128, 128, 3, 3), stride=1, padding=1),
    ConvShape("resnet_3x3_256", (8, 256, 14, 14), (256, 256, 3, 3), stride=1, padding=1),
    ConvShape("resnet_3x3_512", (8, 512, 7, 7), (512, 512, 3, 3), stride=1, padding=1),
    ConvShape("resnet_1x1_256_64", (8, 256, 56, 56), (64, 256, 1, 1), stride=1, padding=0),
)

#: design.md: ReLU shapes.
RELU_SHAPES: Tuple[ReluShape, ...] = (ReluShape("relu_vgg", (8, 64, 56, 56)),)

#: design.md: max-pool shapes (2x2/2, and 3x3/2 pad 1).
POOL_SHAPES: Tuple[PoolShape, ...] = (
    PoolShape("pool2x2_vgg", (8, 64, 56, 56), kernel_size=2, stride=2, padding=0),
    PoolShape("pool3x3s2_stem", (8, 64, 112, 112), kernel_size=3, stride=2, padding=1),
)

ALL_SHAPES = CONV_SHAPES + RELU_SHAPES + POOL_SHAPES

#: Beyond design.md's table: conv2d layers whose paths the table does not reach (depthwise layers with the
#: channels across the vector lanes, from MobileNet's 56x56 to its last 7x7 stage; grouped layers summed
#: directly, a 5x5 layer whose backward-data runs as the transposed convolution, a CIFAR ResNet's stride-2
#: layer onto 8x8 whose forward runs channels-last, a 2-dilated 3x3 layer run over x's dilation phases).
#: Timed by benchmarks/test_bench_conv2d.py (test_conv2d_beyond_the_table), and by ``bench --shape NAME``
#: when named.
MORE_CONV_SHAPES: Tuple[ConvShape, ...] = (
    ConvShape("depthwise_3x3_128", (8, 128, 56, 56), (128, 1, 3, 3), stride=1, padding=1, groups=128),
    ConvShape("depthwise_3x3_s2_128", (8, 128, 56, 56), (128, 1, 3, 3), stride=2, padding=1, groups=128),
    ConvShape("depthwise_3x3_960_7", (8, 960, 7, 7), (960, 1, 3, 3), stride=1, padding=1, groups=960),
    ConvShape("resnext_3x3_256_g32", (8, 256, 28, 28), (256, 8, 3, 3), stride=1, padding=1, groups=32),
    ConvShape("conv_5x5_64", (8, 64, 28, 28), (64, 64, 5, 5), stride=1, padding=2),
    ConvShape("cifar_3x3_s2_64", (64, 32, 16, 16), (64, 32, 3, 3), stride=2, padding=1),
    ConvShape("dilated_3x3_64", (8, 64, 56, 56), (64, 64, 3, 3), stride=1, padding=2, dilation=2),
)


def get_shape(name: str):
    """The shape called ``name`` (any table, or MORE_CONV_SHAPES); KeyError listing the names otherwise."""
    for s in ALL_SHAPES + MORE_CONV_SHAPES:
        if s.name == name:
            return s
    known = ", ".join(s.name for s in ALL_SHAPES + MORE_CONV_SHAPES)
    raise KeyError(f"no benchmark shape {name!r}; known: {known}")
