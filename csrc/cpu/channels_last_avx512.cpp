// The channels-last convolution passes built for AVX-512F (CMake adds -mavx512f -mfma to this file only).
#define PYKERNELS_ISA avx512
#include "cpu/channels_last_impl.inc"
