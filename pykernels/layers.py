"""Layers with state: parameters, their gradients, and what forward must keep for backward.

Conv2D, ReLU, MaxPool2D, Flatten, Linear and Sequential each have forward(x), backward(grad_out) ->
grad_x, `params` and `grads` (name -> array) and to(xp). SoftmaxCrossEntropy is the loss and SGD the
optimizer that closes a training loop. The arithmetic is pykernels.ops (Linear: xp.matmul); this file
only keeps state, so NumPy and CuPy arrays go through the same code.

backward replaces `grads` (it does not accumulate), so there is nothing to zero between steps.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _args, _backend, ops

_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---- argument checks and helpers ----------------------------------------------------------------------

def _positive_int(value, name: str) -> int:
    # bool is an int subclass, but in_channels=True is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _param_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in _PARAM_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _rng(rng) -> np.random.Generator:
    """rng as a Generator: None (fresh entropy), an int seed, or a Generator used as is."""
    if rng is None or (isinstance(rng, numbers.Integral) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def _check_padding(padding, kernel: tuple, stride: tuple, dilation: tuple) -> None:
    # 'same' depends on the input size, so only the form is checked here; the stand-in input size
    # (the kernel's) is never used for anything else.
    _args.padding4(padding, "padding", kernel, kernel, stride, dilation)


def _xp_kind(xp) -> str:
    if xp is np:
        return "numpy"
    if getattr(xp, "__name__", None) == "cupy":
        return "cupy"
    raise TypeError(f"xp must be the numpy or cupy module, got {xp!r}")


def _move(a, kind: str):
    """a as an array of `kind` ('numpy' or 'cupy'); returned unchanged when already there."""
    if _backend.array_kind(("array", a)) == kind:
        return a
    return a.get() if kind == "numpy" else _backend.xp_of("cupy").asarray(a)


def _he_normal(rng, shape, fan_in: int, dtype: np.dtype):
    # He/Kaiming normal keeps the activations' variance constant through ReLU layers. Drawn in float64
    # on the host so one seed gives the same weights for every dtype and device.
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


def _not_run(layer) -> RuntimeError:
    return RuntimeError(f"{type(layer).__name__}.backward called before forward")


def _kwargs_repr(pairs) -> str:
    return "".join(f", {k}={v!r}" for k, v in pairs)


class _Layer:
    """What every layer shares: no parameters unless it says so, grads filled by backward."""

    def __init__(self):
        self.grads = {}

    @property
    def params(self) -> dict:
        return {}

    def to(self, xp):
        """Move parameters (and gradients) to NumPy or CuPy; forget what forward cached."""
        kind = _xp_kind(xp)
        for name, p in self.params.items():
            setattr(self, name, _move(p, kind))
        self.grads = {k: _move(g, kind) for k, g in self.grads.items()}
        self._cache = None
        return self

    def __call__(self, x):
        return self.forward(x)


# ---- layers ---------------------------------------------------------------------------------------------

class Conv2D(_Layer):
    """2-D convolution (cross-correlation) of NCHW input with weight (K, C/groups, R, S) and bias (K,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, *, dtype=np.float32, xp=np, rng=None):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _args.pair(kernel_size, "kernel_size")
        self.stride = _args.pair(stride, "stride")
        self.dilation = _args.pair(dilation, "dilation")
        _check_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding  # kept as given: 'same' is resolved per input size by conv2d
        self.groups = _positive_int(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups = {self.groups} must divide in_channels ({self.in_channels}) and "
                             f"out_channels ({self.out_channels})")
        has_bias = _bool(bias, "bias")
        dtype = _param_dtype(dtype)
        kind = _xp_kind(xp)
        r, s = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, r, s)
        fan_in = shape[1] * r * s
        self.weight = _move(_he_normal(_rng(rng), shape, fan_in, dtype), kind)
        self.bias = _move(np.zeros(self.out_channels, dtype), kind) if has_bias else None
        self._cache = None

    @property
    def params(self) -> dict:
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def _geometry(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def forward(self, x):
        y = ops.conv2d(x, self.weight, self.bias, **self._geometry())
        self._cache = x
        return y

    def backward(self, grad_out):
        if self._cache is None:
            raise _not_run(self)
        grad_x, grad_w, grad_b = ops.conv2d_backward(grad_out, self._cache, self.weight, **self._geometry(),
                                                     need_bias=self.bias is not None)
        self.grads = {"weight": grad_w} if grad_b is None else {"weight": grad_w, "bias": grad_b}
        return grad_x

    def __repr__(self):
        extra = [(k, v) for k, v, default in (
            ("stride", self.stride, (1, 1)), ("padding", self.padding, 0), ("dilation", self.dilation, (1, 1)),
            ("groups", self.groups, 1), ("bias", self.bias is not None, True)) if v != default]
        return (f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
                f"{_kwargs_repr(extra)}, dtype={self.weight.dtype}, xp={_backend.array_kind(('w', self.weight))})")


class ReLU(_Layer):
    """max(x, 0); backward passes the gradient where the output is positive."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        y = ops.relu(x)
        self._cache = y  # the output is enough for backward (y > 0 exactly where x > 0)
        return y

    def backward(self, grad_out):
        if self._cache is None:
            raise _not_run(self)
        shape = getattr(grad_out, "shape", None)  # (not an array: relu_backward's TypeError)
        if shape is not None and tuple(shape) != self._cache.shape:  # relu_backward would blame y, kept here
            raise ValueError(f"grad_out must have the shape of ReLU's last output {self._cache.shape}, "
                             f"got {tuple(shape)}")
        return ops.relu_backward(grad_out, self._cache)

    def __repr__(self):
        return "ReLU()"


class MaxPool2D(_Layer):
    """Max over each window; backward routes the gradient to each window's maximum (its first, on ties)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, *, ceil_mode=False):
        super().__init__()
        self.kernel_size = _args.pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _args.pair(stride, "stride")
        self.dilation = _args.pair(dilation, "dilation")
        _check_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding
        self.ceil_mode = _bool(ceil_mode, "ceil_mode")
        self._cache = None

    def _geometry(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, ceil_mode=self.ceil_mode)

    def forward(self, x):
        y, indices = ops.max_pool2d(x, **self._geometry(), return_indices=True)
        self._cache = (tuple(x.shape), y.dtype, indices)
        return y

    def backward(self, grad_out):
        if self._cache is None:
            raise _not_run(self)
        shape, dtype, indices = self._cache
        if getattr(grad_out, "dtype", dtype) != dtype:  # as the other layers: no silent change of dtype
            raise TypeError(f"grad_out has dtype {grad_out.dtype} but the last input had {dtype}; "
                            "pass arrays of one dtype")
        return ops.max_pool2d_backward(grad_out, indices, shape, **self._geometry())

    def __repr__(self):
        extra = [(k, v) for k, v, default in (
            ("stride", self.stride, self.kernel_size), ("padding", self.padding, 0),
            ("dilation", self.dilation, (1, 1)), ("ceil_mode", self.ceil_mode, False)) if v != default]
        return f"MaxPool2D(kernel_size={self.kernel_size}{_kwargs_repr(extra)})"


class Flatten(_Layer):
    """(N, ...) -> (N, prod(...)), the bridge from feature maps to Linear."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        if x.ndim < 1:
            raise ValueError("Flatten needs an input with a batch axis, got a 0-d array")
        y = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: NumPy cannot infer it for an empty batch
        self._cache = (tuple(x.shape), tuple(y.shape))
        return y

    def backward(self, grad_out):
        if self._cache is None:
            raise _not_run(self)
        in_shape, out_shape = self._cache
        if tuple(grad_out.shape) != out_shape:
            raise ValueError(f"grad_out must have shape {out_shape} (Flatten's output), got {tuple(grad_out.shape)}")
        return grad_out.reshape(in_shape)

    def __repr__(self):
        return "Flatten()"


class Linear(_Layer):
    """y = x @ weight.T + bias, with x (N, in_features) and weight (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float32, xp=np, rng=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        has_bias = _bool(bias, "bias")
        dtype = _param_dtype(dtype)
        kind = _xp_kind(xp)
        shape = (self.out_features, self.in_features)
        self.weight = _move(_he_normal(_rng(rng), shape, self.in_features, dtype), kind)
        self.bias = _move(np.zeros(self.out_features, dtype), kind) if has_bias else None
        self._cache = None

    @property
    def params(self) -> dict:
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def forward(self, x):
        # The same kind and dtype rules as the ops: matmul would otherwise upcast or copy silently.
        kind = _backend.array_kind(("x", x), ("weight", self.weight))
        _backend.common_dtype(kind, ("x", x), ("weight", self.weight))
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (N, {self.in_features}), got {tuple(x.shape)}")
        xp = _backend.xp_of(kind)
        y = xp.matmul(x, self.weight.T)
        if self.bias is not None:
            y += self.bias
        self._cache = x
        return y

    def backward(self, grad_out):
        if self._cache is None:
            raise _not_run(self)
        x = self._cache
        kind = _backend.array_kind(("grad_out", grad_out), ("weight", self.weight))
        _backend.common_dtype(kind, ("grad_out", grad_out), ("weight", self.weight))  # as forward: no upcast
        expected = (x.shape[0], self.out_features)
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"grad_out must have shape {expected}, got {tuple(grad_out.shape)}")
        xp = _backend.xp_of(kind)
        self.grads = {"weight": xp.matmul(grad_out.T, x)}
        if self.bias is not None:
            self.grads["bias"] = grad_out.sum(axis=0)
        return xp.matmul(grad_out, self.weight)

    def __repr__(self):
        extra = "" if self.bias is not None else ", bias=False"
        return (f"Linear({self.in_features}, {self.out_features}{extra}, dtype={self.weight.dtype}, "
                f"xp={_backend.array_kind(('w', self.weight))})")


def _each_layer(layers, prefix=""):
    """(index path, layer) for every layer, inside nested Sequentials too ("1.0")."""
    for i, layer in enumerate(layers):
        path = f"{prefix}{i}"
        yield path, layer
        if isinstance(layer, Sequential):
            yield from _each_layer(layer.layers, path + ".")


class Sequential:
    """Layers applied in order; backward walks them in reverse. Parameter names are prefixed with the
    layer's index ("0.weight"), nested Sequentials included ("1.0.bias")."""

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not all(callable(getattr(layer, m, None)) for m in ("forward", "backward", "to")):
                raise TypeError(f"layers[{i}] must be a layer (with forward, backward and to), "
                                f"got {type(layer).__name__}")
        # Each layer keeps its last forward's input for backward and its last backward's gradients: one used
        # twice would compute both backward passes from its second input and keep one pass's gradients only.
        seen = {}
        for path, layer in _each_layer(layers):
            if id(layer) in seen:
                raise ValueError(f"layers[{path}] is the same layer as layers[{seen[id(layer)]}]: a layer keeps one "
                                 "forward's input for backward, so it can be used once; make another (with the "
                                 "same params to share weights: their gradients then need adding up)")
            seen[id(layer)] = path
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def forward_with_activations(self, x) -> list:
        """Like forward, but returns every layer's output in order (the last one is forward's result)."""
        outputs = []
        for layer in self.layers:
            x = layer.forward(x)
            outputs.append(x)
        return outputs

    def backward(self, grad_out):
        for layer in reversed(self.layers):
            grad_out = layer.backward(grad_out)
        return grad_out

    @property
    def params(self) -> dict:
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers) for name, p in layer.params.items()}

    @property
    def grads(self) -> dict:
        return {f"{i}.{name}": g for i, layer in enumerate(self.layers) for name, g in layer.grads.items()}

    def to(self, xp):
        _xp_kind(xp)  # fail before moving anything
        for layer in self.layers:
            layer.to(xp)
        return self

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        if not self.layers:
            return "Sequential()"
        body = "".join(f"\n  ({i}): " + repr(layer).replace("\n", "\n  ") for i, layer in enumerate(self.layers))
        return f"Sequential({body}\n)"


