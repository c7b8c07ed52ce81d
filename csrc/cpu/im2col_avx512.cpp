// The im2col packers built for AVX-512F (CMake adds -mavx512f -mfma to this file only).
#define PYKERNELS_ISA avx512
#define PYKERNELS_VECTOR_BYTES 64
#include "cpu/im2col_impl.inc"
