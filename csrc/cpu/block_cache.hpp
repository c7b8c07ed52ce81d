// Large blocks of memory for NumPy results, kept for reuse after the arrays they backed are freed.
//
// glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with a fresh mmap, and
// the kernel maps and zeroes its pages again on first touch: 2 ms for a 51 MB result here, a fifth of
// resnet_stem's float64 forward and a third of resnet_1x1_256_64's float64 backward-input. A block
// handed back is reused for the next result of the same rounded size (the most recently returned
// first), so a training loop maps its large results once. The unused blocks kept are capped
// (PYKERNELS_CPU_CACHE_MB, default 1024; 0 keeps none), the oldest freed first; clear() frees them all.
// (Smaller results stay with NumPy: taking relu_vgg's 6.4 MB ones from here as well made its backward
// 20 % slower in the benchmark's rotation.)
#pragma once

#include <cstddef>

namespace pykernels::cpu {

struct Block {
  void* data;
  size_t capacity;  // bytes: the request rounded up to 64 KiB, or to whole 2 MiB pages from 2 MiB on
};

// A block of at least `bytes` (64-byte aligned, uninitialised): a kept one of the same capacity, else
// a new one. Throws std::bad_alloc when memory runs out even after the kept blocks are freed.
Block take_block(size_t bytes);
// The block back, kept, the oldest kept ones freed while they are over the cap. Thread-safe.
void give_back_block(Block block);
// Frees every kept block; returns how many bytes that released.
size_t clear_block_cache();
// Bytes kept in unused blocks now.
size_t block_cache_bytes();

}  // namespace pykernels::cpu
