// The im2col packers built for any x86-64 CPU (or any CPU elsewhere).
#define PYKERNELS_ISA portable
#define PYKERNELS_VECTOR_BYTES 16
#include "cpu/im2col_impl.inc"
