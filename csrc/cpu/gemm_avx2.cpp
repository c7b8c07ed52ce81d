// The GEMM built for AVX2+FMA (CMake adds -mavx2 -mfma to this file only); used when the CPU has both.
#define PYKERNELS_ISA avx2
#define PYKERNELS_VECTOR_BYTES 32
#include "cpu/gemm_impl.inc"
