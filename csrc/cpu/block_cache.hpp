// Large blocks of memory for NumPy results, kept for reuse after the arrays they backed are freed.
//
// glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with a fresh mmap, and
// the kernel maps and zeroes its pages again on first touch: 2 ms for a 51 MB result here, a fifth of
// resnet_stem's float64 forward and a third of resnet_1x1_256_64's float64 backward-input. A block
// handed back is reused for the next result of the same rounded size, so a training loop maps its
// large results once. The blocks kept while unused are capped (PYKERNELS_CPU_CACHE_MB, default 1024;
// 0 keeps none); clear() frees them.
#pragma once

#include <cstddef>

namespace pykernels::cpu {

struct Block {
  void* data;
  size_t capacity;  // bytes: the request rounded up to whole 2 MiB pages
};

// A block of at least `bytes` (64-byte aligned, uninitialised): a kept one of the same capacity, else
// a new one. Throws std::bad_alloc when memory runs out even after the kept blocks are freed.
Block take_block(size_t bytes);
// The block back, kept while the kept ones stay under the cap, else freed. Thread-safe.
void give_back_block(Block block);
// Frees every kept block; returns how many bytes that released.
size_t clear_block_cache();
// Bytes kept in unused blocks now.
size_t block_cache_bytes();

}  // namespace pykernels::cpu
