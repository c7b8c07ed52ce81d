"""Tests of pykernels.layers: gradients against central finite differences, the loss and optimizer
against hand-computed values, constructor checks, initialisation and device moves.

Finite differences run in float64 on smooth points: random non-zero data, pool inputs with distinct
values, and margins asserted so that no ReLU or max flips under the nudge.
"""

import math

import numpy as np
import pytest

from pykernels.layers import (SGD, Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sequential,
                              SoftmaxCrossEntropy)

EPS = 1e-6


def numeric_grad(f, a, eps=EPS):
    """Central differences of the scalar f() with respect to every element of a (changed in place)."""
    grad = np.zeros_like(a, dtype=np.float64)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = float(f())
        flat[i] = old - eps
        minus = float(f())
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def check_layer_grads(layer, x, rng):
    """Backward of `layer` against finite differences of sum(forward(x) * r), for x and every param."""
    r = rng.standard_normal(layer.forward(x).shape)
    loss = lambda: np.sum(layer.forward(x) * r)
    loss()
    grad_x = layer.backward(r.copy())
    analytic = {"x": grad_x, **{k: v.copy() for k, v in layer.grads.items()}}
    assert set(analytic) == {"x", *layer.params}
    np.testing.assert_allclose(analytic["x"], numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    for name, p in layer.params.items():
        np.testing.assert_allclose(analytic[name], numeric_grad(loss, p), rtol=1e-6, atol=1e-8,
                                   err_msg=f"gradient of {name}")


def distinct_values(shape, rng, step=0.1):
    """Values step apart in random order: every pool window has one maximum, far from a tie."""
    n = math.prod(shape)
    return (rng.permutation(n) - n / 2).reshape(shape) * step


# ============================================================================ each layer vs finite differences

@pytest.mark.parametrize("kwargs, x_shape", [
    (dict(in_channels=2, out_channels=3, kernel_size=3), (2, 2, 5, 6)),
    (dict(in_channels=2, out_channels=4, kernel_size=2, padding="same"), (1, 2, 5, 5)),  # odd total padding
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2),
          groups=2), (1, 4, 6, 7)),
    (dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3, bias=False), (1, 3, 4, 4)),
])
def test_conv2d_backward_matches_finite_differences(kwargs, x_shape):
    rng = np.random.default_rng(1)
    layer = Conv2D(**kwargs, dtype=np.float64, rng=2)
    if layer.bias is not None:
        layer.bias[:] = rng.standard_normal(layer.bias.shape)  # zero bias would hide a wrong grad_b scale
    check_layer_grads(layer, rng.standard_normal(x_shape), rng)
    assert ("bias" in layer.grads) == kwargs.get("bias", True)


def test_relu_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep every input away from the kink
    layer = ReLU()
    check_layer_grads(layer, x, rng)
    assert layer.params == {} and layer.grads == {}


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True),
    dict(kernel_size=3, padding="same"),
])
def test_maxpool2d_backward_matches_finite_differences(kwargs):
    rng = np.random.default_rng(4)
    x = distinct_values((1, 2, 6, 7), rng)
    check_layer_grads(MaxPool2D(**kwargs), x, rng)


def test_linear_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    layer = Linear(7, 4, dtype=np.float64, rng=6)
    layer.bias[:] = rng.standard_normal(4)
    check_layer_grads(layer, rng.standard_normal((3, 7)), rng)
    nobias = Linear(7, 4, bias=False, dtype=np.float64, rng=6)
    check_layer_grads(nobias, rng.standard_normal((3, 7)), rng)
    assert set(nobias.grads) == {"weight"}


def test_linear_forward_is_x_weight_t_plus_bias():
    rng = np.random.default_rng(7)
    layer = Linear(3, 2, dtype=np.float64, rng=0)
    layer.weight[:] = [[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]
    layer.bias[:] = [0.25, -2.0]
    x = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, -2.0]])
    np.testing.assert_allclose(layer(x), [[6.25, -2.5], [-3.75, -5.0]])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\)"):
        layer(rng.standard_normal((2, 4)))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.astype(np.float32))  # no silent upcast of float32 input against float64 weights