# ---- loss and optimizer ---------------------------------------------------------------------------------

class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) (N, K) against integer labels (N,)."""

    def __init__(self):
        self._cache = None

    def forward(self, logits, labels):
        """The mean loss as a 0-d value of the logits' dtype and array kind (float(loss) to print)."""
        kind = _backend.array_kind(("logits", logits), ("labels", labels))
        _backend.common_dtype(kind, ("logits", logits))
        if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
            raise ValueError(f"logits must have shape (N, K) with N, K >= 1, got {tuple(logits.shape)}")
        if not np.issubdtype(np.dtype(labels.dtype), np.integer):
            raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
        n, k = logits.shape
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels must have shape ({n},) to match logits {tuple(logits.shape)}, "
                             f"got {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise ValueError(f"labels must lie in [0, {k}), got values from {int(labels.min())} to {int(labels.max())}")
        xp = _backend.xp_of(kind)
        # Subtracting the row maximum keeps exp() from overflowing; log-sum-exp then stays exact.
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_sum
        rows = xp.arange(n)
        self._cache = (xp.exp(log_probs), labels, rows)
        return -log_probs[rows, labels].mean()

    __call__ = forward

    def backward(self):
        """d(mean loss)/d(logits) = (softmax(logits) - onehot(labels)) / N."""
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        probs, labels, rows = self._cache
        grad = probs.copy()
        grad[rows, labels] -= 1
        grad /= probs.shape[0]
        return grad

    def __repr__(self):
        return "SoftmaxCrossEntropy()"


