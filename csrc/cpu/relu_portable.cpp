// ReLU built for baseline x86-64 (SSE2): runs on any CPU.
#define PYKERNELS_ISA portable
#include "cpu/relu_impl.inc"
