"""`python -m pykernels demo`: train a small CNN on real handwritten digits with pykernels alone.

The network is LeNet-shaped and built only from pykernels.layers:
    conv 3x3 'same' (1->16) -> ReLU -> max-pool 2x2 -> conv 3x3 'same' (16->32) -> ReLU -> max-pool 2x2
    -> Flatten -> Linear (128->10), softmax cross-entropy, SGD with momentum.
The data are scikit-learn's 1,797 8x8 digits (shipped inside the package, no download), split into a
stratified 80/20 train/test set with a fixed seed.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from . import _backend
from ._cli_types import positive_float, positive_int, seed
from .layers import SGD, Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy


DEFAULT_MAPS = "feature_maps.png"  # what "looking inside a CNN" leaves behind, in the current folder


class MissingExtra(RuntimeError):
    """An optional dependency of the demo is not installed."""


def _require(module: str, purpose: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}: pip install \"pykernels[demo]\" "
                           f"(or, from a clone, pip install \".[demo]\")") from None


def load_digits_split(seed: int, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 8, 8) scaled to [0, 1], int64 labels."""
    datasets = _require("sklearn.datasets", "the demo's data set")
    model_selection = _require("sklearn.model_selection", "the demo's train/test split")
    digits = datasets.load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed)
    return x_train, y_train, x_test, y_test


def build_model(seed: int, xp=np) -> Sequential:
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2D(1, 16, 3, padding="same", rng=rng), ReLU(), MaxPool2D(2),
        Conv2D(16, 32, 3, padding="same", rng=rng), ReLU(), MaxPool2D(2),
        Flatten(), Linear(32 * 2 * 2, 10, rng=rng),
    ).to(xp)


