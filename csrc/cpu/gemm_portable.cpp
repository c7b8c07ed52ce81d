// The GEMM built for baseline x86-64 (SSE2): runs on any CPU the wheel is installed on.
#define PYKERNELS_ISA portable
#define PYKERNELS_VECTOR_BYTES 16
#include "cpu/gemm_impl.inc"
