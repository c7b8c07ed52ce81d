"""Peer implementations that benchmarks and tests compare pykernels against.

Every peer has the pykernels call signatures (design.md, "API conventions") for the ops it supports,
so a benchmark can call ``impl.conv2d(...)`` whatever ``impl`` is:

* ``"numpy_im2col"``: conv2d forward / backward-data / backward-weight as im2col + one GEMM
  (``np.matmul``) per group, in the input's dtype. The "NumPy im2col" peer of anchors.md.
* ``"numpy"``: ReLU forward / backward with plain NumPy ufuncs (``np.maximum``, ``np.where``).
* ``"torch"``: thin wrappers over PyTorch CPU ops (``F.conv2d``, ``aten.convolution_backward``,
  ``torch.relu``, ``aten.threshold_backward``, ``aten.max_pool2d_with_indices`` and its backward).
  Only present when torch imports.

Convert inputs with ``peer.asarray(a)`` once, outside any timed region (for torch this is a
zero-copy ``torch.from_numpy`` of a contiguous array), and results back with ``peer.to_numpy(r)``.
torch is imported lazily: this module imports fine without it.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

__all__ = [
    "available_peers",
    "get_peer",
    "torch_available",
    "im2col_conv2d",
    "im2col_conv2d_backward",
    "NumpyIm2colPeer",
    "NumpyPeer",
    "TorchPeer",
]

CONV_OPS = frozenset({"conv2d", "conv2d_backward"})
RELU_OPS = frozenset({"relu", "relu_backward"})
POOL_OPS = frozenset({"max_pool2d", "max_pool2d_backward"})


# ----------------------------------------------------------------------------------------------
# argument normalisation (kept local: peers must not depend on the code they are compared with)


def _pair(v, what: str) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _padding4(padding, in_hw, kernel_hw, stride_hw, dilation_hw) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) from int / (ph, pw) / ((t, b), (l, r)) / 'valid' / 'same' (TF)."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            raise ValueError(f"padding string must be 'valid' or 'same', got {padding!r}")
        out = []
        for size, k, s, d in zip(in_hw, kernel_hw, stride_hw, dilation_hw):
            o = -(-size // s)
            total = max((o - 1) * s + d * (k - 1) + 1 - size, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and isinstance(padding[0], (tuple, list)):
        (t, b), (l, r) = padding
        return int(t), int(b), int(l), int(r)
    ph, pw = _pair(padding, "padding")
    return ph, ph, pw, pw


class _ConvGeom:
    """Everything im2col needs about one conv2d call."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = (int(d) for d in x_shape)
        self.K, self.Cg, self.R, self.S = (int(d) for d in w_shape)
        self.G = int(groups)
        if self.G < 1 or self.C % self.G or self.K % self.G or self.Cg != self.C // self.G:
            raise ValueError(f"x {tuple(x_shape)} and weight {tuple(w_shape)} disagree for groups={groups}")
        self.sh, self.sw = _pair(stride, "stride")
        self.dh, self.dw = _pair(dilation, "dilation")
        self.pt, self.pb, self.pl, self.pr = _padding4(
            padding, (self.H, self.W), (self.R, self.S), (self.sh, self.sw), (self.dh, self.dw))
        self.Hp, self.Wp = self.H + self.pt + self.pb, self.W + self.pl + self.pr
        self.span_h, self.span_w = self.dh * (self.R - 1) + 1, self.dw * (self.S - 1) + 1
        self.P = (self.Hp - self.span_h) // self.sh + 1
        self.Q = (self.Wp - self.span_w) // self.sw + 1
        if self.P <= 0 or self.Q <= 0:
            raise ValueError("the (dilated) kernel is larger than the padded input")
        self.Kg = self.K // self.G
        self.padded = bool(self.pt or self.pb or self.pl or self.pr)
        # 1x1, stride 1, no padding: the patch matrix is x itself
        self.pointwise = self.R == self.S == 1 and self.sh == self.sw == 1 and not self.padded

    @property
    def out_shape(self):
        return (self.N, self.K, self.P, self.Q)


