// The Winograd transforms built for AVX-512F (CMake adds -mavx512f -mfma to this file only).
#define PYKERNELS_ISA avx512
#include "cpu/winograd_impl.inc"
#include "cpu/winograd_f2_impl.inc"
#include "cpu/winograd_f2_weight_impl.inc"
#include "cpu/winograd_rows_weight_impl.inc"
