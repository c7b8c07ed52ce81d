// The channels-last convolution passes built for AVX2+FMA (CMake adds -mavx2 -mfma to this file only).
#define PYKERNELS_ISA avx2
#include "cpu/channels_last_impl.inc"
