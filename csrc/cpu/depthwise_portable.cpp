// The depthwise passes with the channels across the lanes, built for baseline x86-64 (SSE2): runs on any CPU.
#define PYKERNELS_ISA portable
#define PYKERNELS_VECTOR_BYTES 16
#include "cpu/depthwise_impl.inc"
