// Max pooling built for baseline x86-64 (SSE2): runs on any CPU; the one build whose forward is used.
#define PYKERNELS_ISA portable
#define PYKERNELS_POOL_FORWARD
#include "cpu/max_pool2d_impl.inc"
