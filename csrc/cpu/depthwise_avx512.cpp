// The depthwise passes with the channels across the lanes, built for AVX-512F (CMake adds -mavx512f -mfma to
// this file only).
#define PYKERNELS_ISA avx512
#define PYKERNELS_VECTOR_BYTES 64
#include "cpu/depthwise_impl.inc"