def test_linear_backward_refuses_another_dtype_as_forward_does():
    # a float64 grad_out on a float32 layer had returned float64 gradients (matmul's silent upcast)
    layer = Linear(3, 2, rng=0)
    layer(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="pass arrays of one dtype"):
        layer.backward(np.ones((2, 2), np.float64))
    assert layer.backward(np.ones((2, 2), np.float32)).dtype == np.float32


def test_sequential_refuses_a_layer_given_twice():
    # Conv2D used twice had kept one backward's weight gradient, computed from its second input: 49 off
    conv, relu = Conv2D(2, 2, 3, padding=1, dtype=np.float64, rng=0), ReLU()
    for layers, where in (((conv, relu, conv), r"layers\[2\] is the same layer as layers\[0\]"),
                          ((conv, Sequential(relu, conv)), r"layers\[1.1\] is the same layer as layers\[0\]"),
                          ((relu, Conv2D(2, 2, 3, rng=0), relu), r"layers\[2\] is the same layer as layers\[0\]")):
        with pytest.raises(ValueError, match=where):
            Sequential(*layers)
    Sequential(conv, relu, Conv2D(2, 2, 3, padding=1, dtype=np.float64, rng=0), ReLU())  # distinct layers: fine


def test_maxpool2d_backward_refuses_another_dtype():
    layer = MaxPool2D(2)
    layer(np.ones((1, 1, 4, 4), np.float32))
    with pytest.raises(TypeError, match="grad_out has dtype float64 but the last input had float32"):
        layer.backward(np.ones((1, 1, 2, 2), np.float64))  # had returned float64
    assert layer.backward(np.ones((1, 1, 2, 2), np.float32)).dtype == np.float32


def test_relu_backward_blames_grad_out_not_its_saved_output():
    layer = ReLU()
    layer(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"grad_out must have the shape of ReLU's last output \(2, 3\), got"):
        layer.backward(np.ones((2, 4), np.float32))


def test_flatten_round_trip():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    layer = Flatten()
    y = layer(x)
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(y[1], x[1].ravel())
    g = layer.backward(y * 2)
    assert g.shape == x.shape
    np.testing.assert_array_equal(g, x * 2)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        layer.backward(np.zeros((2, 59), np.float32))


def test_an_empty_batch_goes_through_every_layer():
    # README: an empty batch gives empty results; Flatten's reshape(N, -1) could not infer -1 for N = 0.
    net = Sequential(Conv2D(2, 4, 3, padding=1, rng=0), ReLU(), MaxPool2D(2), Flatten(), Linear(4 * 3 * 3, 5, rng=1))
    x = np.zeros((0, 2, 6, 6), np.float32)
    y = net.forward(x)
    assert y.shape == (0, 5) and y.dtype == np.float32
    grad_x = net.backward(np.zeros((0, 5), np.float32))
    assert grad_x.shape == x.shape
    assert all(g.shape == p.shape and not g.any() for p, g in zip(net.params.values(), net.grads.values()))