def _to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def accuracy(model: Sequential, x, y, xp=np, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model.forward(xp.asarray(x[i:i + batch_size]))
        correct += int((_to_host(logits).argmax(axis=1) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def train(model: Sequential, x_train, y_train, x_test, y_test, *, epochs: int, batch_size: int, lr: float,
          momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, xp=np, log=print):
    """Trains in place; returns a list of per-epoch dicts (loss, train_acc, test_acc, images_per_s)."""
    loss_fn = SoftmaxCrossEntropy()
    # A little weight decay: 1,437 images are few for 6,090 parameters (98-99% test accuracy over seeds).
    optimizer = SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    history = []
    steps = math.ceil(len(x_train) / batch_size)
    for epoch in range(1, epochs + 1):
        # Cosine decay of the learning rate: large early steps, a careful finish.
        optimizer.lr = lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        order = rng.permutation(len(x_train))
        start, total_loss = time.perf_counter(), 0.0
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            logits = model.forward(xp.asarray(x_train[idx]))
            total_loss += float(loss_fn.forward(logits, xp.asarray(y_train[idx]))) * len(idx)
            model.backward(loss_fn.backward())
            optimizer.step()
            if log is not None and sys.stdout.isatty():
                done = (step + 1) / steps
                print(f"\repoch {epoch:>3}/{epochs} [{'#' * int(done * 30):<30}] {done:4.0%}", end="", flush=True)
        elapsed = time.perf_counter() - start
        row = dict(epoch=epoch, loss=total_loss / len(x_train), train_acc=accuracy(model, x_train, y_train, xp),
                   test_acc=accuracy(model, x_test, y_test, xp), images_per_s=len(x_train) / elapsed)
        history.append(row)
        if log is not None:
            end = "\r" if sys.stdout.isatty() else ""
            log(f"{end}epoch {epoch:>3}/{epochs}  loss {row['loss']:.4f}  train acc {row['train_acc']:6.2%}  "
                f"test acc {row['test_acc']:6.2%}  {row['images_per_s']:8.0f} images/s")
    return history


def save_model(model: Sequential, path: str) -> None:
    # Through a file object, so the file is exactly `path` (np.savez would append .npz to a bare name).
    with open(path, "wb") as f:
        np.savez(f, **{name: _to_host(p) for name, p in model.params.items()})


def load_model(model: Sequential, path: str, xp=np) -> None:
    """Copies saved parameters into the model; checks them all before changing any."""
    with np.load(path) as saved:
        missing = sorted(set(model.params) - set(saved.files))
        if missing:
            raise ValueError(f"{path} lacks parameters {missing}; it was not saved by this demo's network")
        arrays = {name: saved[name] for name in model.params}
    for name, p in model.params.items():
        if arrays[name].shape != tuple(p.shape):
            raise ValueError(f"{path}: parameter {name} has shape {arrays[name].shape}, the network expects "
                             f"{tuple(p.shape)}")
    for name, p in model.params.items():
        p[...] = xp.asarray(arrays[name], dtype=p.dtype)


def save_feature_maps(model: Sequential, image, label: int, path: str, xp=np, columns: int = 16) -> None:
    """One PNG: the digit and the network's prediction, then every channel after each conv, ReLU and
    max-pool of the network (channels wrap onto rows of `columns`)."""
    matplotlib = _require("matplotlib", "--save-maps")
    matplotlib.use("Agg")
    plt = _require("matplotlib.pyplot", "--save-maps")
    activations = model.forward_with_activations(xp.asarray(image[None]))
    stages = [(f"after layer {i}: {type(layer).__name__}", _to_host(a)[0])
              for i, (layer, a) in enumerate(zip(model.layers, activations))
              if isinstance(layer, (Conv2D, ReLU, MaxPool2D))]
    rows_per_stage = [math.ceil(maps.shape[0] / columns) for _, maps in stages]
    n_rows = 1 + sum(rows_per_stage)
    fig, axes = plt.subplots(n_rows, columns, figsize=(columns * 0.7, n_rows * 0.85), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    logits = _to_host(activations[-1])[0]
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    axes[0, 0].imshow(image[0], cmap="gray_r")
    axes[0, 0].set_title(f"digit {label}", fontsize=6)
    bars = axes[0, 1]
    bars.axis("on")
    bars.bar(range(10), probabilities)
    bars.set_xticks(range(10))
    bars.tick_params(labelsize=4, length=1)
    bars.set_yticks([])
    bars.set_title(f"predicted {int(probabilities.argmax())}", fontsize=6)
    row = 1
    for (title, maps), n in zip(stages, rows_per_stage):
        axes[row, 0].set_title(title, fontsize=6, loc="left")
        for c in range(maps.shape[0]):
            axes[row + c // columns, c % columns].imshow(maps[c], cmap="viridis")
        row += n
    fig.suptitle("pykernels demo: feature maps of the trained CNN", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(args) -> int:
    xp = np
    if args.device == "cuda":
        if not _backend.cuda_available():
            print(f"--device cuda: the CUDA backend is unavailable ({_backend.cuda_unavailable_reason()}); "
                  "run without --device to train on the CPU", file=sys.stderr)
            return 2
        import cupy as xp
    try:
        x_train, y_train, x_test, y_test = load_digits_split(args.seed)
        if args.save_maps:
            _require("matplotlib", "--save-maps")  # fail before training, not after
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 2
    for flag, path in (("--save-maps", args.save_maps), ("--save-model", args.save_model)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            print(f"{flag}: folder {folder} does not exist", file=sys.stderr)
            return 2
    model = build_model(args.seed, xp)
    n_params = sum(int(np.prod(p.shape)) for p in model.params.values())
    print(f"pykernels demo: {len(x_train)} training and {len(x_test)} test digits (8x8), "
          f"{n_params} parameters, backend {args.device}")
    start = time.perf_counter()
    if args.load_model:
        try:
            load_model(model, args.load_model, xp)
        except (OSError, ValueError) as exc:
            print(f"--load-model: cannot load {args.load_model}: {exc}", file=sys.stderr)
            return 2
        print(f"loaded parameters from {args.load_model}")
    if not args.evaluate:
        train(model, x_train, y_train, x_test, y_test, epochs=args.epochs, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, xp=xp)
    test_acc = accuracy(model, x_test, y_test, xp)
    elapsed = time.perf_counter() - start
    print(f"test accuracy {test_acc:.2%} ({round(test_acc * len(x_test))}/{len(x_test)}) in {elapsed:.1f} s "
          f"on {args.device}, {n_params} parameters")
    if args.save_model:
        save_model(model, args.save_model)
        print(f"saved parameters to {args.save_model}")
    if args.save_maps:
        save_feature_maps(model, x_test[0], int(y_test[0]), args.save_maps, xp)
        print(f"saved feature maps of a test digit to {args.save_maps}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=positive_int, default=15)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--save-maps", metavar="PNG", default=DEFAULT_MAPS,
                        help=f"write the feature maps of a test digit to this PNG (default: {DEFAULT_MAPS})")
    parser.add_argument("--no-maps", dest="save_maps", action="store_const", const=None,
                        help="do not write the feature-map PNG")
    parser.add_argument("--save-model", metavar="NPZ", help="save the trained parameters")
    parser.add_argument("--load-model", metavar="NPZ", help="start from saved parameters")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate (with --load-model)")
