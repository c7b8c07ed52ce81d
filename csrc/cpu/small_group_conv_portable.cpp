// The small-group passes, built for any x86-64 CPU (SSE2), or the target's baseline elsewhere.
#define PYKERNELS_ISA portable
#define PYKERNELS_VECTOR_BYTES 16
#include "cpu/small_group_conv_impl.inc"