#: Per-image GEMMs once an image has this many output pixels (each GEMM is wide enough, and the
#: result is already NCHW); below it one GEMM over the whole batch pays better (measured on the
#: 2-core CPU machine with the design.md shapes; both layouts are tested).
_PER_IMAGE_MIN_PQ = 512


def _per_image(g: _ConvGeom) -> bool:
    return g.pointwise or g.P * g.Q >= _PER_IMAGE_MIN_PQ


def _im2col(x: np.ndarray, g: _ConvGeom, per_image: bool) -> np.ndarray:
    """The patch matrix: (N, G, Cg*R*S, P*Q) when ``per_image``, else (G, Cg*R*S, N*P*Q).

    One copy of the strided window view of the padded x; none for an unpadded 1x1 stride-1 conv.
    """
    if g.pointwise and per_image:
        return x.reshape(g.N, g.G, g.Cg, g.P * g.Q)
    if g.padded:
        x = np.pad(x, ((0, 0), (0, 0), (g.pt, g.pb), (g.pl, g.pr)))
    # (N, C, Hp - span_h + 1, Wp - span_w + 1, span_h, span_w) -> stride and dilation by slicing
    v = np.lib.stride_tricks.sliding_window_view(x, (g.span_h, g.span_w), axis=(2, 3))
    v = v[:, :, :: g.sh, :: g.sw, :: g.dh, :: g.dw][:, :, : g.P, : g.Q]  # (N, C, P, Q, R, S)
    if per_image:
        v = np.ascontiguousarray(v.transpose(0, 1, 4, 5, 2, 3))  # (N, C, R, S, P, Q)
        return v.reshape(g.N, g.G, g.Cg * g.R * g.S, g.P * g.Q)
    v = np.ascontiguousarray(v.transpose(1, 4, 5, 0, 2, 3))  # (C, R, S, N, P, Q)
    return v.reshape(g.G, g.Cg * g.R * g.S, g.N * g.P * g.Q)


def _col2im(dcols: np.ndarray, g: _ConvGeom, per_image: bool) -> np.ndarray:
    """Adjoint of _im2col: scatter-add the patch-matrix gradient into a contiguous (N, C, H, W)."""
    if per_image:
        d = dcols.reshape(g.N, g.C, g.R, g.S, g.P, g.Q)
    else:
        d = dcols.reshape(g.C, g.R, g.S, g.N, g.P, g.Q).transpose(3, 0, 1, 2, 4, 5)  # a view
    if g.pointwise:
        return np.ascontiguousarray(d.reshape(g.N, g.C, g.H, g.W))
    xp = np.zeros((g.N, g.C, g.Hp, g.Wp), dtype=dcols.dtype)
    for r in range(g.R):
        h0 = r * g.dh
        hs = slice(h0, h0 + g.sh * (g.P - 1) + 1, g.sh)
        for s in range(g.S):
            w0 = s * g.dw
            xp[:, :, hs, w0 : w0 + g.sw * (g.Q - 1) + 1 : g.sw] += d[:, :, r, s]
    if g.padded:
        xp = np.ascontiguousarray(xp[:, :, g.pt : g.pt + g.H, g.pl : g.pl + g.W])
    return xp


def _check_float(*arrays):
    for a in arrays:
        if a is not None and a.dtype not in (np.float32, np.float64):
            raise TypeError(f"expected float32 or float64, got {a.dtype}")


def im2col_conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, out=None):
    """conv2d forward: y = W[G, Kg, CgRS] @ cols, per image or over the whole batch, then NCHW."""
    x, weight = np.asarray(x), np.asarray(weight)
    _check_float(x, weight)
    g = _ConvGeom(x.shape, weight.shape, stride, padding, dilation, groups)
    per_image = _per_image(g)
    w = weight.reshape(g.G, g.Kg, g.Cg * g.R * g.S)
    y = np.matmul(w, _im2col(x, g, per_image))
    if per_image:
        y = y.reshape(g.N, g.K, g.P, g.Q)  # (N, G, Kg, PQ): already NCHW
        if bias is not None:
            y += np.asarray(bias, dtype=y.dtype).reshape(g.K, 1, 1)
    else:
        y = y.reshape(g.K, g.N, g.P, g.Q)
        if bias is not None:
            y += np.asarray(bias, dtype=y.dtype).reshape(g.K, 1, 1, 1)
        y = y.transpose(1, 0, 2, 3)
    if out is not None:
        out[...] = y
        return out
    return np.ascontiguousarray(y)


