// The small-group passes, built for AVX2 and FMA (CMake adds -mavx2 -mfma to this file only).
#define PYKERNELS_ISA avx2
#define PYKERNELS_VECTOR_BYTES 32
#include "cpu/small_group_conv_impl.inc"
