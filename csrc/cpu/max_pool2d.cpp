// Max pooling on the CPU: which instruction-set build of max_pool2d_impl.inc runs each pass.
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"

namespace pykernels::cpu {

namespace portable {
template <typename T>
void max_pool2d_forward(const Pool2dShape&, const T*, T*, int64_t*);
}
#define PYKERNELS_DECLARE_POOL(ns)                                                      \
  namespace ns {                                                                       \
  template <typename T>                                                                \
  int64_t max_pool2d_backward(const Pool2dShape&, const T*, const int64_t*, T*);       \
  }
PYKERNELS_DECLARE_POOL(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_POOL(avx2)
PYKERNELS_DECLARE_POOL(avx512)
#endif
#undef PYKERNELS_DECLARE_POOL

// The forward runs the portable (SSE2) build on every CPU: GCC's wider stride-2 loads made the AVX2 and
// AVX-512 builds 10-30 % slower (pool2x2_vgg: 6.0x torch portable, 4.4x AVX-512).
template <typename T>
void max_pool2d_forward(const Pool2dShape& s, const T* x, T* y, int64_t* indices) {
  portable::max_pool2d_forward<T>(s, x, y, indices);
}

template <typename T>
int64_t max_pool2d_backward(const Pool2dShape& s, const T* grad_y, const int64_t* indices, T* grad_x) {
  PYKERNELS_RETURN_ON_BUILD(active_build(), max_pool2d_backward<T>(s, grad_y, indices, grad_x))
}

#define PYKERNELS_INSTANTIATE(T)                                                               \
  template void max_pool2d_forward<T>(const Pool2dShape&, const T*, T*, int64_t*);             \
  template int64_t max_pool2d_backward<T>(const Pool2dShape&, const T*, const int64_t*, T*);
PYKERNELS_INSTANTIATE(float)
PYKERNELS_INSTANTIATE(double)
#undef PYKERNELS_INSTANTIATE

}  // namespace pykernels::cpu
