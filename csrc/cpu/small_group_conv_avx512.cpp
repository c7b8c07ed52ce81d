// The small-group passes, built for AVX-512F (CMake adds -mavx512f -mfma to this file only).
#define PYKERNELS_ISA avx512
#define PYKERNELS_VECTOR_BYTES 64
#include "cpu/small_group_conv_impl.inc"
