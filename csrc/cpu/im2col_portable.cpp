// The im2col packers built for any x86-64 CPU (or any CPU elsewhere).
#define PYKERNELS_ISA portable
#include "cpu/im2col_impl.inc"
