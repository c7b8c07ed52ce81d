"""pykernels inside a framework of your own: a tiny reverse-mode autograd, about what a teaching framework
has, whose convolution, ReLU and max-pool nodes call pykernels' forward and backward kernels.

It checks its gradients against finite differences (float64), then trains a small CNN to tell horizontal
bars from vertical ones (float32) and prints the loss and accuracy. The same code runs on CuPy arrays:
pass --device cuda (pykernels picks the kernels by the arrays' type; the rest is NumPy-style code on `xp`).

    python examples/autograd.py [--device cpu|cuda] [--steps N]
"""

from __future__ import annotations

import argparse

import numpy as np

import pykernels as pk


class Tensor:
    """A value, its gradient, and how to send that gradient to the tensors it was made from."""

    def __init__(self, value, parents=(), backward=None):
        self.value, self.parents, self._backward, self.grad = value, parents, backward, None

    def backward(self):
        """Gradients of this scalar with respect to every tensor it depends on (parents after children)."""
        order, seen = [], set()

        def visit(t):
            if id(t) not in seen:
                seen.add(id(t))
                for p in t.parents:
                    visit(p)
                order.append(t)

        visit(self)
        self.grad = self.value * 0 + 1
        for t in reversed(order):
            if t._backward is not None:
                for parent, grad in zip(t.parents, t._backward(t.grad)):
                    if grad is not None:
                        parent.grad = grad if parent.grad is None else parent.grad + grad


# ---- the nodes: each calls a pykernels kernel forward and hands its backward the saved arrays -----------

def conv2d(x, w, b, **geometry):
    y = pk.conv2d(x.value, w.value, b.value, **geometry)
    return Tensor(y, (x, w, b), lambda g: pk.conv2d_backward(g, x.value, w.value, **geometry))


def relu(x):
    y = pk.relu(x.value)
    return Tensor(y, (x,), lambda g: (pk.relu_backward(g, y),))


def max_pool2d(x, size):
    y, indices = pk.max_pool2d(x.value, size, return_indices=True)
    return Tensor(y, (x,), lambda g: (pk.max_pool2d_backward(g, indices, x.value.shape, size),))


def linear(x, w):  # x (N, ...) flattened, times w (features, classes)
    flat = x.value.reshape(len(x.value), -1)
    return Tensor(flat @ w.value, (x, w), lambda g: ((g @ w.value.T).reshape(x.value.shape), flat.T @ g))


def softmax_cross_entropy(logits, labels):
    xp = _xp(logits.value)
    z = logits.value - logits.value.max(axis=1, keepdims=True)
    p = xp.exp(z) / xp.exp(z).sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -xp.log(p[xp.arange(n), labels]).mean()
    onehot = xp.zeros_like(p)
    onehot[xp.arange(n), labels] = 1
    return Tensor(loss, (logits,), lambda g: (g * (p - onehot) / n,))


def _xp(a):
    return np if isinstance(a, np.ndarray) else __import__("cupy")


# ---- a model and its data ----------------------------------------------------------------------------

def init(xp, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (8, 1, 3, 3), "b1": (8,), "w2": (16, 8, 3, 3), "b2": (16,), "fc": (16 * 3 * 3, 2)}
    fan_in = {"w1": 9, "b1": 9, "w2": 72, "b2": 72, "fc": 144}
    return {k: Tensor(xp.asarray(rng.standard_normal(s) * (2 / fan_in[k]) ** 0.5, dtype=dtype))
            for k, s in shapes.items()}


def forward(params, images, labels):
    p = params
    h = max_pool2d(relu(conv2d(images, p["w1"], p["b1"], padding="same")), 2)  # (N, 8, 6, 6)
    h = max_pool2d(relu(conv2d(h, p["w2"], p["b2"], padding="same")), 2)       # (N, 16, 3, 3)
    logits = linear(h, p["fc"])
    return softmax_cross_entropy(logits, labels), logits.value


def bars(xp, n, dtype, rng):
    """12x12 images holding one horizontal (label 0) or vertical (label 1) bar, plus noise."""
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 0.6, (n, 1, 12, 12))
    where = rng.integers(1, 11, n)
    for i in range(n):
        if labels[i]:
            images[i, 0, :, where[i]] += 1
        else:
            images[i, 0, where[i], :] += 1
    return Tensor(xp.asarray(images, dtype=dtype)), xp.asarray(labels)


def gradient_check(xp):
    """Largest relative difference between the autograd gradients and central differences (float64)."""
    rng = np.random.default_rng(1)
    params = init(xp, np.float64)
    images, labels = bars(xp, 4, np.float64, rng)
    loss, _ = forward(params, images, labels)
    loss.backward()
    worst = 0.0
    for name, t in params.items():
        flat = t.value.reshape(-1)
        for i in rng.choice(flat.size, 5, replace=False):
            saved = float(flat[i])
            flat[i] = saved + 1e-6
            up = float(forward(params, images, labels)[0].value)
            flat[i] = saved - 1e-6
            down = float(forward(params, images, labels)[0].value)
            flat[i] = saved
            numeric, analytic = (up - down) / 2e-6, float(t.grad.reshape(-1)[i])
            worst = max(worst, abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-8))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not pk.cuda_available():
        parser.error(f"no CUDA backend: {pk.cuda_unavailable_reason()}")
    xp = __import__("cupy") if args.device == "cuda" else np

    worst = gradient_check(xp)
    print(f"gradient check (float64, 25 entries): largest relative difference {worst:.1e}")
    assert worst < 1e-5, worst

    rng = np.random.default_rng(0)
    params = init(xp, np.float32)
    test_images, test_labels = bars(xp, 256, np.float32, rng)
    velocity = {k: 0 for k in params}
    for step in range(1, args.steps + 1):
        images, labels = bars(xp, 32, np.float32, rng)
        loss, _ = forward(params, images, labels)
        loss.backward()
        for k, t in params.items():  # SGD with momentum
            velocity[k] = 0.9 * velocity[k] - 0.02 * t.grad
            t.value += velocity[k]
            t.grad = None
        if step % 50 == 0 or step == args.steps:
            _, logits = forward(params, test_images, test_labels)
            accuracy = float((logits.argmax(axis=1) == test_labels).mean())
            print(f"step {step:4d}  loss {float(loss.value):.4f}  test accuracy {accuracy:.1%}")
    return accuracy


if __name__ == "__main__":
    main()
