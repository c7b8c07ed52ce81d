// ReLU on the GPU: forward and backward. Memory bound, so the only goal is bandwidth: each thread
// moves 16-byte vectors (4 floats, 2 doubles, 8 halves) in a grid-stride loop when every pointer is
// 16-byte aligned (CuPy allocations are; a view with an offset may not be: then one element at a time).
// 1 read + 1 write (forward) or 2 reads + 1 write (backward) per element; nothing else.
// relu(NaN) is NaN (as NumPy's maximum and PyTorch); the gradient passes where y > 0 only (0 at y == 0).
// In place is allowed (y == x, grad_x == grad_y), so no __restrict__ here.
#include "cuda/common.cuh"

namespace pykernels::cuda {

namespace {

template <typename T>
__device__ __forceinline__ T relu1(T v) {
  const auto a = to_acc(v);
  return (a > 0 || a != a) ? v : from_acc<T>(Acc<T>(0));
}

template <typename T>
__device__ __forceinline__ T relu_grad1(T gy, T y) {
  return to_acc(y) > 0 ? gy : from_acc<T>(Acc<T>(0));
}

// 16 bytes of T, loaded and stored as one vector.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kCount = 16 / int(sizeof(T));
  T v[kCount];
};

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) relu_forward_kernel(int64_t count, const T* x, T* y) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t start = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (kVector) {
    using V = Pack<T>;
    const int64_t vectors = count / V::kCount;
    const V* xv = reinterpret_cast<const V*>(x);
    V* yv = reinterpret_cast<V*>(y);
    for (int64_t i = start; i < vectors; i += stride) {
      V p = xv[i];
#pragma unroll
      for (int e = 0; e < V::kCount; ++e) p.v[e] = relu1(p.v[e]);
      yv[i] = p;
    }
    start += vectors * V::kCount;  // the tail (< one vector) goes element by element below
  }
  for (int64_t i = start; i < count; i += stride) y[i] = relu1(x[i]);
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) relu_backward_kernel(int64_t count, const T* gy, const T* y, T* gx) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t start = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (kVector) {
    using V = Pack<T>;
    const int64_t vectors = count / V::kCount;
    const V* gyv = reinterpret_cast<const V*>(gy);
    const V* yv = reinterpret_cast<const V*>(y);
    V* gxv = reinterpret_cast<V*>(gx);
    for (int64_t i = start; i < vectors; i += stride) {
      V g = gyv[i];
      const V m = yv[i];
#pragma unroll
      for (int e = 0; e < V::kCount; ++e) g.v[e] = relu_grad1(g.v[e], m.v[e]);
      gxv[i] = g;
    }
    start += vectors * V::kCount;
  }
  for (int64_t i = start; i < count; i += stride) gx[i] = relu_grad1(gy[i], y[i]);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

template <typename T>
void relu_forward(int64_t count, const T* x, T* y, cudaStream_t stream) {
  if (count <= 0) return;
  if (aligned16(x) && aligned16(y)) {
    auto* kernel = relu_forward_kernel<T, true>;
    PK_LAUNCH(kernel, grid_for((count + Pack<T>::kCount - 1) / Pack<T>::kCount), kThreads, 0, stream, count, x, y);
  } else {
    auto* kernel = relu_forward_kernel<T, false>;
    PK_LAUNCH(kernel, grid_for(count), kThreads, 0, stream, count, x, y);
  }
  check_launch("relu forward kernel launch");
}

template <typename T>
void relu_backward(int64_t count, const T* grad_y, const T* y, T* grad_x, cudaStream_t stream) {
  if (count <= 0) return;
  if (aligned16(grad_y) && aligned16(y) && aligned16(grad_x)) {
    auto* kernel = relu_backward_kernel<T, true>;
    PK_LAUNCH(kernel, grid_for((count + Pack<T>::kCount - 1) / Pack<T>::kCount), kThreads, 0, stream, count, grad_y,
              y, grad_x);
  } else {
    auto* kernel = relu_backward_kernel<T, false>;
    PK_LAUNCH(kernel, grid_for(count), kThreads, 0, stream, count, grad_y, y, grad_x);
  }
  check_launch("relu backward kernel launch");
}

#define PYKERNELS_INSTANTIATE(T)                                                  \
  template void relu_forward<T>(int64_t, const T*, T*, cudaStream_t);             \
  template void relu_backward<T>(int64_t, const T*, const T*, T*, cudaStream_t);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
PYKERNELS_INSTANTIATE(__half)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cuda
