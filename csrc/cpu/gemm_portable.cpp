// The GEMM built for baseline x86-64 (SSE2): runs on any CPU the wheel is installed on.
#define PYKERNELS_ISA portable
#include "cpu/gemm_impl.inc"
