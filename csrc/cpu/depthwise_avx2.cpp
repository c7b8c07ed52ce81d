// The depthwise passes with the channels across the lanes, built for AVX2+FMA (CMake adds -mavx2 -mfma to
// this file only).
#define PYKERNELS_ISA avx2
#define PYKERNELS_VECTOR_BYTES 32
#include "cpu/depthwise_impl.inc"