def im2col_conv2d_backward(grad_out, x, weight, *, stride=1, padding=0, dilation=1, groups=1,
                           need_input=True, need_weight=True, need_bias=True):
    """(grad_x, grad_w, grad_b); each one not asked for is None.

    grad_x = col2im(W^T @ grad_out), grad_w = grad_out @ cols^T, grad_b = grad_out summed over N, P, Q.
    """
    grad_out, x, weight = np.asarray(grad_out), np.asarray(x), np.asarray(weight)
    _check_float(grad_out, x, weight)
    g = _ConvGeom(x.shape, weight.shape, stride, padding, dilation, groups)
    if grad_out.shape != g.out_shape:
        raise ValueError(f"grad_out has shape {grad_out.shape}, expected {g.out_shape}")
    per_image = _per_image(g)
    if per_image:
        go = np.ascontiguousarray(grad_out).reshape(g.N, g.G, g.Kg, g.P * g.Q)
    elif need_input or need_weight:
        go = np.ascontiguousarray(grad_out.transpose(1, 0, 2, 3)).reshape(g.G, g.Kg, g.N * g.P * g.Q)
    gx = gw = gb = None
    if need_input:
        wt = weight.reshape(g.G, g.Kg, g.Cg * g.R * g.S).transpose(0, 2, 1)  # (G, CgRS, Kg)
        gx = _col2im(np.matmul(wt, go), g, per_image)
    if need_weight:
        cols = _im2col(x, g, per_image)
        gw = np.matmul(go, cols.swapaxes(-1, -2))  # (N, G, Kg, CgRS) or (G, Kg, CgRS)
        if per_image:
            gw = gw.sum(axis=0)
        gw = gw.reshape(weight.shape)
    if need_bias:
        gb = grad_out.sum(axis=(0, 2, 3))
    return gx, gw, gb


# ----------------------------------------------------------------------------------------------
# peers


class _Peer:
    name = ""
    ops = frozenset()

    def supports(self, op: str) -> bool:
        return op in self.ops

    def asarray(self, a):
        return np.ascontiguousarray(a)

    def to_numpy(self, a):
        return None if a is None else np.asarray(a)

    def __repr__(self):
        return f"<peer {self.name}>"


class NumpyIm2colPeer(_Peer):
    """conv2d via im2col + np.matmul (float32 stays float32)."""

    name = "numpy_im2col"
    ops = CONV_OPS

    conv2d = staticmethod(im2col_conv2d)
    conv2d_backward = staticmethod(im2col_conv2d_backward)


class NumpyPeer(_Peer):
    """ReLU with NumPy ufuncs."""

    name = "numpy"
    ops = RELU_OPS

    @staticmethod
    def relu(x, *, out=None):
        return np.maximum(x, 0, out=out)

    @staticmethod
    def relu_backward(grad_out, y):
        return np.where(y > 0, grad_out, grad_out.dtype.type(0))


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


