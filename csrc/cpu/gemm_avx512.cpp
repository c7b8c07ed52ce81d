// The GEMM built for AVX-512F (CMake adds -mavx512f -mfma to this file only); used when the CPU has it.
#define PYKERNELS_ISA avx512
#define PYKERNELS_VECTOR_BYTES 64
#include "cpu/gemm_impl.inc"