def test_backward_before_forward_raises():
    for layer in (Conv2D(1, 1, 1), ReLU(), MaxPool2D(2), Flatten(), Linear(1, 1)):
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.zeros((1, 1, 1, 1), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        SoftmaxCrossEntropy().backward()


# ============================================================================ a whole network

def small_net(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2D(2, 4, 3, padding="same", dtype=dtype, rng=rng),
        ReLU(),
        MaxPool2D(2),
        Conv2D(4, 6, 3, stride=2, padding=1, groups=2, dtype=dtype, rng=rng),
        ReLU(),
        Flatten(),
        Linear(6 * 2 * 2, 3, dtype=dtype, rng=rng),
    )


def top_two_gap(x, k):
    """Smallest gap between the largest and second-largest value of any non-overlapping k x k window."""
    n, c, h, w = x.shape
    windows = x[:, :, :h // k * k, :w // k * k].reshape(n, c, h // k, k, w // k, k).transpose(0, 1, 2, 4, 3, 5)
    top = np.sort(windows.reshape(n, c, h // k, w // k, k * k), axis=-1)
    positive = top[..., -1] > 0  # an all-zero window (after ReLU) has gradient 0 whichever cell wins
    return np.min((top[..., -1] - top[..., -2])[positive])


def test_network_gradients_match_finite_differences():
    rng = np.random.default_rng(10)
    model = small_net()
    for name, p in model.params.items():
        if name.endswith("bias"):
            p[:] = 0.1 * rng.standard_normal(p.shape)  # non-zero biases, so their gradients are exercised
    x = rng.standard_normal((2, 2, 6, 6))
    labels = np.array([0, 2])
    loss_fn = SoftmaxCrossEntropy()

    acts = model.forward_with_activations(x)
    # The premise of finite differences: no pre-ReLU value near 0 and no near-tie in a pool window.
    assert min(np.min(np.abs(acts[0])), np.min(np.abs(acts[3]))) > 1e-4
    assert top_two_gap(acts[1], 2) > 1e-4

    loss = loss_fn(acts[-1], labels)
    assert np.isfinite(loss) and loss > 0
    grad_x = model.backward(loss_fn.backward())
    analytic = {k: v.copy() for k, v in model.grads.items()}
    assert set(analytic) == set(model.params) == {"0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"}

    f = lambda: loss_fn(model(x), labels)
    np.testing.assert_allclose(grad_x, numeric_grad(f, x), rtol=1e-5, atol=1e-9)
    for name, p in model.params.items():
        numeric = numeric_grad(f, p)
        assert np.any(numeric != 0), name  # the check below would be vacuous otherwise
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-9, err_msg=name)


def test_sequential_container():
    model = small_net()
    assert len(model) == 7 and isinstance(model[2], MaxPool2D) and list(model) == model.layers
    assert list(model.params) == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"]
    assert model.params["3.weight"] is model[3].weight  # the same arrays, so SGD updates the layers
    assert model.params["3.weight"].shape == (6, 2, 3, 3)
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8))
    acts = model.forward_with_activations(x)
    assert [a.shape for a in acts] == [(1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 4, 4), (1, 6, 2, 2), (1, 6, 2, 2),
                                       (1, 24), (1, 3)]
    np.testing.assert_array_equal(acts[-1], model(x))
    nested = Sequential(Linear(2, 2), Sequential(ReLU(), Linear(2, 1)))
    assert list(nested.params) == ["0.weight", "0.bias", "1.1.weight", "1.1.bias"]
    assert "(3): Conv2D(4, 6" in repr(model) and "groups=2" in repr(model)
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        Sequential(ReLU(), "relu")


# ============================================================================ loss

def test_softmax_cross_entropy_hand_computed():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = np.array([2, 1])
    # row 0: -log(e^3 / (e + e^2 + e^3)) = log(1 + e^-1 + e^-2); row 1: log 3
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    loss_fn = SoftmaxCrossEntropy()
    assert float(loss_fn(logits, labels)) == pytest.approx(expected, rel=1e-12)
    e = np.exp([1.0, 2.0, 3.0])
    expected_grad = np.array([e / e.sum() - [0, 0, 1], np.full(3, 1 / 3) - [0, 1, 0]]) / 2
    np.testing.assert_allclose(loss_fn.backward(), expected_grad, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_stable_for_huge_logits(dtype):
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], dtype)
    loss_fn = SoftmaxCrossEntropy()
    loss = float(loss_fn(logits, np.array([0, 0])))
    assert loss == pytest.approx((0.0 + 1e5) / 2, rel=1e-6)
    grad = loss_fn.backward()
    assert np.all(np.isfinite(grad)) and grad.dtype == dtype
    np.testing.assert_allclose(grad, [[0, 0, 0], [-0.5, 0.5, 0]], atol=1e-7)