class SGD:
    """Stochastic gradient descent with momentum and weight decay, PyTorch's formulation:
    g = grad + weight_decay * p;  v = momentum * v + g;  p -= lr * v  (in place)."""

    def __init__(self, model, lr=0.01, momentum=0.9, weight_decay=0.0):
        if not (hasattr(model, "params") and hasattr(model, "grads")):
            raise TypeError(f"model must have `params` and `grads` dicts (a layer or Sequential), "
                            f"got {type(model).__name__}")
        self.model = model
        self.lr = self._number(lr, "lr", low=0.0, low_open=True)
        self.momentum = self._number(momentum, "momentum", low=0.0, high=1.0)
        self.weight_decay = self._number(weight_decay, "weight_decay", low=0.0)
        self._velocity = {}

    @staticmethod
    def _number(value, name, *, low, low_open=False, high=None):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        value = float(value)
        too_high = high is not None and value >= high
        if not math.isfinite(value) or value < low or (low_open and value == low) or too_high:
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
            raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
        return value

    def step(self) -> None:
        """Update every parameter that has a gradient; a parameter without one (not reached by
        backward) is left alone, as in PyTorch."""
        params, grads = self.model.params, self.model.grads
        if params and not grads:
            raise RuntimeError("SGD.step called before backward: the model has no gradients")
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                v = self._velocity.get(name)
                if v is None:
                    v = self._velocity[name] = g.copy()  # v = mu * 0 + g on the first step
                else:
                    # The model may have moved (to(xp)) since the last step; its buffer follows it.
                    v = self._velocity[name] = _move(v, _backend.array_kind((name, p)))
                    v *= self.momentum
                    v += g
                g = v
            p -= self.lr * g

    def __repr__(self):
        return f"SGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay})"
