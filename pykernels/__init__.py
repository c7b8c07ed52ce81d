"""pykernels: hand-written C++/CUDA kernels for conv2d, ReLU and max-pooling, forward and backward,
on NumPy (CPU) or CuPy (GPU) arrays. See README.md."""

from ._backend import cuda_available, cuda_unavailable_reason, empty_cache
from .ops import conv2d, conv2d_backward, max_pool2d, max_pool2d_backward, relu, relu_backward
from . import layers  # noqa: E402  (pykernels.layers.Conv2D, ...)

__version__ = "0.1.0"

__all__ = [
    "conv2d", "conv2d_backward", "relu", "relu_backward", "max_pool2d", "max_pool2d_backward",
    "cuda_available", "cuda_unavailable_reason", "empty_cache", "layers", "__version__",
]
