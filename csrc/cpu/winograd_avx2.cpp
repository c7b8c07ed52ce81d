// The Winograd transforms built for AVX2+FMA (CMake adds -mavx2 -mfma to this file only).
#define PYKERNELS_ISA avx2
#include "cpu/winograd_impl.inc"
#include "cpu/winograd_f2_impl.inc"
#include "cpu/winograd_f2_weight_impl.inc"
#include "cpu/winograd_rows_weight_impl.inc"
