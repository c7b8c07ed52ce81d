// Direct convolution for layers with few weights: which instruction-set build of direct_conv_impl.inc
// runs it.
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_DIRECT(ns)                                                          \
  namespace ns {                                                                             \
  template <typename T>                                                                      \
  void conv2d_forward_direct(const Conv2dShape&, const T*, const T*, const T*, T*);          \
  template <typename T>                                                                      \
  void conv2d_backward_input_direct(const Conv2dShape&, const T*, const T*, T*);             \
  template <typename T>                                                                      \
  void conv2d_backward_weight_direct(const Conv2dShape&, const T*, const T*, T*);            \
  }
PYKERNELS_DECLARE_DIRECT(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_DIRECT(avx2)
PYKERNELS_DECLARE_DIRECT(avx512)
#endif
#undef PYKERNELS_DECLARE_DIRECT

template <typename T>
void conv2d_forward_direct(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_forward_direct<T>(s, x, w, bias, y))
}

template <typename T>
void conv2d_backward_input_direct(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_backward_input_direct<T>(s, grad_y, w, grad_x))
}

template <typename T>
void conv2d_backward_weight_direct(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), conv2d_backward_weight_direct<T>(s, grad_y, x, grad_w))
}

#define PYKERNELS_INSTANTIATE(T)                                                                  \
  template void conv2d_forward_direct<T>(const Conv2dShape&, const T*, const T*, const T*, T*); \
  template void conv2d_backward_input_direct<T>(const Conv2dShape&, const T*, const T*, T*);    \
  template void conv2d_backward_weight_direct<T>(const Conv2dShape&, const T*, const T*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
