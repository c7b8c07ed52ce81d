// The im2col packers built for AVX2+FMA (CMake adds -mavx2 -mfma to this file only).
#define PYKERNELS_ISA avx2
#define PYKERNELS_VECTOR_BYTES 32
#include "cpu/im2col_impl.inc"
