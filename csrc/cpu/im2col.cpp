// Which instruction-set build of im2col_impl.inc's packers the convolutions use.
#include "cpu/im2col.hpp"

namespace pykernels::cpu {

#define PYKERNELS_DECLARE_PACKERS(ns) \
  namespace ns {                      \
  template <typename T>               \
  ConvPackers<T> packers();           \
  }
PYKERNELS_DECLARE_PACKERS(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_PACKERS(avx2)
PYKERNELS_DECLARE_PACKERS(avx512)
#endif
#undef PYKERNELS_DECLARE_PACKERS

template <typename T>
ConvPackers<T> conv_packers() {
  PYKERNELS_RETURN_ON_BUILD(active_build(), packers<T>())
}

template ConvPackers<float> conv_packers<float>();
template ConvPackers<double> conv_packers<double>();

}  // namespace pykernels::cpu
