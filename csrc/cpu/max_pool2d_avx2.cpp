// Max pooling built for AVX2+FMA (CMake adds -mavx2 -mfma to this file only).
#define PYKERNELS_ISA avx2
#include "cpu/max_pool2d_impl.inc"
