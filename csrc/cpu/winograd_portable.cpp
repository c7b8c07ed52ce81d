// The Winograd transforms built for baseline x86-64 (SSE2): runs on any CPU.
#define PYKERNELS_ISA portable
#include "cpu/winograd_impl.inc"
#include "cpu/winograd_f2_impl.inc"
#include "cpu/winograd_f2_weight_impl.inc"
#include "cpu/winograd_rows_weight_impl.inc"
