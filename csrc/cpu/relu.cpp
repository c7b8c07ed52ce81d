// ReLU on the CPU: which instruction-set build of relu_impl.inc runs it. relu(NaN) is NaN (as NumPy's
// maximum and PyTorch); the gradient passes where y > 0 only, so it is 0 at y == 0.
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_RELU(ns)                                     \
  namespace ns {                                                      \
  template <typename T>                                               \
  void relu_forward(int64_t, const T*, T*);                           \
  template <typename T>                                               \
  void relu_backward(int64_t, const T*, const T*, T*);                \
  }
PYKERNELS_DECLARE_RELU(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_RELU(avx2)
PYKERNELS_DECLARE_RELU(avx512)
#endif
#undef PYKERNELS_DECLARE_RELU

template <typename T>
void relu_forward(int64_t count, const T* x, T* y) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), relu_forward<T>(count, x, y))
}

template <typename T>
void relu_backward(int64_t count, const T* grad_y, const T* y, T* grad_x) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), relu_backward<T>(count, grad_y, y, grad_x))
}

template void relu_forward<float>(int64_t, const float*, float*);
template void relu_forward<double>(int64_t, const double*, double*);
template void relu_backward<float>(int64_t, const float*, const float*, float*);
template void relu_backward<double>(int64_t, const double*, const double*, double*);

}  // namespace pykernels::cpu