class TorchPeer(_Peer):
    """PyTorch CPU ops; inputs are torch tensors made by ``asarray`` (zero-copy from NumPy)."""

    name = "torch"
    ops = CONV_OPS | RELU_OPS | POOL_OPS

    def __init__(self):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        self.F = F
        self.aten = torch.ops.aten
        self._empty: Dict[tuple, object] = {}

    def asarray(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.contiguous()
        return self.torch.from_numpy(np.ascontiguousarray(a))

    def to_numpy(self, a):
        if a is None:
            return None
        if isinstance(a, self.torch.Tensor):
            return a.detach().cpu().numpy()
        return np.asarray(a)

    # -- conv2d -------------------------------------------------------------------------------
    def _conv_padding(self, x_shape, w_shape, stride, padding, dilation):
        """torch's symmetric (ph, pw), or (None, F.pad tuple) for asymmetric / 'same' padding."""
        sh, sw = _pair(stride, "stride")
        dh, dw = _pair(dilation, "dilation")
        t, b, l, r = _padding4(padding, x_shape[2:], w_shape[2:], (sh, sw), (dh, dw))
        if t == b and l == r:
            return (t, l), None
        return (0, 0), (l, r, t, b)

    def conv2d(self, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, out=None):
        pad, explicit = self._conv_padding(x.shape, weight.shape, stride, padding, dilation)
        if explicit is not None:
            x = self.F.pad(x, explicit)
        with self.torch.no_grad():
            y = self.F.conv2d(x, weight, bias, _pair(stride, "stride"), pad, _pair(dilation, "dilation"), groups)
        if out is not None:
            out.copy_(y)
            return out
        return y

    def conv2d_backward(self, grad_out, x, weight, *, stride=1, padding=0, dilation=1, groups=1,
                        need_input=True, need_weight=True, need_bias=True):
        pad, explicit = self._conv_padding(x.shape, weight.shape, stride, padding, dilation)
        if explicit is not None:
            raise NotImplementedError("torch peer: asymmetric padding in conv2d_backward")
        gx, gw, gb = self.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if need_bias else None,
            list(_pair(stride, "stride")), list(pad), list(_pair(dilation, "dilation")),
            False, [0, 0], groups, [bool(need_input), bool(need_weight), bool(need_bias)])
        return (gx if need_input else None, gw if need_weight else None, gb if need_bias else None)

    # -- relu ---------------------------------------------------------------------------------
    def relu(self, x, *, out=None):
        if out is not None:
            return self.torch.clamp_min(x, 0, out=out)
        return self.torch.relu(x)

    def relu_backward(self, grad_out, y):
        return self.aten.threshold_backward(grad_out, y, 0)

    # -- max_pool2d ---------------------------------------------------------------------------
    @staticmethod
    def _pool_args(kernel_size, stride, padding, dilation):
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None else _pair(stride, "stride")
        if isinstance(padding, str) or (isinstance(padding, (tuple, list)) and isinstance(padding[0], (tuple, list))):
            raise NotImplementedError("torch peer: max_pool2d takes symmetric int/pair padding only")
        return list(k), list(s), list(_pair(padding, "padding")), list(_pair(dilation, "dilation"))

    def max_pool2d(self, x, kernel_size, stride=None, padding=0, dilation=1, *, ceil_mode=False,
                   return_indices=False):
        k, s, p, d = self._pool_args(kernel_size, stride, padding, dilation)
        y, idx = self.aten.max_pool2d_with_indices(x, k, s, p, d, bool(ceil_mode))
        return (y, idx) if return_indices else y

    def max_pool2d_backward(self, grad_out, indices, input_shape, kernel_size, stride=None, padding=0,
                            dilation=1, *, ceil_mode=False):
        k, s, p, d = self._pool_args(kernel_size, stride, padding, dilation)
        # aten wants the input tensor only for its sizes and dtype: keep one uninitialised per shape
        key = (tuple(input_shape), grad_out.dtype, grad_out.device)
        x = self._empty.get(key)
        if x is None:
            x = self._empty[key] = self.torch.empty(tuple(input_shape), dtype=grad_out.dtype, device=grad_out.device)
        return self.aten.max_pool2d_with_indices_backward(grad_out, x, k, s, p, d, bool(ceil_mode), indices)


_PEER_CLASSES = {"numpy_im2col": NumpyIm2colPeer, "numpy": NumpyPeer, "torch": TorchPeer}
_cache: Dict[str, _Peer] = {}


def available_peers() -> Tuple[str, ...]:
    """Names of the peers usable here: always the NumPy ones, plus "torch" when torch imports."""
    names = ["numpy_im2col", "numpy"]
    if torch_available():
        names.append("torch")
    return tuple(names)


def get_peer(name: str) -> _Peer:
    """The peer called ``name`` (cached); ImportError if it is not installed."""
    if name not in _PEER_CLASSES:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(_PEER_CLASSES)}")
    peer = _cache.get(name)
    if peer is None:
        peer = _cache[name] = _PEER_CLASSES[name]()
    return peer
