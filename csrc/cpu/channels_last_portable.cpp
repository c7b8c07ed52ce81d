// The channels-last convolution passes built for baseline x86-64 (SSE2): runs on any CPU.
#define PYKERNELS_ISA portable
#include "cpu/channels_last_impl.inc"
