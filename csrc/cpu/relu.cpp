// ReLU on the CPU. Memory bound: one pass, a branch-free select vectorised (omp simd: y may be x itself,
// in place, which the compiler cannot rule out), threads over large contiguous chunks. relu(NaN) is NaN
// (as NumPy's maximum and PyTorch); the gradient passes where y > 0 only, so it is 0 at y == 0.
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace pykernels::cpu {

template <typename T>
void relu_forward(int64_t count, const T* x, T* y) {
#pragma omp parallel for simd schedule(static) if (count >= kMinParallelWork)
  for (int64_t i = 0; i < count; ++i) {
    const T v = x[i];
    y[i] = (v > T(0) || v != v) ? v : T(0);
  }
}

template <typename T>
void relu_backward(int64_t count, const T* grad_y, const T* y, T* grad_x) {
#pragma omp parallel for simd schedule(static) if (count >= kMinParallelWork)
  for (int64_t i = 0; i < count; ++i) {
    const T g = grad_y[i];  // loaded unconditionally: a conditional load would stop vectorisation
    grad_x[i] = y[i] > T(0) ? g : T(0);
  }
}

template void relu_forward<float>(int64_t, const float*, float*);
template void relu_forward<double>(int64_t, const double*, double*);
template void relu_backward<float>(int64_t, const float*, const float*, float*);
template void relu_backward<double>(int64_t, const double*, const double*, double*);

}  // namespace pykernels::cpu