def test_softmax_cross_entropy_gradient_matches_finite_differences():
    rng = np.random.default_rng(11)
    logits = 3 * rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    loss_fn = SoftmaxCrossEntropy()
    loss_fn(logits, labels)
    grad = loss_fn.backward()
    np.testing.assert_allclose(grad, numeric_grad(lambda: loss_fn(logits, labels), logits), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)  # softmax rows sum to 1, onehot rows too


def test_softmax_cross_entropy_rejects_bad_labels():
    loss_fn = SoftmaxCrossEntropy()
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss_fn(logits, np.array([0, 3]))
    with pytest.raises(TypeError, match="labels must be integer"):
        loss_fn(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        loss_fn(logits, np.array([0, 1, 2]))


# ============================================================================ optimizer

class _OneParam:
    def __init__(self):
        self.params = {"w": np.array([1.0, 2.0])}
        self.grads = {"w": np.array([0.5, -1.0])}


def test_sgd_update_by_hand():
    model = _OneParam()
    w = model.params["w"]
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()
    # g = [0.5, -1] + 0.01 * [1, 2] = [0.51, -0.98]; v = g; w = [1, 2] - 0.1 * v
    np.testing.assert_allclose(w, [0.949, 2.098], rtol=1e-14)
    opt.step()
    # g = [0.5, -1] + 0.01 * [0.949, 2.098] = [0.50949, -0.97902]
    # v = 0.9 * [0.51, -0.98] + g = [0.96849, -1.86102]; w -= 0.1 * v
    np.testing.assert_allclose(w, [0.852151, 2.284102], rtol=1e-14)
    assert model.params["w"] is w  # updated in place: the layers keep seeing their own arrays


def test_sgd_without_momentum_is_plain_gradient_descent():
    model = _OneParam()
    SGD(model, lr=0.5, momentum=0.0).step()
    np.testing.assert_allclose(model.params["w"], [0.75, 2.5], rtol=1e-15)


def test_sgd_lowers_the_loss():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((16, 2, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, size=16)
    model = small_net(np.float32, seed=1)
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(model, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        losses.append(float(loss_fn(model(x), labels)))
        model.backward(loss_fn.backward())
        opt.step()
    assert all(p.dtype == np.float32 for p in model.params.values())
    assert losses[-1] < 0.5 * losses[0], losses


def test_sgd_step_before_backward_raises():
    with pytest.raises(RuntimeError, match="before backward"):
        SGD(Linear(2, 2)).step()


# ============================================================================ constructor arguments

@pytest.mark.parametrize("make, exc, name", [
    (lambda: Conv2D(0, 4, 3), ValueError, "in_channels"),
    (lambda: Conv2D(2.0, 4, 3), TypeError, "in_channels"),
    (lambda: Conv2D(True, 4, 3), TypeError, "in_channels"),
    (lambda: Conv2D(2, -1, 3), ValueError, "out_channels"),
    (lambda: Conv2D(2, 4, 0), ValueError, "kernel_size"),
    (lambda: Conv2D(2, 4, (3, 3, 3)), ValueError, "kernel_size"),
    (lambda: Conv2D(2, 4, 3, stride=0), ValueError, "stride"),
    (lambda: Conv2D(2, 4, 3, padding=-1), ValueError, "padding"),
    (lambda: Conv2D(2, 4, 3, padding="full"), ValueError, "padding"),
    (lambda: Conv2D(2, 4, 3, dilation=1.5), TypeError, "dilation"),
    (lambda: Conv2D(2, 4, 3, groups=3), ValueError, "groups"),
    (lambda: Conv2D(2, 4, 3, groups=0), ValueError, "groups"),
    (lambda: Conv2D(2, 4, 3, bias=1), TypeError, "bias"),
    (lambda: Conv2D(2, 4, 3, dtype=np.int32), TypeError, "dtype"),
    (lambda: Conv2D(2, 4, 3, xp=math), TypeError, "xp"),
    (lambda: Conv2D(2, 4, 3, rng="seed"), TypeError, "rng"),
    (lambda: MaxPool2D(0), ValueError, "kernel_size"),
    (lambda: MaxPool2D(2, stride=(1, 0)), ValueError, "stride"),
    (lambda: MaxPool2D(2, padding="half"), ValueError, "padding"),
    (lambda: MaxPool2D(2, ceil_mode="yes"), TypeError, "ceil_mode"),
    (lambda: Linear(0, 3), ValueError, "in_features"),
    (lambda: Linear(3, "4"), TypeError, "out_features"),
    (lambda: Linear(3, 4, dtype=np.float16), TypeError, "dtype"),
    (lambda: SGD(Linear(2, 2), lr=0), ValueError, "lr"),
    (lambda: SGD(Linear(2, 2), momentum=1.0), ValueError, "momentum"),
    (lambda: SGD(Linear(2, 2), weight_decay=-1e-4), ValueError, "weight_decay"),
    (lambda: SGD(Linear(2, 2), lr="0.1"), TypeError, "lr"),
    (lambda: SGD(object()), TypeError, "model"),
])
def test_constructor_errors_name_the_argument(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


# ============================================================================ initialisation

@pytest.mark.parametrize("make, fan_in", [
    (lambda: Conv2D(64, 128, 3, rng=0), 64 * 9),
    (lambda: Conv2D(64, 128, 3, groups=4, rng=0), 16 * 9),
    (lambda: Linear(1000, 400, rng=0), 1000),
])
def test_he_init_std(make, fan_in):
    layer = make()
    w = layer.weight
    # Sample std of n >= 73728 normals is within ~0.3% of the truth at one sigma; 2% is 7 sigma.
    assert w.std() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert abs(w.mean()) < 0.02 * math.sqrt(2 / fan_in)  # the mean's std is std / sqrt(n) <= std / 271
    assert w.dtype == np.float32
    np.testing.assert_array_equal(layer.bias, 0)


def test_same_seed_same_weights():
    a, b = Conv2D(3, 8, 3, rng=42), Conv2D(3, 8, 3, rng=42)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert not np.array_equal(a.weight, Conv2D(3, 8, 3, rng=43).weight)
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    np.testing.assert_array_equal(Linear(5, 4, rng=g1).weight, Linear(5, 4, rng=g2).weight)
    # One seed gives the same weights in every dtype (drawn in float64, then rounded).
    np.testing.assert_array_equal(Conv2D(3, 8, 3, rng=42, dtype=np.float64).weight.astype(np.float32), a.weight)


# ============================================================================ devices

def test_to_numpy_round_trip():
    model = small_net(np.float32)
    before = {k: v.copy() for k, v in model.params.items()}
    assert model.to(np) is model
    for k, v in model.params.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32
        np.testing.assert_array_equal(v, before[k])
    assert model[0].to(np) is model[0]


def test_to_cupy_round_trip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy finds no CUDA GPU")
    except Exception as exc:  # CUDARuntimeError when there is no driver
        pytest.skip(f"CuPy finds no CUDA GPU ({type(exc).__name__})")
    import pykernels

    model = small_net(np.float32)
    before = {k: v.copy() for k, v in model.params.items()}
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8)).astype(np.float32)
    expected = model(x)
    assert model.to(cupy) is model
    assert all(isinstance(v, cupy.ndarray) for v in model.params.values())
    if pykernels.cuda_available():
        np.testing.assert_allclose(cupy.asnumpy(model(cupy.asarray(x))), expected, rtol=1e-4, atol=1e-5)
    model.to(np)
    for k, v in model.params.items():
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, before[k])
